"""The optional parts of fedsb and the pip extra that installs each (pyproject.toml's optional-dependencies).

The core (library and Flower apps) imports none of them at module level; each use goes through
``require`` or ``require_dir``, so a missing part fails with the command that installs it instead of a
bare ``ModuleNotFoundError`` deep inside a run.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType


class MissingExtra(ImportError):
    """An optional part of fedsb is not installed; the message names the extra."""


def install_hint(what: str, extra: str) -> str:
    return f"{what} needs `pip install 'fedsb[{extra}]'`"


def require(module: str, what: str, extra: str) -> ModuleType:
    """Import ``module``, or raise MissingExtra naming ``extra`` (``what``: the feature that needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name.split(".")[0]):
            raise  # the module is there but one of *its* imports is broken: not ours to explain
        raise MissingExtra(f"{install_hint(what, extra)} (no module {e.name!r})") from e


def require_dir(package: str, what: str, extra: str) -> Path:
    """The directory of an installed data package (found without importing it), or MissingExtra."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"{install_hint(what, extra)} (no package {package!r})")
    return Path(list(spec.submodule_search_locations)[0])

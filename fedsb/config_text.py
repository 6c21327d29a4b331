"""Text in and out of the config: run-config values coerced to their types, misspelt keys matched to known
ones, errors that name the key, and the README's key table rendered from the field metadata."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any


class ConfigError(ValueError):
    """A run-config value is invalid. ``key`` names the offending (kebab-case) key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"run-config '{key}': {message}")


def suggest(key: str, known) -> str:
    """' Did you mean ...?' with the known keys closest to a misspelt one (edit distance), or ''."""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    close += [k for k in known if k not in close and k.split("-")[0] == key.split("-")[0]][: max(0, 3 - len(close))]
    return f" Did you mean {' or '.join(repr(k) for k in close)}?" if close else ""


def _default_text(v: Any) -> str:
    return f"`{str(v).lower()}`" if isinstance(v, bool) else f'`"{v}"`' if isinstance(v, str) else f"`{v}`"


def markdown_table(cls) -> str:
    """The README's table of keys, rendered from the field metadata (a test keeps README equal to it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        m = f.metadata
        help_ = m["help"] + (f" (one of: {', '.join(f'`{c}`' for c in m['choices'])})" if m.get("choices") else "")
        if not m.get("identity", True):
            help_ += "; may change on resume"
        rows.append(f"| `{cls.key_of(f.name)}` | {_default_text(f.default)} | {help_} |")
    return "\n".join(rows) + "\n"


README_START, README_END = "<!-- config-table:start -->\n", "<!-- config-table:end -->"


def readme_with_table(cls, text: str) -> str:
    """``text`` (README.md) with the block between the config-table markers replaced by ``markdown_table(cls)``."""
    i, j = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:i] + markdown_table(cls) + text[j:]


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(key: str, raw: Any, typ: type) -> Any:
    """Flower gives bool/int/float/str; accept the obvious conversions, refuse the rest."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in TRUE_WORDS + FALSE_WORDS:
            return raw.lower() in TRUE_WORDS
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise ConfigError(key, f"got {raw!r}; expected true or false (also accepted: "
                          f"{', '.join(w for pair in zip(TRUE_WORDS[1:], FALSE_WORDS[1:]) for w in pair)})")
    if typ in (int, float):
        what = "an integer" if typ is int else "a number"
        if isinstance(raw, bool):
            raise ConfigError(key, f"got {raw!r}; expected {what}")
        if typ is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, int) or (typ is float and isinstance(raw, float)):
            return typ(raw)
        if isinstance(raw, str):
            try:
                return typ(raw)
            except ValueError:
                pass
        raise ConfigError(key, f"got {raw!r}; expected {what}")
    if not isinstance(raw, str):
        raise ConfigError(key, f"got {raw!r}; expected a string (quote it: {key}='...')")
    return raw

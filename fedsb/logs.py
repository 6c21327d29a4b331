"""fedsb's console logging: its own loggers (``fedsb.*``) only, never the root logger.

Setting the root logger to INFO (as ``logging.basicConfig`` does) also turns on every library that
logs at INFO without a handler of its own (alembic's seven migration lines in Flower's state database,
for one). The apps and the ``fedsb`` command call ``configure`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int = logging.INFO) -> logging.Logger:
    """Print fedsb's records at ``level`` and above on stderr (once per process, however often called)."""
    logger = logging.getLogger("fedsb")
    logger.setLevel(level)
    if not any(getattr(h, "fedsb_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.fedsb_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


@contextlib.contextmanager
def root_unconfigured() -> Iterator[None]:
    """Undo a root handler that an import inside adds: Opacus (``opacus.utils.module_utils``) calls
    ``logging.basicConfig`` when imported, and every fedsb record, which propagates to the root, would then
    print twice. A root handler the application set up before is kept."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)


def progress_bars() -> bool:
    """Whether to draw progress bars: ``FEDSB_PROGRESS=1``/``0`` decides; unset, only on a terminal. Simulated
    clients (Ray actors) and deployed ClientApps write to pipes, where bars of many clients would interleave
    with the log, and a bar flushed late prints after the run has ended."""
    setting = os.environ.get("FEDSB_PROGRESS", "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()

"""The local SuperLink that ``flwr run . local`` starts (detached) for a simulation: find it and stop it.

``flwr run`` leaves that SuperLink (and the executors it spawned) running after the run; ``make run``
stops it again unless it was already running before (``fedsb local-superlink running|stop``). Only the
SuperLink of this ``FLWR_HOME`` is touched: it is recognised by its log file under that home.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser().resolve()


def local_superlinks() -> list[psutil.Process]:
    log_file = str(flwr_home() / "local-superlink" / "superlink.log")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if any(c.endswith("flower-superlink") for c in cmd[:2]) and "--simulation" in cmd and log_file in cmd:
            found.append(p)
    return found


def stop(timeout: float = 10.0) -> int:
    """Terminate this home's local SuperLink and every process under it; returns how many were stopped."""
    procs: list[psutil.Process] = []
    for link in local_superlinks():
        try:
            procs += [link, *link.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:  # did not stop on SIGTERM in time
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    time.sleep(0.2)
    return len(procs)

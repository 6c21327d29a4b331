"""Warm start for deployed ClientApps: a per-node process that has imported torch, transformers and Flower
once, and forks a fresh ClientApp process for every message.

Flower 1.41 starts a new ``flwr-clientapp`` process for each message a SuperNode receives, and that process
spends seconds importing torch and transformers (BENCHMARKS.md, "Deployment round vs simulation round")
before it does any work. Flower's own warm executors cover other task types, not ClientApps, and Python's
``multiprocessing`` forkserver cannot stand in for a command that the SuperNode starts, so this is written
here: ``fedsb warm-clientapp --socket DIR/warm.sock`` preloads the heavy third-party modules, listens on the
socket and installs ``DIR/bin/flwr-clientapp`` (a copy of ``client/warm_bin/flwr-clientapp``): a SuperNode
with ``DIR/bin`` first on its PATH and ``FEDSB_WARM_SOCKET=DIR/warm.sock`` starts that shim for each
message, and the shim hands its command line, environment and standard streams to the warm process. The forked child runs Flower's own ``flwr-clientapp`` entry point, so each
message still gets a process of its own, which exits when the message is done. Without the socket, the
shim runs the real ``flwr-clientapp``.

Only third-party modules are preloaded: the app's own code (``fedsb``, ``client``) comes from the FAB that
Flower installs for the run, so a child never runs a preloaded copy of it. Environment variables that a
library reads when it is imported are the warm process's own.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from importlib.metadata import entry_points
from pathlib import Path

log = logging.getLogger("fedsb.warm")

SOCKET_ENV = "FEDSB_WARM_SOCKET"
SHIM = Path(__file__).resolve().parent / "warm_bin" / "flwr-clientapp"
# torch, transformers with the modules of the bundled default models (BERT, Llama), the tokenizers they
# load, Opacus for dp=true and Flower's ClientApp runtime. A module that fails to import is skipped.
PRELOAD = ("torch", "numpy", "safetensors.torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.tokenization_auto", "tokenizers", "opacus",
           "flwr.app", "flwr.clientapp", "flwr.supernode.cli.flwr_clientapp")
_MAX_REQUEST = 1 << 20
# The project's own packages: the warm process imported some of them to start (`fedsb warm-clientapp`), and a
# child must import them again from the run's FAB (Flower imports `client.app` by name and would otherwise
# reuse the installed package already in sys.modules).
APP_PACKAGES = ("fedsb", "server", "client")


def forget_app_modules() -> list[str]:
    """Drop the project's packages from sys.modules (in a forked child, before Flower loads the app)."""
    gone = [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]
    for m in gone:
        del sys.modules[m]
    return gone


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, float]:
    """Import ``modules``; returns the seconds each took (a module that fails is logged and skipped)."""
    from fedsb.logs import root_unconfigured

    took = {}
    for name in modules:
        t0 = time.time()
        try:
            with root_unconfigured():  # opacus's import would give the root logger a handler: fedsb's lines twice
                importlib.import_module(name)
        except Exception as e:  # an optional extra (opacus) may be absent: the child imports what it needs
            log.warning("warm start: not preloading %s (%s)", name, e)
            continue
        took[name] = round(time.time() - t0, 3)
    return took


def shim_dir(path: Path) -> Path:
    """The folder to put first on the SuperNode's PATH for the warm process on socket ``path``."""
    return path.parent / "bin"


def serve(path: Path, modules: tuple[str, ...] = PRELOAD, ready: Path | None = None) -> None:
    """Preload, then fork a ``flwr-clientapp`` child for every request on the Unix socket ``path``."""
    took = preload(modules)
    log.info("warm start: preloaded %d modules in %.1f s", len(took), sum(took.values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # only this user may hand us a command line to run
    shim = shim_dir(path) / "flwr-clientapp"
    shim.parent.mkdir(exist_ok=True)
    shim.write_bytes(SHIM.read_bytes())
    shim.chmod(0o755)
    if path.exists():
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel; their exit code goes to the shim
    if ready is not None:
        ready.write_text(json.dumps(took))
    log.info("warm start: listening on %s", path)
    while True:
        conn, _ = srv.accept()
        try:
            data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
            request = json.loads(data)
        except Exception as e:
            log.warning("warm start: dropped a malformed request (%s)", e)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            srv.close()
            _child(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()  # the child holds its own copy; the shim reads the exit code from it
        log.info("warm start: forked pid %d for %s", pid, " ".join(request["argv"][:1]))


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):  # the shim's stdin, stdout, stderr
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        forget_app_modules()
        # the `flwr-clientapp` command itself, wherever Flower keeps its function
        (flwr_clientapp,) = entry_points(group="console_scripts", name="flwr-clientapp")
        flwr_clientapp.load()()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(code.to_bytes(4, "big", signed=True))
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fedsb warm-clientapp", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", default=os.environ.get(SOCKET_ENV, ""),
                   help=f"the Unix socket to listen on (default: ${SOCKET_ENV}); the SuperNode gets the same "
                        f"${SOCKET_ENV} and the socket's folder/bin first on its PATH")
    p.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules to import before forking")
    p.add_argument("--ready-file", default="", help="written (seconds per preloaded module) once the socket listens")
    args = p.parse_args(argv)
    if not args.socket:
        p.error(f"--socket: give the socket path (or set {SOCKET_ENV})")
    from fedsb.logs import configure as configure_logging

    configure_logging()
    serve(Path(args.socket), tuple(m for m in args.preload.split(",") if m),
          Path(args.ready_file) if args.ready_file else None)
    return 0

"""Real Flower deployment processes on loopback for the tests: SuperLink (TLS + node auth), SuperNodes,
``flwr run``. Command lines come from fedsb.ops.deploy (the same ones the compose files use). Every process
is started in its own session and stopped by pid (its whole process group) by ``stop``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsb.ops.certs import make_certificates
from fedsb.ops.deploy import EXECUTOR_ENV, Security, superexec_args, supernode_args, superlink_args
from lab.flwr_cli import BIN, ROOT, FlwrCli, free_port


@dataclass
class Federation(FlwrCli):
    workdir: Path
    num_nodes: int = 3
    isolation: str = "subprocess"
    warm: bool = False  # each SuperNode's ClientApp processes forked by a warm-start process (client/warm_start.py)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    federation = "fedsb-test"

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = self.workdir / "certs"
        make_certificates(self.certs, self.num_nodes + 1)  # one spare key that is never registered
        self.sec = Security(tls=True, auth=True, certs_dir=str(self.certs))
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(self.num_nodes + 1)]
        self.flwr_home = self.make_flwr_home(self.workdir / "flwr-home", self.port, self.certs / "ca.crt")
        self.env = dict(os.environ, FLWR_HOME=str(self.flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FEDSB_PROGRESS="0",
                        PYTHONPATH=str(ROOT), **EXECUTOR_ENV)  # as the compose files set it
        self.flwr_env = self.env

    # -- processes ------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        args = [str(BIN / args[0])] + args[1:]
        p = subprocess.Popen(args, cwd=self.workdir, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start_superlink(self) -> None:
        self._start("superlink", superlink_args(self.port, self.sec, str(self.workdir / "state.db"), isolation=self.isolation))
        if self.isolation == "process":
            self._start("superexec-serverapp", superexec_args(f"127.0.0.1:{self.port}", self.sec))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"SuperLink did not open port {self.port}: {self.log('superlink')[-2000:]}")

    def register(self, i: int) -> subprocess.CompletedProcess:
        return self.flwr("supernode", "register", str(self.certs / "keys" / f"sn{i}.pub"), self.federation)

    def start_warm(self, i: int, env: dict) -> dict:
        """Node i's warm-start process, once; returns the environment its SuperNode needs to use it."""
        from client.warm_start import shim_dir

        sock = self.workdir / f"warm-{i}" / "warm.sock"
        ready = self.workdir / f"warm-{i}.ready"
        if f"warm-{i}" not in self.procs:
            ready.unlink(missing_ok=True)
            self._start(f"warm-{i}", ["fedsb", "warm-clientapp", "--socket", str(sock), "--ready-file", str(ready)], env)
            deadline = time.time() + 180
            while not ready.exists():
                if time.time() > deadline or self.procs[f"warm-{i}"].poll() is not None:
                    raise RuntimeError(f"warm-start process {i} not ready: {self.log(f'warm-{i}')[-2000:]}")
                time.sleep(0.5)
        return dict(env, FEDSB_WARM_SOCKET=str(sock), PATH=f"{shim_dir(sock)}{os.pathsep}{env['PATH']}")

    def start_supernode(self, i: int, cache_dir: Path | None = None, node_config: dict | None = None) -> subprocess.Popen:
        """Node i; ``node_config`` adds its party's own keys (``dataset``, ``model``...) to its --node-config."""
        env = dict(self.env, FEDSB_CACHE_DIR=str(cache_dir or self.workdir / f"cache-{i}"))
        if self.warm:
            env = self.start_warm(i, env)
        args = supernode_args(f"127.0.0.1:{self.port}", self.node_ports[i], i, self.num_nodes, self.sec,
                              key=str(self.certs / "keys" / f"sn{i}"), isolation=self.isolation)
        if node_config:
            at = args.index("--node-config") + 1
            args[at] += "".join(f" {k}={json.dumps(v)}" for k, v in node_config.items())
        p = self._start(f"supernode-{i}", args, env)
        if self.isolation == "process":
            # the SuperNode's runtime API has no certificate of its own (as in docker/compose.tls.yml)
            self._start(f"superexec-clientapp-{i}", superexec_args(f"127.0.0.1:{self.node_ports[i]}", Security()), env)
        return p

    def kill(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)

    def leave(self, name: str) -> None:
        """Stop a SuperNode as an operator does (SIGTERM): Flower's SuperNode then deactivates itself at the
        SuperLink before it exits, so the SuperLink answers the messages it still owed with Flower's
        node-unavailable error at once; after SIGKILL the SuperLink only notices when the node's heartbeat
        runs out (2 × 30 s in flwr 1.41, with no setting to shorten it). What is left of the process group
        (an orphaned ClientApp) is killed."""
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=60)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- runs -----------------------------------------------------------------------------------
    def wait(self, run_id: int, timeout: float, until: Path | None = None) -> str:
        """The run's final status. With ``until`` (a file the run writes when it ends, e.g. its summary.json)
        the status is asked for every 15 s until that file exists, then every 0.5 s: each ``flwr ls`` is a
        new Python process that takes CPU from the nodes on a small machine."""
        deadline = time.time() + timeout
        asked = 0.0
        while time.time() < deadline:
            if until is None or until.exists() or time.time() - asked > 15:
                asked = time.time()
                s = self.status(run_id)
                if s.startswith("finished"):
                    return s
            time.sleep(0.5 if until is not None else 2)
        raise TimeoutError(f"run {run_id} did not finish in {timeout}s (status {self.status(run_id)!r})")

"""The ``flwr`` command line as the test federations drive it, on loopback processes
(``lab.deployment_harness``) or in docker compose (``lab.docker_harness``): a free port, a run submitted,
its status asked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from fedsb.ops.deploy import connection_toml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlwrCli:
    """``flwr`` against one federation: the class sets ``flwr_env`` (the environment, whose FLWR_HOME names the
    connection) and ``federation`` (the connection's name in that FLWR_HOME's config.toml)."""

    flwr_env: dict
    federation: str

    def make_flwr_home(self, home: Path, port: int, ca: Path) -> Path:
        """``home`` as FLWR_HOME: its config.toml names this federation, on 127.0.0.1:``port`` over TLS with ``ca``,
        as the default connection."""
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{self.federation}"\n\n'
                                          + connection_toml(self.federation, f"127.0.0.1:{port}", str(ca)))
        return home

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.flwr_env, capture_output=True, text=True,
                              timeout=timeout)

    def start_run(self, run_config: dict) -> int:
        """``flwr run . <federation>`` with ``run_config``; returns the run id."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        res = self.flwr("run", ".", self.federation, "--run-config", rc, "--format", "json", timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}\n{res.stderr}")
        return int(json.loads(res.stdout)["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` says it ("" while the SuperLink cannot answer, e.g. restarting)."""
        res = self.flwr("ls", self.federation, "--run-id", str(run_id), "--format", "json")
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            return ""
        runs = data.get("runs", [data])
        return str(runs[0].get("status", "")) if runs else ""

"""The docker-compose deployment for real (``make docker-test``; marker ``docker``, deselected by default).

Builds the images here without Docker Hub (lab/docker_harness.py; cached between runs), then runs the
committed ``docker/compose.yml`` + ``docker/compose.tls.yml`` under Compose 1.29: SuperLink + 3 SuperNodes
+ their executors with TLS and SuperNode authentication, a Fed-SB run started with ``flwr run`` from the
host, one SuperNode container stopped after round 1 and started again, and a SuperNode whose key was
never registered. Everything the test started is removed at the end (``down -v``), also on failure; the
images stay (the cache of the next run). Needs root (dockerd) and a few GiB of disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lab.docker_harness import ComposeFederation, build_images, ensure_engine, log

pytestmark = pytest.mark.docker

RUN_DIR = "/app/runs/docker-test"  # in the ServerApp executor's `runs` volume
# The bundled default model and dataset (in the image), made small: 3 rounds of a few steps. The round
# timeout is generous: every message starts a new ClientApp process (~1-2 min on 2 busy cores).
RUN_CONFIG = {
    "num-server-rounds": 3, "local-steps": 3, "batch-size": 8, "init-samples": 16, "max-length": 32,
    "eval-max-samples": 64, "fraction-train": 1.0, "min-train-nodes": 2, "min-available-nodes": 3,
    "round-timeout": 900.0, "output-dir": RUN_DIR, "seed": 3,
}


@pytest.fixture(scope="module")
def images():
    t0 = time.time()
    ensure_engine()
    times = build_images()
    log(f"images ready in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return times


@pytest.fixture
def workdir():
    # Not pytest's tmp_path: other pytest sessions of the same user prune /tmp/pytest-of-<user> while
    # this long test runs (the project directory holds the certificates and the flwr connection).
    d = Path(tempfile.mkdtemp(prefix="fedsb-docker-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def federation(images, workdir):
    fed = ComposeFederation(workdir / "project")
    try:
        yield fed
    finally:
        try:
            log(f"compose logs: {fed.save_logs()}")
        finally:
            fed.down()
            left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={fed.project}"],
                                  capture_output=True, text=True).stdout.split()
            vols = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                                   f"label=com.docker.compose.project={fed.project}"], capture_output=True, text=True).stdout.split()
            log(f"torn down project {fed.project} (containers left: {len(left)}, volumes left: {len(vols)})")
            assert not left and not vols


def _wait_for(fed: ComposeFederation, pred, what: str, timeout: float):
    deadline = time.time() + timeout
    while True:
        recs = fed.records(RUN_DIR)
        if pred(recs):
            return recs
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; records: {recs}\n{fed.logs('superexec-serverapp')[-4000:]}")
        time.sleep(3)


def _wait_for_status(fed: ComposeFederation, i: int, status: str, timeout: float = 300) -> None:
    """Until the SuperLink lists node i (``flwr supernode list``) as ``status`` (online, offline, ...)."""
    deadline, now = time.time() + timeout, ""
    while now != status:
        assert time.time() < deadline, f"node {i} ({fed.node_ids.get(i)}) is {now!r}, not {status!r}, after {timeout:.0f} s"
        time.sleep(1)
        res = fed.flwr("supernode", "list", "fedsb-docker", "--format", "json", timeout=60)
        nodes = json.loads(res.stdout).get("nodes", []) if res.stdout.strip().startswith("{") else []
        now = next((n["status"] for n in nodes if n["node-id"] == fed.node_ids.get(i)), "")


def _train(recs, rnd):
    return next((r for r in recs if r["phase"] == "train" and r["round"] == rnd), None)


def test_tls_auth_federation_in_containers_survives_a_restarted_supernode(federation, workdir):
    fed = federation
    t0 = time.time()
    fed.make_certs()
    fed.start_superlink()
    for i in range(fed.num_nodes):
        res = fed.register(i)
        assert res.returncode == 0, res.stdout + res.stderr
    fed.start_intruder()  # a SuperNode whose key was never registered
    fed.up()
    run_id = fed.start_run(RUN_CONFIG)
    log(f"run {run_id} started ({time.time() - t0:.0f} s after the first compose command)")

    # Bounded but generous waits: on 2 cores shared with other work, init + round 1 took 6-15 min here.
    _wait_for(fed, lambda r: _train(r, 1) is not None, "round 1", 2400)
    # `docker stop` ends the SuperNode gracefully (it deactivates itself). The server goes on to round 2
    # meanwhile, and may already have sent node 2 its round-2 message: whether node 2 answers it (before the
    # stop, or after the restart) or is counted failed is a race this test does not decide. What it does
    # make sure of: the SuperLink saw node 2 offline before it came back, and saw it online again. Its
    # executor container and cache volume stay.
    log("round 1 done: stopping supernode-2, waiting for the SuperLink to list it offline, starting it again")
    fed.compose("stop", "supernode-2")
    _wait_for_status(fed, 2, "offline")
    fed.compose("start", "supernode-2")
    _wait_for_status(fed, 2, "online")
    log("supernode-2 is online again")

    deadline = time.time() + 1800
    while not (status := fed.status(run_id)).startswith("finished"):
        assert time.time() < deadline, f"run {run_id} still {status!r}"
        time.sleep(5)
    log(f"run {run_id}: {status} ({time.time() - t0:.0f} s)")
    assert status == "finished:completed", fed.logs("superexec-serverapp")[-4000:]

    # the run directory, out of the `runs` volume
    out = fed.copy_out(RUN_DIR, workdir / "run")
    check = subprocess.run([sys.executable, "-m", "server.cli", "check-run", str(out)], capture_output=True, text=True,
                           env=fed.flwr_env)
    log(check.stdout.strip() + check.stderr.strip())
    assert check.returncode == 0, check.stderr
    adapter = out / "adapter"
    assert adapter.is_dir() and any(f.stat().st_size > 0 for f in adapter.rglob("*") if f.is_file()), list(out.rglob("*"))

    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["round"]: r for r in recs if r["phase"] == "train"}
    summary = json.loads((out / "summary.json").read_text())
    for rnd, r in sorted(train.items()):
        log(f"round {rnd}: clients {r.get('clients')} replies {r.get('replies')} failed {r.get('failed')} "
            f"basis_resent {r.get('basis_resent')} bytes_basis {r.get('bytes_basis')}")
    assert summary["rounds"] == 3
    assert train[1]["replies"] == 3 and train[1]["bytes_basis"] > 0
    # What the product promises about a node lost around round 2: it replied, or it is counted failed (never
    # dropped silently), and the round still updates with the others (min-train-nodes=2).
    assert train[2]["replies"] + train[2]["failed"] == 3 and train[2]["replies"] >= 2 and train[2]["updated"]
    # Round 3 starts after the restart (it waits for 3 available nodes): the restarted SuperNode (same key,
    # so the same node id) takes part again and its reply counts.
    assert train[3]["replies"] == 3 and train[3]["failed"] == 0
    # How the restarted node got its basis back: asked for it (`need-basis`, counted in basis_resent) or
    # was sent it, or loaded it from the cache volume its executor kept (nothing sent after round 1).
    resent = sum(r.get("basis_resent", 0) for r in train.values())
    basis_after = sum(train[r]["bytes_basis"] for r in (2, 3))
    cached = fed.exec("superexec-clientapp-2", "ls", "/cache/basis", check=False).stdout.decode().split()
    log(f"restarted node: basis_resent {resent}, basis bytes sent in rounds 2-3 {basis_after}, its cache volume "
        f"holds {cached} -> {'sent again' if resent or basis_after else 'loaded from its cache volume'}")
    fingerprint = next(r["fingerprint"] for r in recs if r["phase"] == "init")
    assert f"{fingerprint}.safetensors" in cached

    # every node's ClientApp processes were forked by its warm-start process (docker/compose.yml's entrypoint)
    for i in range(fed.num_nodes):
        warm_log = fed.logs(f"superexec-clientapp-{i}")
        log(f"superexec-clientapp-{i}: {warm_log.count('forked pid')} ClientApp processes forked warm")
        assert "warm start: forked pid" in warm_log, warm_log[-2000:]

    # the unregistered key was refused and never took part
    code, intruder_log = fed.intruder_result()
    assert code != 0, intruder_log[-2000:]
    assert "Failed to activate SuperNode" in intruder_log, intruder_log[-2000:]
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in fed.logs("superlink")
    assert not any(r.get("clients", 0) > 3 for r in train.values())
    log(f"passed in {time.time() - t0:.0f} s (after the images were ready)")

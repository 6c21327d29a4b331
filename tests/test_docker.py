"""The docker-compose deployment for real (``make docker-test``; marker ``docker``, deselected by default).

Builds the images here without Docker Hub (lab/docker_harness.py; cached between runs), then runs the
committed ``docker/compose.yml`` + ``docker/compose.tls.yml`` under Compose 1.29 in the parties' shape:
SuperLink + 3 SuperNodes + their executors with TLS and SuperNode authentication, each party's executor
mounting only its own data folder (its own file, named by its node config), a server that holds no data
(``dataset='none'``, federated evaluation), a Fed-SB run started with ``flwr run`` from the host; the
SuperLink and its ServerApp executor killed after a round's checkpoint and started again on their volumes
(state database, run directory), the run submitted again with ``resume=true``; and a SuperNode whose key
was never registered. Everything the test started is removed at the end (``down -v``), also on failure;
the images stay (the cache of the next run). Needs root (dockerd) and a few GiB of disk.
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

from lab.docker_harness import ComposeFederation, build_images, ensure_engine, log, run

pytestmark = pytest.mark.docker

RUN_DIR = "/app/runs/docker-test"  # in the ServerApp executor's `runs` volume
# The bundled default model (in the image); no data on the server: each party trains on its own file and
# evaluation is federated. 3 rounds of a few steps. The round timeout is generous: on 2 busy cores a
# ClientApp process takes 1-2 min to start.
RUN_CONFIG = {
    "dataset": "none", "labels": "neg,pos", "text-column": "text", "label-column": "label", "test-fraction": 0.2,
    "num-server-rounds": 3, "local-steps": 3, "batch-size": 8, "init-samples": 16, "max-length": 32,
    "eval-max-samples": 64, "fraction-train": 1.0, "min-train-nodes": 2, "min-available-nodes": 3,
    "round-timeout": 900.0, "output-dir": RUN_DIR, "seed": 3, "eval-every": 3,  # evaluated before round 1 and after 3
}
PARTY_SIZES = (120, 200, 160)  # each party's own file: a different size and seed
# The round of the checkpoint in the run directory, from its safetensors header (fedsb.run.checkpoint's
# format: the state JSON in the metadata), without importing torch every few seconds in the executor; the
# file is replaced atomically, so it is always whole. -1 while there is none.
CHECKPOINT_ROUND = ("import json, struct, sys\ntry:\n    f = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]\n"
                    "    print(json.loads(json.loads(f.read(n))['__metadata__']['state'])['round'])\n"
                    "except FileNotFoundError:\n    print(-1)")


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


def _write_party_files(fed: ComposeFederation) -> None:
    """Party i's own file in its own folder (only its executor mounts it), named by its node config."""
    from lab.tiny import make_sentiment_csv

    for i, n in enumerate(PARTY_SIZES):
        data = fed.workdir / "parties" / f"supernode-{i}" / "data"
        data.mkdir(parents=True)
        make_sentiment_csv(data / "train.csv", n=n, seed=20 + i).chmod(0o644)
        fed.env[f"FEDSB_NODE_CONFIG_{i}"] = "dataset='/data/train.csv'"


def _checkpoint_round(fed: ComposeFederation) -> int:
    res = fed.exec("superexec-serverapp", "python", "-c", CHECKPOINT_ROUND, f"{RUN_DIR}/checkpoint.safetensors", check=False)
    return int(res.stdout.decode().strip() or -1) if res.returncode == 0 else -1


def _wait_for_run(fed: ComposeFederation, run_id: int, timeout: float) -> str:
    deadline = time.time() + timeout
    while not (status := fed.status(run_id)).startswith("finished"):
        assert time.time() < deadline, f"run {run_id} still {status!r}"
        time.sleep(5)
    return status


def test_parties_in_containers_survive_a_restarted_superlink(federation, workdir):
    fed = federation
    t0 = time.time()
    _write_party_files(fed)
    fed.make_certs()
    fed.start_superlink()
    for i in range(fed.num_nodes):
        res = fed.register(i)
        assert res.returncode == 0, res.stdout + res.stderr
    fed.start_intruder()  # a SuperNode whose key was never registered
    fed.up()
    # each party's executor mounts its own data folder and no other; the server's executor mounts none
    for i in range(fed.num_nodes):
        mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", fed.container(f"superexec-clientapp-{i}")]).stdout)
        parties = {m["Source"] for m in mounts if "/parties/" in m["Source"]}
        assert {p.rsplit("/parties/", 1)[1].split("/")[0] for p in parties} == {f"supernode-{i}"}, parties
    server_mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", fed.container("superexec-serverapp")]).stdout)
    assert not any("/parties/" in m["Source"] for m in server_mounts)
    first = fed.start_run(RUN_CONFIG)
    log(f"run {first} started ({time.time() - t0:.0f} s after the first compose command)")

    # Bounded but generous waits: on 2 cores shared with other work, init + round 1 took 2-15 min here.
    deadline = time.time() + 2400
    while _checkpoint_round(fed) < 1:  # round 1 trained and checkpointed
        assert time.time() < deadline and not fed.status(first).startswith("finished"), fed.logs("superexec-serverapp")[-4000:]
        time.sleep(3)
    # The operator's host goes down: the SuperLink and its ServerApp executor are killed (SIGKILL) and started
    # again on their volumes (the SuperLink's state database, the run directory). The old run's ServerApp is
    # gone; the SuperLink marks that run failed once its task misses Flower's heartbeats (about a minute).
    log("round 1 checkpointed: killing the SuperLink and the ServerApp executor, starting them again")
    fed.compose("kill", "superlink", "superexec-serverapp")
    fed.compose("start", "superlink", "superexec-serverapp")
    fed.start_superlink()  # until it answers over TLS again
    old = _wait_for_run(fed, first, 600)
    assert old != "finished:completed", old
    k = _checkpoint_round(fed)  # what the resume continues from; nobody writes the run directory now
    kept = [r for r in fed.records(RUN_DIR) if r["round"] <= k]
    assert 1 <= k < RUN_CONFIG["num-server-rounds"]
    for i in range(fed.num_nodes):  # the SuperNodes reconnected by themselves (same keys, same node ids)
        _wait_for_status(fed, i, "online")
    second = fed.start_run({**RUN_CONFIG, "resume": True})
    assert second != first  # a new Flower run; fedsb's resume keys on output-dir
    log(f"run {first}: {old}; resumed from round {k} as run {second}")
    status = _wait_for_run(fed, second, 1800)
    log(f"run {second}: {status} ({time.time() - t0:.0f} s)")
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
    assert recs[:len(kept)] == kept  # the rounds up to the checkpoint as written before the kill
    assert [r["round"] for r in recs if r["phase"] == "train"] == [1, 2, 3]  # no round lost or counted twice
    assert [r["phase"] for r in recs].count("init") == 1  # the resume did not initialize again
    assert summary["rounds"] == 3 and summary["final_accuracy"] is not None  # federated: the parties' held-out slices
    # the basis went out once, before round 1 (to the nodes of the initial federated evaluation)
    assert train[1]["replies"] == 3 and summary["bytes_basis_total"] > 0
    assert all(train[r]["replies"] == 3 and train[r]["failed"] == 0 for r in train if r > k)
    # each party trained on its own file less its held-out slice
    counts = sorted(e["train_examples"] for e in summary["node_train_examples"])
    assert counts == sorted(n - round(n * RUN_CONFIG["test-fraction"]) for n in PARTY_SIZES), counts
    # the resumed run is a new Flower run (a node's state is per run): each node took the basis from its
    # cache volume, nothing was sent again
    assert sum(train[r]["bytes_basis"] for r in train if r > k) == 0
    fingerprint = next(r["fingerprint"] for r in recs if r["phase"] == "init")
    for i in range(fed.num_nodes):
        assert f"{fingerprint}.safetensors" in fed.exec(f"superexec-clientapp-{i}", "ls", "/cache/basis").stdout.decode()

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

"""The deployment topology in one place: command lines of SuperLink, SuperNodes and their executors,
the ``flwr`` connection entry, and the docker-compose files generated from the same functions.

``docker/compose.yml`` and ``docker/compose.tls.yml`` are written by ``fedsb compose`` from
``compose_spec``; the loopback tests start the same command lines as real processes. A test keeps the
committed files equal to what this module generates, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml and docker/Dockerfile

FLWR_VERSION = "1.41.0"
APP_IMAGE = "fedsb-superexec:latest"  # built from docker/Dockerfile
# docker/Dockerfile's base: Flower's plain tag carries its newest Python (3.13), outside pyproject's
# requires-python; Flower publishes the superexec image for older Pythons as <version>-py3.X-ubuntu24.04.
SUPEREXEC_BASE = f"flwr/superexec:{FLWR_VERSION}-py3.12-ubuntu24.04"
CERTS_IN_CONTAINER = "/certs"
DATA_IN_CONTAINER, MODEL_IN_CONTAINER = "/data", "/model"


def party_folder(i: int) -> str:
    """Where party i keeps, on its own machine, what only its containers mount (read-only)."""
    return f"./parties/supernode-{i}"


@dataclass(frozen=True)
class Security:
    """TLS (CA + server certificate) and SuperNode authentication (registered ECDSA keys)."""

    tls: bool = False
    auth: bool = False
    certs_dir: str = "certs"

    def ca(self) -> str:
        return f"{self.certs_dir}/ca.crt"


def superlink_args(port: int, sec: Security, database: str, host: str = "127.0.0.1",
                   isolation: str = "subprocess") -> list[str]:
    args = ["flower-superlink", "--host", host, "--port", str(port), "--database", database,
            "--isolation", isolation, "--disable-runtime-dependency-installation"]
    if sec.tls:
        args += ["--ssl-ca-certfile", sec.ca(), "--ssl-certfile", f"{sec.certs_dir}/server.pem",
                 "--ssl-keyfile", f"{sec.certs_dir}/server.key"]
    else:
        args += ["--insecure"]
    if sec.auth:
        args += ["--enable-supernode-auth"]
    return args


def supernode_args(superlink: str, port: int, partition_id: int, num_partitions: int, sec: Security,
                   key: str | None = None, host: str = "127.0.0.1", isolation: str = "subprocess") -> list[str]:
    args = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port),
            "--isolation", isolation, "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    args += ["--root-certificates", sec.ca()] if sec.tls else ["--insecure"]
    if sec.auth:
        if key is None:
            raise ValueError("supernode authentication needs a private key")
        args += ["--auth-supernode-private-key", key]
    return args


def superexec_args(runtime_api: str, sec: Security) -> list[str]:
    """The executor of a process-isolated SuperLink (runs the ServerApp) or SuperNode (the ClientApp)."""
    args = ["flower-superexec", "--runtime-api-address", runtime_api]
    return args + (["--root-certificates", sec.ca()] if sec.tls else ["--insecure"])


def connection_toml(name: str, address: str, root_ca: str | None) -> str:
    """A ``$FLWR_HOME/config.toml`` entry for ``flwr run . NAME``."""
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_ca}"' if root_ca else "insecure = true")
    return "\n".join(lines) + "\n"


APP_UID = 49999  # the non-root user `app` of Flower's images (and so of the executor image)


# A ClientApp executor starts its node's warm-start process (client/warm_start.py) beside Flower's executor:
# the executor starts `flwr-clientapp` for each message, and the shim first on PATH hands it to the warm
# process, which forks it with torch and transformers already imported (or runs the real one while the warm
# process is still importing). `$$` is a literal `$` in compose files.
WARM_SOCKET = "/tmp/fedsb-warm/warm.sock"
WARM_ENTRYPOINT = ["sh", "-c", f"export FEDSB_WARM_SOCKET={WARM_SOCKET} PATH=/tmp/fedsb-warm/bin:$$PATH; "
                   "fedsb warm-clientapp & exec flower-superexec \"$$@\"", "flower-superexec"]


# A ClientApp executor (Flower's SuperExec) asks its SuperNode for a new task once a second by default, so
# each message waits up to that tick before its process starts. FLWR_SUPEREXEC_TASK_POLL_INTERVAL is
# flwr 1.41's own setting for it (0.01 to 60 s); 0.1 s costs ten requests a second to the SuperNode on the
# local network and saves up to 0.9 s of waiting a message (not measured apart: BENCHMARKS.md, "Deployment
# round vs simulation round").
EXECUTOR_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def compose_spec(num_nodes: int, tls: bool, context: str = "..") -> dict:
    """docker compose services: SuperLink + ServerApp executor, N SuperNodes + ClientApp executors.

    Process isolation: the SuperLink and SuperNodes (Flower's own images, entrypoint = the binary) hand
    the apps to executor containers built from docker/Dockerfile (Flower's superexec image + torch CPU +
    fedsb). ``tls=True`` gives the overlay for ``compose.tls.yml``: the same services with TLS and
    SuperNode authentication flags, certificate volumes, and a one-shot ``certs`` service.

    The files run unchanged under Compose 1.29 (Debian's ``docker-compose``) and Compose v2: no top-level
    ``name`` (1.29 rejects it; ``.env`` beside the files names the project), ``depends_on`` always in the
    long form so the overlay merges with the base file. Named volumes hold the SuperLink state, the run
    directories and each node's cache. Flower's images run as uid 49999, which does not own a fresh
    volume or bind mount: the one-shot ``state-init`` gives it the SuperLink's state volume, and ``certs``
    gives it the private keys (0600, one folder per party: each container mounts its own and nothing else;
    the CA key is never written). Each ClientApp executor mounts its party's ``parties/supernode-i/data``
    (and ``model``) read-only; ``FEDSB_NODE_CONFIG_i`` replaces the demo's partition with the party's own
    node config, ``FEDSB_SUPERLINK`` the address a SuperNode dials. A SuperNode's executor reaches its SuperNode on the
    compose network without TLS (port 9094 is not published; the SuperNode has no certificate of its
    own); every link to the SuperLink is TLS in the overlay.
    """
    from fedsb.ops.certs import PUBLIC_DIR, SUPERLINK_DIR, supernode_dir

    sec = Security(tls=tls, auth=tls, certs_dir=CERTS_IN_CONTAINER)
    env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "FEDSB_CACHE_DIR": "/cache"}

    def certs(party: str) -> list[str]:  # a container mounts its own party's folder of ./certs, nothing else
        return [f"./certs/{party}:{CERTS_IN_CONTAINER}:ro"] if tls else []

    started = {"condition": "service_started"}
    done = {"condition": "service_completed_successfully"}
    services: dict = {}
    if tls:
        # The one-shot CA: it writes one folder per party, private keys 0600 owned by the containers' user, and
        # never writes the CA key. The SuperLink certificate names the host parties dial (FEDSB_SUPERLINK_HOST/_IP).
        services["certs"] = {
            "image": APP_IMAGE, "user": "root", "volumes": [f"./certs:{CERTS_IN_CONTAINER}"],
            "entrypoint": ["fedsb", "certs", "--out", CERTS_IN_CONTAINER, "--nodes", str(num_nodes), "--host", "superlink",
                           "--host", "${FEDSB_SUPERLINK_HOST:-localhost}", "--ip", "${FEDSB_SUPERLINK_IP:-127.0.0.1}",
                           "--keep-existing", "--by-party", "--owner", str(APP_UID), "--no-ca-key"],
        }
    else:
        services["state-init"] = {
            "image": f"flwr/superlink:{FLWR_VERSION}", "user": "root", "volumes": ["superlink-state:/state"],
            "entrypoint": ["chown", f"{APP_UID}:{APP_UID}", "/state"],
        }
    services["superlink"] = {
        "image": f"flwr/superlink:{FLWR_VERSION}",
        "command": superlink_args(9093, sec, "/state/state.db", host="0.0.0.0", isolation="process")[1:],
        "ports": None if tls else ["${FEDSB_SUPERLINK_PORT:-9093}:9093"],
        "volumes": certs(SUPERLINK_DIR) or ["superlink-state:/state"],
        "depends_on": {"certs": done} if tls else {"state-init": done},
    }
    services["superexec-serverapp"] = {
        "image": APP_IMAGE, "build": None if tls else {"context": context, "dockerfile": "docker/Dockerfile"},
        "command": superexec_args("superlink:9093", sec)[1:],
        "volumes": certs(PUBLIC_DIR) or ["runs:/app/runs"], "environment": None if tls else env,
        "depends_on": None if tls else {"superlink": started},
    }
    for i in range(num_nodes):
        key = f"{CERTS_IN_CONTAINER}/sn{i}" if tls else None
        command = supernode_args("${FEDSB_SUPERLINK:-superlink:9093}", 9094, i, num_nodes, sec, key=key, host="0.0.0.0",
                                 isolation="process")[1:]
        # a party's own node config (e.g. its data file) replaces the simulation-style partition of the demo
        command[command.index("--node-config") + 1] = f"${{FEDSB_NODE_CONFIG_{i}:-partition-id={i} num-partitions={num_nodes}}}"
        services[f"supernode-{i}"] = {
            "image": f"flwr/supernode:{FLWR_VERSION}", "command": command,
            "volumes": certs(supernode_dir(i)), "depends_on": None if tls else {"superlink": started},
        }
        if not tls:  # the overlay leaves the ClientApp executors as they are (see the docstring)
            own = party_folder(i)
            services[f"superexec-clientapp-{i}"] = {
                "image": APP_IMAGE, "entrypoint": WARM_ENTRYPOINT,
                "command": superexec_args(f"supernode-{i}:9094", Security())[1:],
                # the party's data (and, if its node config names it, its model copy), read-only, its own only
                "volumes": [f"cache-{i}:/cache", f"{own}/data:{DATA_IN_CONTAINER}:ro", f"{own}/model:{MODEL_IN_CONTAINER}:ro"],
                "environment": {**env, **EXECUTOR_ENV}, "depends_on": {f"supernode-{i}": started},
            }
    for svc in services.values():
        for k in [k for k, v in svc.items() if v in (None, [])]:
            del svc[k]
    if tls:  # an overlay: only what changes (compose replaces `command`, merges volumes and depends_on)
        return {"services": services}
    volumes = {"superlink-state": {}, "runs": {}, **{f"cache-{i}": {} for i in range(num_nodes)}}
    return {"services": services, "volumes": volumes}


PROJECT_ENV = "# Generated by `fedsb compose`: names the compose project (Compose 1.29 has no top-level `name:`).\n" \
              "COMPOSE_PROJECT_NAME=fedsb\n"


def write_compose(out_dir: str | Path, num_nodes: int = 3) -> list[Path]:
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the image builds from this checkout (docker/Dockerfile copies it), relative to where the files go
    context = Path(os.path.relpath(PROJECT_ROOT, out.resolve())).as_posix()
    header = "# Generated by `fedsb compose` from fedsb/ops/deploy.py; edit that, not this file.\n"
    written = []

    class NoAliases(yaml.SafeDumper):  # write shared values out in full: no &id001 / *id001 in the files
        def ignore_aliases(self, data):
            return True

    for name, tls in (("compose.yml", False), ("compose.tls.yml", True)):
        path = out / name
        path.write_text(header + yaml.dump(compose_spec(num_nodes, tls, context), Dumper=NoAliases, sort_keys=False, width=120))
        written.append(path)
    (out / ".env").write_text(PROJECT_ENV)
    return written + [out / ".env"]

"""The deployment topology in one place: command lines of SuperLink, SuperNodes and their executors,
the ``flwr`` connection entry, and the docker-compose files generated from the same functions.

``docker/compose.yml`` and ``docker/compose.tls.yml`` are written by ``fedsb compose`` from
``compose_spec``; the loopback tests start the same command lines as real processes. A test keeps the
committed files equal to what this module generates, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FLWR_VERSION = "1.41.0"
APP_IMAGE = "fedsb-superexec:latest"  # built from docker/Dockerfile
CERTS_IN_CONTAINER = "/certs"


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


def compose_spec(num_nodes: int, tls: bool) -> dict:
    """docker compose services: SuperLink + ServerApp executor, N SuperNodes + ClientApp executors.

    Process isolation: the SuperLink and SuperNodes (Flower's own images, entrypoint = the binary) hand
    the apps to executor containers built from docker/Dockerfile (Flower's superexec image + torch CPU +
    fedsb). ``tls=True`` gives the overlay for ``compose.tls.yml``: the same services with TLS and
    SuperNode authentication flags, certificate volumes, and a one-shot ``certs`` service.
    """
    sec = Security(tls=tls, auth=tls, certs_dir=CERTS_IN_CONTAINER)
    env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "FEDSB_CACHE_DIR": "/cache"}
    certs = [f"./certs:{CERTS_IN_CONTAINER}:ro"] if tls else []
    services: dict = {}
    if tls:
        services["certs"] = {
            "image": APP_IMAGE, "entrypoint": ["fedsb"], "volumes": [f"./certs:{CERTS_IN_CONTAINER}"],
            "command": ["certs", "--out", CERTS_IN_CONTAINER, "--nodes", str(num_nodes), "--host", "superlink",
                        "--keep-existing"],
        }
    after_certs = {"certs": {"condition": "service_completed_successfully"}} if tls else {}
    services["superlink"] = {
        "image": f"flwr/superlink:{FLWR_VERSION}",
        "command": superlink_args(9093, sec, "/state/state.db", host="0.0.0.0", isolation="process")[1:],
        "ports": ["9093:9093"], "volumes": ["superlink-state:/state", *certs], "depends_on": after_certs or None,
    }
    services["superexec-serverapp"] = {
        "image": APP_IMAGE, "build": {"context": "..", "dockerfile": "docker/Dockerfile"},
        "command": superexec_args("superlink:9093", sec)[1:],
        "volumes": ["./runs:/app/runs", *certs], "environment": env, "depends_on": ["superlink"],
    }
    for i in range(num_nodes):
        key = f"{CERTS_IN_CONTAINER}/keys/sn{i}" if tls else None
        services[f"supernode-{i}"] = {
            "image": f"flwr/supernode:{FLWR_VERSION}",
            "command": supernode_args("superlink:9093", 9094, i, num_nodes, sec, key=key, host="0.0.0.0",
                                      isolation="process")[1:],
            "volumes": [*certs], "depends_on": ["superlink"],
        }
        services[f"superexec-clientapp-{i}"] = {
            "image": APP_IMAGE, "command": superexec_args(f"supernode-{i}:9094", sec)[1:],
            "volumes": [f"cache-{i}:/cache", *certs], "environment": env, "depends_on": [f"supernode-{i}"],
        }
    for svc in services.values():
        for k in [k for k, v in svc.items() if v in (None, [])]:
            del svc[k]
    if tls:  # an overlay: only what changes (compose replaces `command`, merges volumes)
        return {"services": services}
    volumes = {"superlink-state": {}, **{f"cache-{i}": {} for i in range(num_nodes)}}
    return {"name": "fedsb", "services": services, "volumes": volumes}


def write_compose(out_dir: str | Path, num_nodes: int = 3) -> list[Path]:
    import yaml

    out = Path(out_dir)
    header = "# Generated by `fedsb compose` from fedsb/deploy.py; edit that, not this file.\n"
    written = []
    for name, tls in (("compose.yml", False), ("compose.tls.yml", True)):
        path = out / name
        path.write_text(header + yaml.safe_dump(compose_spec(num_nodes, tls), sort_keys=False, width=120))
        written.append(path)
    return written

"""The docker files agree with fedsb.ops.deploy and with the installed Flower binaries; certificates verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from fedsb.ops.deploy import PROJECT_ENV, compose_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name, tls", [("compose.yml", False), ("compose.tls.yml", True)])
def test_committed_compose_files_are_the_generated_ones(name, tls):
    committed = yaml.safe_load((ROOT / "docker" / name).read_text())
    assert committed == yaml.safe_load(yaml.safe_dump(compose_spec(3, tls))), f"run `fedsb compose` to regenerate {name}"
    assert (ROOT / "docker" / ".env").read_text() == PROJECT_ENV


@pytest.mark.parametrize("tls", [False, True])
def test_compose_files_suit_compose_1_29_and_v2(tls):
    """No top-level `name` (Compose 1.29 rejects it) or `version` (v2 warns); `depends_on` in the long form
    everywhere, so that the overlay's entries merge with the base file's under both."""
    spec = compose_spec(3, tls)
    assert set(spec) <= {"services", "volumes"}
    for svc in spec["services"].values():
        assert isinstance(svc.get("depends_on", {}), dict)
    if not tls:
        assert {"superlink-state", "runs", "cache-0", "cache-2"} <= set(spec["volumes"])


def test_clientapp_executors_poll_for_tasks_at_the_interval_flower_reads(monkeypatch):
    """EXECUTOR_ENV sets the SuperExec's task poll interval under the name flwr reads (a rename in a later
    flwr would silently bring back the 1 s default), and every ClientApp executor of the compose files has it."""
    from flwr.supercore.superexec import run_superexec

    from fedsb.ops.deploy import EXECUTOR_ENV

    for k, v in EXECUTOR_ENV.items():
        monkeypatch.setenv(k, v)
    assert run_superexec._get_task_poll_interval() == float(EXECUTOR_ENV["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) < 1
    executors = {n: s for n, s in compose_spec(3, False)["services"].items() if n.startswith("superexec-clientapp")}
    assert len(executors) == 3
    assert all(s["environment"].items() >= EXECUTOR_ENV.items() for s in executors.values())


# With `make docker-test` (marker docker), not in `make test`: it failed once inside a full CI-style run on a
# heavily loaded machine and passed alone, cause not found; the spec checks above run everywhere.
@pytest.mark.docker
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose (1.29) not installed")
def test_compose_1_29_accepts_the_files():
    """`docker-compose config` validates and merges the files; it needs no Docker engine."""
    d = ROOT / "docker"
    # Debian's docker-compose is a Python program: run it without the test session's environment
    # (PYTHONPATH with this repository, whose docker/ folder could shadow the docker SDK; Ray's variables)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    for files in (["compose.yml"], ["compose.yml", "compose.tls.yml"]):
        args = [a for f in files for a in ("-f", str(d / f))]
        res = subprocess.run(["docker-compose", "--project-directory", str(d), *args, "config", "-q"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=str(d))
        assert res.returncode == 0, res.stderr


@lru_cache
def _help(binary: str) -> str:
    return subprocess.run([str(BIN / binary), "--help"], capture_output=True, text=True, timeout=60).stdout


BINARY_OF_IMAGE = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                   "fedsb-superexec": "flower-superexec"}


@pytest.mark.parametrize("tls", [False, True])
def test_every_flag_is_accepted_by_the_installed_binaries(tls):
    spec = compose_spec(3, tls)
    checked = 0
    for name, svc in spec["services"].items():
        if "entrypoint" in svc:  # one-shot helpers (certificates, volume ownership), not Flower binaries
            continue
        binary = BINARY_OF_IMAGE[svc["image"].split(":")[0]]
        for tok in svc["command"]:
            if tok.startswith("--"):
                assert f"  {tok}" in _help(binary), f"{name}: {binary} does not accept {tok}"
                checked += 1
    assert checked > 20
    services = spec["services"]
    if tls:
        assert "--enable-supernode-auth" in services["superlink"]["command"]
        assert "--auth-supernode-private-key" in services["supernode-2"]["command"]
    else:
        assert "--insecure" in services["superlink"]["command"]
        assert "${FEDSB_NODE_CONFIG_2:-partition-id=2 num-partitions=3}" in services["supernode-2"]["command"]
        assert "--disable-runtime-dependency-installation" in services["superlink"]["command"]


def test_certificates_verify_and_refuse_to_overwrite(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedsb.ops.certs import make_certificates

    files = make_certificates(tmp_path, 2, hostnames=["superlink", "localhost"], ips=["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(files["server.pem"].read_bytes())
    srv.verify_directly_issued_by(ca)
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(i) for i in sans.get_values_for_type(x509.IPAddress)}
    key = load_ssh_private_key(files["keys/sn1"].read_bytes(), None)
    pub = load_ssh_public_key(files["keys/sn1.pub"].read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key().public_numbers() == pub.public_numbers()
    assert files["keys/sn1"].stat().st_mode & 0o077 == 0
    before = files["ca.crt"].read_bytes()
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path, 2)
    assert files["ca.crt"].read_bytes() == before


def _mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of a service's volumes in compose's short syntax."""
    out = []
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def test_each_container_mounts_only_its_own_secrets_and_data(tmp_path):
    """Merged as compose merges the overlay (volumes by target): no service mounts another party's key or the
    CA key; each ClientApp executor mounts its own party's data and model folders read-only, and nobody else's.
    The certs service really writes those folders that way: keys 0600, the CA key nowhere."""
    from fedsb.ops.certs import make_certificates, split_by_party

    base, tls = compose_spec(3, False)["services"], compose_spec(3, True)["services"]
    merged = {}
    for name in base.keys() | tls.keys():
        mounts = {t: (src, ro) for src, t, ro in _mounts(base.get(name, {}))}
        mounts.update({t: (src, ro) for src, t, ro in _mounts(tls.get(name, {}))})
        merged[name] = mounts
    certs_of = {"superlink": "./certs/superlink", "superexec-serverapp": "./certs/public",
                **{f"supernode-{i}": f"./certs/supernode-{i}" for i in range(3)}}
    for name, mounts in merged.items():
        if name == "certs":  # the one-shot CA itself
            continue
        cert_sources = [src for src, _ in mounts.values() if src.startswith("./certs")]
        assert cert_sources == ([certs_of[name]] if name in certs_of else []), (name, cert_sources)
        assert all(mounts["/certs"][1] for _ in cert_sources)
        party_sources = [(src, ro) for src, ro in mounts.values() if src.startswith("./parties")]
        if name.startswith("superexec-clientapp-"):
            i = name.rsplit("-", 1)[1]
            assert sorted(party_sources) == [(f"./parties/supernode-{i}/data", True), (f"./parties/supernode-{i}/model", True)]
        else:
            assert party_sources == []
    assert "--no-ca-key" in tls["certs"]["entrypoint"] and "--by-party" in tls["certs"]["entrypoint"]
    # what `fedsb certs --by-party --no-ca-key` leaves in ./certs, as the certs service runs it
    make_certificates(tmp_path, 3, keep_ca_key=False)
    split_by_party(tmp_path, 3)
    assert not list(tmp_path.rglob("ca.key"))
    for party, keys in {"superlink": {"server.key"}, "public": set(), **{f"supernode-{i}": {f"sn{i}"} for i in range(3)}}.items():
        files = {f.name for f in (tmp_path / party).iterdir()}
        assert files - {"ca.crt", "server.pem"} == keys, (party, files)
        assert all((tmp_path / party / k).stat().st_mode & 0o077 == 0 for k in keys)
    assert not list((tmp_path / "keys").glob("sn?")) and not (tmp_path / "server.key").exists()  # moved, not copied


def test_executor_image_python_is_one_pyproject_allows():
    """docker/Dockerfile's base is Flower's superexec image for a Python that requires-python accepts (the
    plain tag carries Flower's newest Python, 3.13, which it refuses)."""
    import re
    import tomllib

    from packaging.specifiers import SpecifierSet

    from fedsb.ops.deploy import FLWR_VERSION, SUPEREXEC_BASE

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE={SUPEREXEC_BASE}\n" in dockerfile
    tag = re.fullmatch(rf"flwr/superexec:{re.escape(FLWR_VERSION)}-py(3\.\d+)-ubuntu[\d.]+", SUPEREXEC_BASE)
    assert tag, SUPEREXEC_BASE
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(tag.group(1) + ".0"), (requires, SUPEREXEC_BASE)

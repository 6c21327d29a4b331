"""The docker-compose deployment, built and run on this machine without Docker Hub (``make docker-test``).

Images, each skipped when its tag already carries the hash of its inputs (label ``org.fedsb.test.inputs``):

1. ``fedsb-test/debian:bookworm`` -- a minimal Debian made here (``debootstrap --variant=minbase`` +
   ``docker import``).
2. ``flwr/superlink``, ``flwr/supernode``, ``flwr/superexec`` at Flower's version -- test stand-ins for
   Flower's images (docker/test/flwr.Dockerfile), tagged with the official names so that the compose files
   a user runs are exactly the ones tested.
3. ``fedsb-test/superexec-build`` -- a test-only layer (docker/test/build-env.Dockerfile) with this
   machine's CPU torch wheel and CA bundle.
4. ``fedsb-superexec:latest`` -- docker/Dockerfile, unchanged, with ``BASE`` set to layer 3.

Then :class:`ComposeFederation` drives ``docker-compose -f docker/compose.yml -f docker/compose.tls.yml``
in a project directory of its own (its own project name, certificates, volumes and network), and
``down -v`` removes all of it. ``python -m lab.docker_harness`` only builds the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsb.ops.deploy import APP_IMAGE, APP_UID, FLWR_VERSION, supernode_args
from lab.flwr_cli import BIN, ROOT, FlwrCli, free_port

DOCKER_DIR = ROOT / "docker"
CACHE = Path(os.environ.get("FEDSB_DOCKER_CACHE", Path.home() / ".cache" / "fedsb-docker"))
LABEL = "org.fedsb.test.inputs"
DEBIAN_IMAGE = "fedsb-test/debian:bookworm"
BUILD_ENV_IMAGE = f"fedsb-test/superexec-build:{FLWR_VERSION}"
TORCH = "2.13.0"
# docker/Dockerfile copies these (and .dockerignore keeps the context to them): they decide its hash.
APP_INPUTS = ["pyproject.toml", "README.md", "fedsb", "server", "client", "docker/Dockerfile", ".dockerignore"]


def log(msg: str) -> None:
    print(f"[docker-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: list[str], *, check: bool = True, timeout: float | None = 600, env: dict | None = None,
        input: bytes | None = None, cwd: Path | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, timeout=timeout, env=env, input=input, cwd=cwd)
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {res.returncode}:\n{out[-4000:]}")
    if not quiet and os.environ.get("FEDSB_DOCKER_VERBOSE"):
        print(out)
    res.output = out  # type: ignore[attr-defined]
    return res


# -- the engine ------------------------------------------------------------------------------------
def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {packages}: install them (apt-get install {' '.join(packages)}) or run as root")
    log(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "-qq", *packages], env=env, timeout=1200)


def ensure_engine() -> None:
    """dockerd running and docker-compose installed; installs Debian's packages and starts dockerd if not."""
    missing = [pkg for binary, pkg in (("dockerd", "docker.io"), ("docker-compose", "docker-compose"))
               if shutil.which(binary) is None]
    if missing:
        _apt_install(*missing)
    if run(["docker", "info"], check=False, timeout=60, quiet=True).returncode == 0:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"starting dockerd (log: {CACHE / 'dockerd.log'})")
    with open(CACHE / "dockerd.log", "ab") as fh:  # left running: it holds the image cache for the next run
        subprocess.Popen(["dockerd"], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 90
    while run(["docker", "info"], check=False, timeout=60, quiet=True).returncode != 0:
        if time.time() > deadline:
            raise RuntimeError(f"dockerd did not come up: {(CACHE / 'dockerd.log').read_text()[-3000:]}")
        time.sleep(1)


# -- inputs handed to the test builds (never to the images users build) ---------------------------
def ca_bundle() -> Path:
    """The CA bundle this machine's https needs (the one SSL_CERT_FILE names)."""
    for var in ("FEDSB_DOCKER_CA", "SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    for p in (Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pki/tls/certs/ca-bundle.crt")):
        if p.is_file():
            return p
    import certifi

    return Path(certifi.where())


def torch_wheel() -> Path:
    """The CPU build of torch for the images' Python 3.11: $FEDSB_TORCH_WHEEL, or what pip takes here."""
    if os.environ.get("FEDSB_TORCH_WHEEL"):
        return Path(os.environ["FEDSB_TORCH_WHEEL"])
    d = CACHE / "wheels"
    found = sorted(d.glob(f"torch-{TORCH}+cpu-cp311-*.whl"))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        log(f"pip download torch=={TORCH} (the CPU wheel this machine's pip takes) into {d}")
        run([sys.executable, "-m", "pip", "download", f"torch=={TORCH}", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
             "--platform", "manylinux_2_28_x86_64", "-d", str(d)], timeout=1800)
        found = sorted(d.glob(f"torch-{TORCH}+cpu-cp311-*.whl"))
    if not found:
        got = [p.name for p in d.glob("torch-*.whl")]
        raise RuntimeError(f"no CPU torch {TORCH} wheel for cp311 (pip gave {got}): set FEDSB_TORCH_WHEEL to one")
    return found[-1]


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _tree_sha(paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        p = ROOT / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                                                and f.suffix != ".pyc")
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# -- images ----------------------------------------------------------------------------------------
def image_label(tag: str) -> str | None:
    res = run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", tag], check=False, quiet=True)
    if res.returncode != 0:
        return None
    return (json.loads(res.stdout or "null") or {}).get(LABEL)


def image_id(tag: str) -> str:
    return run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], quiet=True).stdout.decode().strip()


def _build(tag: str, dockerfile: Path, context: Path, inputs: str, args: dict | None = None,
           target: str | None = None) -> bool:
    if image_label(tag) == inputs:
        log(f"{tag}: cached (inputs {inputs[:12]})")
        return False
    old = run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], check=False, quiet=True)
    before = old.stdout.decode().strip() if old.returncode == 0 else None
    cmd = ["docker", "build", "--force-rm", "-f", str(dockerfile), "-t", tag, "--label", f"{LABEL}={inputs}"]
    cmd += [f"--build-arg={k}={v}" for k, v in (args or {}).items()]
    cmd += ["--target", target] if target else []
    log(f"{tag}: building ({dockerfile.relative_to(ROOT)}{', target ' + target if target else ''})")
    t0 = time.time()
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"build-{tag.replace('/', '_').replace(':', '_')}.log", "wb") as fh:
        # the classic builder: what Compose 1.29 uses, and it needs no buildx plugin
        res = subprocess.run([*cmd, str(context)], stdout=fh, stderr=subprocess.STDOUT, timeout=3600,
                             env=dict(os.environ, DOCKER_BUILDKIT="0"))
    if res.returncode != 0:
        raise RuntimeError(f"docker build of {tag} failed:\n{Path(fh.name).read_text(errors='replace')[-4000:]}")
    log(f"{tag}: built in {time.time() - t0:.0f} s")
    if before and before != image_id(tag):  # the image this one replaced, if nothing else uses it
        run(["docker", "image", "rm", before], check=False, quiet=True)
    return True


def debian_image() -> bool:
    sources = ("deb http://deb.debian.org/debian bookworm main\n"
               "deb http://deb.debian.org/debian bookworm-updates main\n"
               "deb http://deb.debian.org/debian-security bookworm-security main\n")
    inputs = _sha("debootstrap --variant=minbase bookworm", sources)
    if image_label(DEBIAN_IMAGE) == inputs:
        log(f"{DEBIAN_IMAGE}: cached")
        return False
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    t0 = time.time()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "bookworm"
        log(f"{DEBIAN_IMAGE}: debootstrap --variant=minbase bookworm")
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], timeout=1800)
        (rootfs / "etc/apt/sources.list").write_text(sources)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / d).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "--change", f"LABEL {LABEL}={inputs}", "-", DEBIAN_IMAGE],
                             stdin=tar.stdout, capture_output=True, timeout=900)
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise RuntimeError(f"docker import failed: {imp.stderr.decode(errors='replace')}")
    log(f"{DEBIAN_IMAGE}: made in {time.time() - t0:.0f} s")
    return True


def build_images() -> dict[str, float]:
    """Every image of the test, rebuilt only where its inputs changed; returns seconds per step."""
    times: dict[str, float] = {}
    t = time.time()
    debian_image()
    times["debian"] = time.time() - t
    ca = ca_bundle()
    ca_bytes = ca.read_bytes()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="ctx-") as tmp:
        ctx = Path(tmp)
        shutil.copyfile(ca, ctx / "ca.pem")
        # 2. Flower stand-ins, official names
        t = time.time()
        flwr_df = DOCKER_DIR / "test" / "flwr.Dockerfile"
        inputs = _sha(flwr_df.read_bytes(), image_id(DEBIAN_IMAGE), FLWR_VERSION, ca_bytes)
        for target in ("superlink", "supernode", "superexec"):
            _build(f"flwr/{target}:{FLWR_VERSION}", flwr_df, ctx, inputs,
                   {"DEBIAN_IMAGE": DEBIAN_IMAGE, "FLWR_VERSION": FLWR_VERSION}, target=target)
        times["flwr"] = time.time() - t
        # 3. test-only layer: local CPU torch + CA bundle
        t = time.time()
        wheel = torch_wheel()
        env_df = DOCKER_DIR / "test" / "build-env.Dockerfile"
        inputs = _sha(env_df.read_bytes(), image_id(f"flwr/superexec:{FLWR_VERSION}"), wheel.name,
                      str(wheel.stat().st_size), ca_bytes)
        if image_label(BUILD_ENV_IMAGE) != inputs:
            (ctx / "wheels").mkdir()
            try:
                os.link(wheel, ctx / "wheels" / wheel.name)
            except OSError:
                shutil.copyfile(wheel, ctx / "wheels" / wheel.name)
        _build(BUILD_ENV_IMAGE, env_df, ctx, inputs, {"BASE": f"flwr/superexec:{FLWR_VERSION}"})
        times["build-env"] = time.time() - t
    # 4. the project's image, from docker/Dockerfile as users build it, on the test layer
    t = time.time()
    inputs = _sha(_tree_sha(APP_INPUTS), image_id(BUILD_ENV_IMAGE))
    _build(APP_IMAGE, DOCKER_DIR / "Dockerfile", ROOT, inputs, {"BASE": BUILD_ENV_IMAGE})
    times["app"] = time.time() - t
    return times


# -- a federation in containers --------------------------------------------------------------------
@dataclass
class ComposeFederation(FlwrCli):
    """``docker-compose -f docker/compose.yml -f docker/compose.tls.yml`` in a project directory of its own.

    The SuperLink's port is published on 127.0.0.1 only; the containers talk over the project's own
    network, which ``down`` removes with the containers and volumes.
    """

    workdir: Path
    num_nodes: int = 3
    project: str = field(default_factory=lambda: f"fedsb-test-{os.getpid()}")
    federation = "fedsb-docker"

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = dict(os.environ, FEDSB_SUPERLINK_PORT=f"127.0.0.1:{self.port}", COMPOSE_PROJECT_NAME=self.project)
        self.flwr_home = self.make_flwr_home(self.workdir / "flwr-home", self.port, self.workdir / "certs" / "ca.crt")
        self.flwr_env = dict(os.environ, FLWR_HOME=str(self.flwr_home), PYTHONPATH=str(ROOT),
                             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.intruder = f"{self.project}-intruder"
        self.node_ids: dict[int, str] = {}

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return run(["docker-compose", "--project-directory", str(self.workdir), "-p", self.project,
                    "-f", str(DOCKER_DIR / "compose.yml"), "-f", str(DOCKER_DIR / "compose.tls.yml"), *args],
                   check=check, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.decode().strip()

    def exec(self, service: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, *cmd, check=check, timeout=120)

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).output

    # -- steps --------------------------------------------------------------------------------------
    def make_certs(self) -> None:
        self.compose("run", "--rm", "certs")

    def start_superlink(self) -> None:
        self.compose("up", "-d", "superlink")
        deadline = time.time() + 120
        while True:
            res = self.flwr("ls", self.federation, "--format", "json", timeout=60)
            try:  # `flwr ls` exits 0 either way; its JSON says whether the SuperLink answered (over TLS)
                if json.loads(res.stdout).get("success"):
                    return
            except json.JSONDecodeError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"SuperLink not reachable: {res.stdout}{res.stderr}\n{self.logs('superlink')[-3000:]}")
            time.sleep(2)

    def register(self, i: int) -> subprocess.CompletedProcess:
        """``flwr supernode register`` of node i's public key; its node id goes to ``self.node_ids[i]``."""
        res = self.flwr("supernode", "register", str(self.workdir / "certs" / "keys" / f"sn{i}.pub"), self.federation,
                        "--format", "json")
        self.node_ids[i] = str(json.loads(res.stdout)["node-id"]) if res.returncode == 0 else ""
        return res

    def start_intruder(self) -> None:
        """A SuperNode container (the supernode-0 service's image and certificates) with a key nobody registered."""
        from fedsb.ops.certs import make_certificates
        from fedsb.ops.deploy import Security

        keys = self.workdir / "intruder"
        make_certificates(keys, 1)
        os.chown(keys / "keys" / "sn0", APP_UID, APP_UID)
        args = supernode_args("superlink:9093", 9094, 0, self.num_nodes, Security(tls=True, auth=True, certs_dir="/certs"),
                              key="/intruder/sn0", host="0.0.0.0", isolation="process")[1:]
        self.compose("run", "-d", "--no-deps", "--name", self.intruder, "-v", f"{keys / 'keys'}:/intruder:ro",
                     "supernode-0", *args)

    def intruder_result(self, timeout: float = 120) -> tuple[int, str]:
        code = run(["docker", "wait", self.intruder], timeout=timeout).stdout.decode().strip()
        return int(code), run(["docker", "logs", self.intruder], check=False).output

    def up(self) -> None:
        self.compose("up", "-d")

    def records(self, run_dir: str) -> list[dict]:
        res = self.exec("superexec-serverapp", "cat", f"{run_dir}/metrics.jsonl", check=False)
        if res.returncode != 0:
            return []
        return [json.loads(l) for l in res.stdout.decode().splitlines() if l.strip()]

    def copy_out(self, container_path: str, dest: Path) -> Path:
        run(["docker", "cp", f"{self.container('superexec-serverapp')}:{container_path}", str(dest)])
        return dest

    def save_logs(self) -> Path:
        out = CACHE / "logs" / f"compose-{self.project}.log"  # kept after the project directory is gone
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.compose("logs", "--no-color", "--timestamps", check=False).output)
        return out

    def down(self) -> None:
        run(["docker", "rm", "-f", "-v", self.intruder], check=False, quiet=True)
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        # whatever `down` left (e.g. its project directory was gone), by the project's label
        label = f"label=com.docker.compose.project={self.project}"
        for kind, ls, rm in (("container", ["ps", "-aq"], ["rm", "-f", "-v"]), ("volume", ["volume", "ls", "-q"], ["volume", "rm", "-f"]),
                             ("network", ["network", "ls", "-q"], ["network", "rm"])):
            ids = run(["docker", *ls, "--filter", label], check=False, quiet=True).stdout.decode().split()
            if ids:
                run(["docker", *rm, *ids], check=False, quiet=True)


if __name__ == "__main__":
    ensure_engine()
    t0 = time.time()
    print(json.dumps({k: round(v, 1) for k, v in build_images().items()}), f"total {time.time() - t0:.0f} s")

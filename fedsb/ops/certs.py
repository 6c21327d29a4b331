"""``fedsb certs``: a CA, the SuperLink's TLS certificate (with the SANs nodes will dial) and SuperNode
authentication key pairs, all with the ``cryptography`` package.

Files: ``ca.crt``/``ca.key``, ``server.pem``/``server.key``, ``keys/sn{i}`` (OpenSSH private key, what
``flower-supernode --auth-supernode-private-key`` loads) and ``keys/sn{i}.pub`` (OpenSSH public key,
what ``flwr supernode register`` takes). ECDSA P-384 throughout. Private keys are written 0600, and
existing files are never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if private:
        os.chmod(path, 0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsb"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certificates(out_dir: str | Path, num_nodes: int, hostnames: list[str] | None = None,
                      ips: list[str] | None = None, overwrite: bool = False, keep_ca_key: bool = True) -> dict[str, Path]:
    """The CA, the SuperLink's certificate for ``hostnames``/``ips`` (the names parties dial) and ``num_nodes``
    SuperNode key pairs in ``out_dir``. ``keep_ca_key=False`` never writes the CA key (no later certificate
    can be signed, and no file can leak it)."""
    out = Path(out_dir)
    hostnames = list(dict.fromkeys(hostnames or ["superlink", "localhost"]))
    ips = list(dict.fromkeys(ips or ["127.0.0.1", "::1"]))
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedsb CA")).issuer_name(_name("fedsb CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    srv_cert = (
        x509.CertificateBuilder().subject_name(_name(hostnames[0])).issuer_name(ca_cert.subject)
        .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca.crt": (ca_cert.public_bytes(serialization.Encoding.PEM), False),
        "server.pem": (srv_cert.public_bytes(serialization.Encoding.PEM), False),
        "server.key": (_pem_key(srv_key), True),
    }
    if keep_ca_key:
        files["ca.key"] = (_pem_key(ca_key), True)
    for i in range(num_nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        files[f"keys/sn{i}"] = (k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), True)
        files[f"keys/sn{i}.pub"] = (k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                serialization.PublicFormat.OpenSSH) + b"\n", False)
    if not overwrite:  # check all first: a partial set is worse than none
        clash = [n for n in files if (out / n).exists()]
        if clash:
            raise FileExistsError(f"{out} already has {clash}; refusing to overwrite (use --overwrite)")
    for name, (data, private) in files.items():
        _write(out / name, data, private, overwrite=True)
    return {name: out / name for name in files}


# What each party's container may see. The CA key is in none of them: whoever holds it can mint a SuperLink
# certificate that every party trusts, so it stays with the operator who ran `fedsb certs` (or, in the
# single-host compose demo, is never written at all).
PUBLIC_DIR, SUPERLINK_DIR = "public", "superlink"


def supernode_dir(i: int) -> str:
    return f"supernode-{i}"


def split_by_party(out_dir: str | Path, num_nodes: int, owner: int | None = None) -> dict[str, Path]:
    """Lay ``out_dir`` (``make_certificates``' files) out as one folder per party, so that a container mounts
    its own folder and nothing else: ``superlink/`` (ca.crt, server.pem, server.key), ``supernode-i/``
    (ca.crt, sn{i}: that node's private key) and ``public/`` (ca.crt, for the ServerApp executor and the
    ``flwr`` CLI). Private keys are moved, not copied (one copy of each secret), stay 0600 (never group- or
    world-readable) and, with ``owner``, belong to that uid (the user the containers run as)."""
    import shutil

    out = Path(out_dir)
    moves = {SUPERLINK_DIR: {"server.key": "server.key"},
             **{supernode_dir(i): {f"keys/sn{i}": f"sn{i}"} for i in range(num_nodes)}}
    copies = {SUPERLINK_DIR: ["ca.crt", "server.pem"], PUBLIC_DIR: ["ca.crt"],
              **{supernode_dir(i): ["ca.crt"] for i in range(num_nodes)}}
    placed: dict[str, Path] = {}
    for party in copies:
        d = out / party
        d.mkdir(mode=0o755, exist_ok=True)
        for name in copies[party]:
            shutil.copyfile(out / name, d / Path(name).name)
            os.chmod(d / Path(name).name, 0o644)
        for src, dst in moves.get(party, {}).items():
            if (out / src).exists():
                os.replace(out / src, d / dst)
            if not (d / dst).exists():
                raise FileNotFoundError(f"{out / src}: no private key to place in {d}; run `fedsb certs` first")
            os.chmod(d / dst, 0o600)
            if owner is not None:
                os.chown(d / dst, owner, owner)
            placed[f"{party}/{dst}"] = d / dst
    return placed

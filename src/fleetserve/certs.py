"""`fleetserve certs init`: a fleet's own CA and the certificates it signs, for mutual TLS between its processes.

One folder holds ``ca.pem`` (the CA every process trusts), ``ca-key.pem`` (kept to sign more later),
``gateway.pem``/``gateway-key.pem`` and ``worker-N.pem``/``worker-N-key.pem``. Keys are ECDSA P-256, written
readable by their owner only (0600). Every certificate serves both ends of a link (server and client
authentication) and names localhost, 127.0.0.1 and ::1 plus the hosts given, as its processes are dialled.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import InvalidRequestError
from fleetserve.protocol.security import TLS_ENV

DEFAULT_DAYS = 365
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    """One process's TLS files: the CA to trust, its own certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        """The FLEETSERVE_TLS_* variables that point a fleetserve process at these files."""
        return dict(zip(TLS_ENV, (str(self.ca), str(self.cert), str(self.key)), strict=True))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: Sequence[str]):
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOCAL_HOSTS, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(days: int):
    """A new self-signed CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key, name = _key(), _name("fleetserve fleet CA")
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, common_name: str, hosts: Sequence[str], days: int):
    """A certificate for one process, signed by the CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digital signature
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_alt_names(hosts), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file was there before
        f.write(data)


def files_for(folder: Path, name: str) -> CertFiles:
    return CertFiles(folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}-key.pem")


def init_certs(
    folder: str | Path, workers: int = 2, hosts: Sequence[str] = (), days: int = DEFAULT_DAYS
) -> dict[str, CertFiles]:
    """Write a new CA and certificates for ``gateway`` and ``worker-0`` .. ``worker-{workers-1}`` into ``folder``;
    refuse a folder that already holds a CA. Returns each process's files by name."""
    if workers < 0 or days < 1:
        raise InvalidRequestError("--workers must be >= 0 and --days >= 1", "workers")
    root = Path(folder)
    if (root / "ca.pem").exists():
        raise InvalidRequestError(f"{root} already holds a CA (ca.pem): choose an empty folder", "dir")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = make_ca(days)
    _write_key(root / "ca-key.pem", ca_key)
    _write_cert(root / "ca.pem", ca_cert)
    out = {}
    for name in ["gateway", *(f"worker-{i}" for i in range(workers))]:
        key, cert = issue(ca_key, ca_cert, name, hosts, days)
        files = files_for(root, name)
        _write_key(files.key, key)
        _write_cert(files.cert, cert)
        out[name] = files
    return out


def fleet_certs(folder: str | Path, workers: int, hosts: Sequence[str] = ()) -> dict[str, CertFiles]:
    """The gateway's and ``workers`` workers' files in ``folder``: the ones there, or new ones (with a new CA)
    when it holds none."""
    root = Path(folder)
    if not (root / "ca.pem").exists():
        return init_certs(root, workers, hosts)
    out = {name: files_for(root, name) for name in ["gateway", *(f"worker-{i}" for i in range(workers))]}
    missing = [str(f.cert) for f in out.values() if not (f.cert.exists() and f.key.exists())]
    if missing:
        raise InvalidRequestError(f"{root} holds a CA but not these certificates: {', '.join(missing)}", "tls_dir")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="make a CA and certificates for a gateway and N workers")
    init.add_argument("dir", help="folder to write them to (it must hold no CA yet)")
    init.add_argument("--workers", type=int, default=2, help="worker certificates to make (default: 2)")
    init.add_argument(
        "--hosts",
        nargs="*",
        default=[],
        help="more host names or addresses the processes are dialled at (localhost, 127.0.0.1 and ::1 always)",
    )
    init.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default: {DEFAULT_DAYS})")


def run(args: argparse.Namespace) -> int:
    made = init_certs(args.dir, args.workers, args.hosts, args.days)
    root = Path(args.dir)
    print(f"CA: {root / 'ca.pem'} (its key, ca-key.pem, signs more; keep it off the fleet's machines)")
    for name, files in made.items():
        print(f"{name}: --tls-ca {files.ca} --tls-cert {files.cert} --tls-key {files.key}")
    return 0

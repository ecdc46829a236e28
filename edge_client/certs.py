"""``edgedistill certs``: TLS certificates and SuperNode keys for a *test* deployment.

Writes into one new directory (built aside, then moved into place; mode 0700):

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the
  given host names and IP addresses (subjectAltName);
- ``node-1`` / ``node-1.pub`` ...: SuperNode authentication key pairs in the format Flower wants
  (OpenSSH ECDSA P-384, like ``ssh-keygen -t ecdsa -b 384``);
- ``client-1.crt`` / ``client-1.key`` ... (``--clients N``): TLS client certificates signed by the
  CA, for the job service's mutual TLS (``edgedistill serve --client-ca ca.crt``).

Private keys are unencrypted and mode 0600. For production, use your organisation's PKI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
MAX_NODES = 1000


@dataclass(frozen=True)
class CertsPlan:
    """What to generate: SAN hosts of the server certificate, node key pairs, validity."""

    hosts: tuple[str, ...] = DEFAULT_HOSTS
    nodes: int = 2
    days: int = 365
    clients: int = 0


def certs_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--out", required=True, help="directory to create (must not exist unless --overwrite)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs node-1 ... node-N (default 2)")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="NAME_OR_IP",
        help="a name or IP address the SuperLink is reached at (repeatable; default localhost and 127.0.0.1)",
    )
    parser.add_argument("--clients", type=int, default=0, help="job-service client certificates client-1 ... (mTLS)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def certs_main(args: argparse.Namespace) -> int:
    from common.fileio import atomic_write_dir

    plan = make_plan(args.host or DEFAULT_HOSTS, args.nodes, args.days, args.clients)
    out = atomic_write_dir(Path(args.out), lambda tmp: write_certs(tmp, plan), overwrite=args.overwrite)
    nodes = f", node-1 ... node-{plan.nodes} (+ .pub)" if plan.nodes else ""
    clients = f", client-1 ... client-{plan.clients} (.crt/.key)" if plan.clients else ""
    print(f"wrote {out}: ca.crt/ca.key, server.crt/server.key for {', '.join(plan.hosts)}{nodes}{clients}")
    print("  a TEST setup: the private keys have no passphrase; keep ca.key off the devices")
    return 0


def make_plan(hosts: Iterable[str], nodes: int, days: int, clients: int = 0) -> CertsPlan:
    """Validate the command line; a :class:`~common.errors.ConfigError` says what is wrong."""
    hosts = tuple(dict.fromkeys(h.strip() for h in hosts))
    bad = [h for h in hosts if not _valid_host(h)]
    if bad or not hosts:
        raise ConfigError(f"--host {', '.join(map(repr, bad))}: give host names (ASCII, punycode) or IP addresses")
    if not 0 <= nodes <= MAX_NODES or not 0 <= clients <= MAX_NODES:
        raise ConfigError(f"--nodes {nodes} / --clients {clients}: use 0..{MAX_NODES}")
    if not 1 <= days <= 3650:
        raise ConfigError(f"--days {days}: use 1..3650")
    return CertsPlan(hosts=hosts, nodes=nodes, days=days, clients=clients)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(host) and all(c.isascii() and (c.isalnum() or c in ".-*") for c in host)


def write_certs(directory: Path, plan: CertsPlan) -> None:
    """Generate the CA, the server certificate and the node key pairs into ``directory``."""
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, plan.days)
    server_key = _new_key()
    server_cert = _server_certificate(server_key, ca_key, ca_cert, plan.hosts, plan.days)
    _write(directory / "ca.key", _private_pem(ca_key), private=True)
    _write(directory / "ca.crt", _cert_pem(ca_cert))
    _write(directory / "server.key", _private_pem(server_key), private=True)
    _write(directory / "server.crt", _cert_pem(server_cert))
    for i in range(1, plan.nodes + 1):
        private, public = node_key_pair(comment=f"node-{i}")
        _write(directory / f"node-{i}", private, private=True)
        _write(directory / f"node-{i}.pub", public)
    for i in range(1, plan.clients + 1):
        client_key = _new_key()
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        client_cert = _leaf_certificate(client_key, ca_key, ca_cert, f"client-{i}", usage, (), plan.days)
        _write(directory / f"client-{i}.key", _private_pem(client_key), private=True)
        _write(directory / f"client-{i}.crt", _cert_pem(client_cert))


def node_key_pair(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, ``ecdsa-sha2-nistp384 ...`` line)."""
    key = _new_key()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgedistill test deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = _name("edgedistill test CA")
    usage = _key_usage(key_cert_sign=True, crl_sign=True)
    return (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: tuple[str, ...],
    days: int,
) -> x509.Certificate:
    return _leaf_certificate(key, ca_key, ca_cert, hosts[0], [ExtendedKeyUsageOID.SERVER_AUTH], hosts, days)


def _leaf_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    purposes: list,
    hosts: tuple[str, ...],
    days: int,
) -> x509.Certificate:
    """A certificate signed by the CA for ``purposes`` (server or client auth), with SANs when ``hosts``."""
    usage = _key_usage(digital_signature=True, key_agreement=True)
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
    return builder.sign(ca_key, hashes.SHA384())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    names += ("key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(ser.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Create ``path`` (never replace one); private keys are 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

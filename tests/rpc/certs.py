"""Test PKI made at test time: CAs, server and client certificates (EC P-256, valid one day)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from memlong.rpc.tls import TlsConfig


@dataclass(frozen=True)
class Authority:
    """A CA: its key, certificate and the PEM file holding the certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_ca(directory: Path, cn: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    return Authority(
        key, cert, _write(directory / f"{cn}.ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    )


def issue(
    ca: Authority, directory: Path, cn: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path]:
    """A leaf certificate for `cn` valid for server and client auth, SANs `hosts`: (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        _write(directory / f"{cn}.crt", cert.public_bytes(serialization.Encoding.PEM)),
        _write(directory / f"{cn}.key", key_pem),
    )


@dataclass(frozen=True)
class Pki:
    """One trusted CA with a server and a client identity, plus a foreign CA with its own client."""

    server: TlsConfig  # server side: cert/key; trusts `ca` for client certs when client_auth
    client: TlsConfig  # client side: trusts `ca`, presents a client cert signed by it
    anonymous: TlsConfig  # trusts `ca`, presents no certificate
    foreign: TlsConfig  # trusts `ca`, presents a certificate from another CA

    @classmethod
    def create(cls, directory: Path, client_auth: bool) -> Pki:
        ca = make_ca(directory, "memlong-test-ca")
        other = make_ca(directory, "other-ca")
        server_cert, server_key = issue(ca, directory, "server")
        client_cert, client_key = issue(ca, directory, "client")
        foreign_cert, foreign_key = issue(other, directory, "foreign")
        return cls(
            server=TlsConfig(cert=server_cert, key=server_key, ca=ca.pem, client_auth=client_auth),
            client=TlsConfig(cert=client_cert, key=client_key, ca=ca.pem),
            anonymous=TlsConfig(ca=ca.pem),
            foreign=TlsConfig(cert=foreign_cert, key=foreign_key, ca=ca.pem),
        )

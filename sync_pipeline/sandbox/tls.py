"""A throwaway certificate authority for the sandbox's HTTPS endpoints.

Real clients verify TLS; so do ours against the sandbox. ``SandboxCA.create(dir)`` writes a CA key and
certificate (``ca.pem``, the bundle a client trusts via its CA-bundle setting) plus a server certificate
for localhost / 127.0.0.1 signed by it. Files already in the directory are reused, so several sandboxes
(and processes) can share one CA.
"""

from __future__ import annotations

import fcntl
import ipaddress
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = timedelta(days=365)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise generation across processes (pytest-xdist workers sharing one CA directory)."""
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _san(hostnames: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass
class SandboxCA:
    directory: Path
    ca_path: Path  # PEM bundle clients trust
    ca_key_path: Path

    @classmethod
    def create(cls, directory: str | Path) -> SandboxCA:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory, directory / "ca.pem", directory / "ca-key.pem")
        with _dir_lock(directory):
            if not (ca.ca_path.exists() and ca.ca_key_path.exists()):
                ca._generate_ca()
        return ca

    def _generate_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sync-pipeline sandbox CA")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.ca_key_path, key)
        self.ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def server_files(self, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
        """(certificate chain, key) for a server answering on ``hostnames``; generated once per name set."""
        stem = "server-" + "-".join(h.replace(":", "_") for h in hostnames)
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem"
        with _dir_lock(self.directory):
            if not (cert_path.exists() and key_path.exists()):
                self._generate_server(hostnames, cert_path, key_path)
        return cert_path, key_path

    def _generate_server(self, hostnames: tuple[str, ...], cert_path: Path, key_path: Path) -> None:
        ca_key = _load_key(self.ca_key_path)
        ca_cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName(_san(hostnames)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
        )

    def server_context(self, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")) -> ssl.SSLContext:
        cert_path, key_path = self.server_files(hostnames)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
        return ctx

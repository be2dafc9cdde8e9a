"""Certificates as `consul tls ca create` and `consul tls cert create` make them: an ECDSA P-256 CA, and server,
client and CLI certificates it signs, written under Consul's file names (consul-agent-ca.pem, dc1-server-consul-0.pem).

Pure crypto and file writing with the `cryptography` package: it never overwrites a file and never writes a key
readable by anyone but its owner (0600, created with O_EXCL).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shipyard.errors import ShipyardError

CA_FILE, CA_KEY_FILE = "consul-agent-ca.pem", "consul-agent-ca-key.pem"
KINDS = ("server", "client", "cli")


class CertificateError(ShipyardError):
    status = 400


@dataclass
class CertRequest:
    """What `tls cert create` is asked for; names and addresses are added to the ones Consul always puts in."""

    kind: str  # server | client | cli
    datacenter: str = "dc1"
    domain: str = "consul"
    days: int = 365
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    node: str = ""  # server certificates: also <node>.server.<dc>.<domain>

    @property
    def common_name(self) -> str:
        return f"{self.kind}.{self.datacenter}.{self.domain}"

    def all_dns_names(self) -> list[str]:
        names = [self.common_name, "localhost"]
        if self.node and self.kind == "server":
            names.append(f"{self.node}.server.{self.datacenter}.{self.domain}")
        return list(dict.fromkeys([*names, *self.dns_names]))

    def all_ips(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        out = [ipaddress.ip_address("127.0.0.1")]
        for text in self.ip_addresses:
            try:
                out.append(ipaddress.ip_address(text.strip()))
            except ValueError:
                raise CertificateError(f"{text!r} is not an IP address") from None
        return list(dict.fromkeys(out))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial() -> int:
    return x509.random_serial_number()


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` with `mode` (never replacing a file that exists, so no CA or key is lost by a second run)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(f"{path} already exists: remove it first or use another directory") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # whatever the umask narrowed or widened


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def build_ca(*, days: int = 1825, domain: str = "consul",
             common_name: str = "") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = _serial()
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"Consul Agent CA {serial}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shipyard"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(serial).not_valid_before(_now() - datetime.timedelta(minutes=1))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def build_cert(request: CertRequest, ca_cert: x509.Certificate,
               ca_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if request.kind not in KINDS:
        raise CertificateError(f"unknown certificate kind {request.kind!r}: use one of {', '.join(KINDS)}")
    key = ec.generate_private_key(ec.SECP256R1())
    # The CLI's certificate only proves who calls; agents' certificates serve and call (Consul's choice).
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if request.kind == "cli" else [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in request.all_dns_names()]
    sans += [x509.IPAddress(ip) for ip in request.all_ips()]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(_serial())
        .not_valid_before(_now() - datetime.timedelta(minutes=1))
        .not_valid_after(_now() + datetime.timedelta(days=request.days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def create_ca_files(directory: str | Path, *, days: int = 1825, domain: str = "consul",
                    common_name: str = "") -> tuple[Path, Path]:
    """Writes consul-agent-ca.pem (0644) and consul-agent-ca-key.pem (0600) into `directory`."""
    folder = Path(directory)
    cert, key = build_ca(days=days, domain=domain, common_name=common_name)
    cert_path, key_path = folder / CA_FILE, folder / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise CertificateError(f"{path} already exists: remove it first or use another directory")
    write_private(key_path, _key_pem(key), 0o600)
    write_private(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def load_ca(ca_file: str | Path, key_file: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertificateError(f"{exc.filename} not found: run `shipyard tls ca create` first "
                               "or name the CA with --ca/--key") from None
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"cannot read the CA from {ca_file} / {key_file}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_file} is not an ECDSA key (this CA was not made by `tls ca create`)")
    return cert, key


def next_cert_paths(directory: Path, request: CertRequest) -> tuple[Path, Path]:
    """dc1-server-consul-0.pem, then -1, -2...: as Consul numbers them, never over an existing file."""
    prefix = f"{request.datacenter}-{request.kind}-{request.domain}"
    index = 0
    while (directory / f"{prefix}-{index}.pem").exists() or (directory / f"{prefix}-{index}-key.pem").exists():
        index += 1
    return directory / f"{prefix}-{index}.pem", directory / f"{prefix}-{index}-key.pem"


def create_cert_files(directory: str | Path, request: CertRequest, *, ca_file: str | Path = CA_FILE,
                      ca_key_file: str | Path = CA_KEY_FILE) -> tuple[Path, Path]:
    folder = Path(directory)
    ca_cert, ca_key = load_ca(folder / ca_file, folder / ca_key_file)
    cert, key = build_cert(request, ca_cert, ca_key)
    cert_path, key_path = next_cert_paths(folder, request)
    write_private(key_path, _key_pem(key), 0o600)
    write_private(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def self_signed(common_name: str, dns_names: list[str], *,
                days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed certificate and key (PEM) for a listener that has none of its own yet (Kong's default)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(_serial()).not_valid_before(_now() - datetime.timedelta(minutes=1))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)

"""Key material of an array's link: an EC P-256 key and a self-signed certificate whose subject
carries the array's name (CN) and serial (serialNumber), so a peer that pins the certificate
also learns, and checks, which array it talks to."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vscsi.config import NAME_RE

VALID_DAYS = 3650


class KeyMaterialError(ValueError):
    """Key material that cannot be made or read; the message is one line naming the file."""


def make_keys(directory: Path, name: str, serial: int) -> tuple[Path, Path]:
    """Write `NAME.key` (0600) and `NAME.crt` in `directory`; never overwrite either."""
    if not NAME_RE.match(name):
        raise KeyMaterialError(f"--name {name!r}: must be 1-32 of A-Z a-z 0-9 _ . -")
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    for p in (key_path, cert_path):
        if p.exists():
            raise KeyMaterialError(f"{p}: already exists (remove it or choose another --dir)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
    ])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, cert_path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Created with its final mode (no moment with wider access), and durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def identity(cert: x509.Certificate) -> tuple[str, int]:
    """The array name and serial a certificate made by `make_keys` names."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(names) != 1 or len(serials) != 1 or not str(serials[0].value).isdigit():
        raise KeyMaterialError("its subject names no array (CN) and serial (serialNumber)")
    return str(names[0].value), int(str(serials[0].value))


def load_cert(path: str) -> x509.Certificate:
    """A PEM certificate file, with a one-line error naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyMaterialError(f"{path}: cannot read certificate ({e.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeyMaterialError(f"{path}: not a PEM certificate") from None


def cert_identity(path: str) -> tuple[str, int]:
    """The array name and serial of a certificate file."""
    cert = load_cert(path)
    try:
        return identity(cert)
    except KeyMaterialError as e:
        raise KeyMaterialError(f"{path}: {e}") from None

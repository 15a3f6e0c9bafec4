"""Credentials for the local provider servers.

A CA, a TLS server certificate, an APNs token-auth key and an FCM service account. Everything is
generated once per directory and reused after that, so a client configured from the files keeps
working across server restarts. Files holding a private key are mode 600.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

APNS_TOPIC = "dev.fanfare.app"
FCM_PROJECT_ID = "fanfare-local"
# Google's real token endpoint: what the service account's JWT assertion names as `aud`.
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
_ID_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True, slots=True)
class LocalCredentials:
    """Where the generated files are, and the ids a client needs next to them."""

    dir: Path
    ca_file: Path
    ca_key_file: Path
    server_cert_file: Path
    server_key_file: Path
    apns_key_file: Path
    apns_key_json: Path
    apns_key_id: str
    apns_team_id: str
    apns_topic: str
    fcm_service_account_file: Path
    fcm_project_id: str
    fcm_client_email: str

    def apns_key_pem(self) -> str:
        """The .p8 key's PEM text (aioapns takes the text, not a path)."""
        return self.apns_key_file.read_text()

    def fcm_token_uri(self) -> str:
        """The token_uri currently written in the service-account file."""
        return str(json.loads(self.fcm_service_account_file.read_text())["token_uri"])


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; a private file is created 600, never readable by others even briefly."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _random_id(n: int = 10) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(n))


def _make_ca(ca_file: Path, ca_key_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fanfare local providers CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(ca_key_file, _pkcs8(key), private=True)
    _write(ca_file, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _make_server_cert(ca_file: Path, ca_key_file: Path, cert_file: Path, key_file: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())  # EC: cheaper handshakes than RSA
    now = datetime.datetime.now(datetime.UTC)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_file, _pkcs8(key), private=True)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _make_apns_key(key_file: Path, key_json: Path) -> None:
    # An APNs token-auth key as Apple hands it out: EC P-256 in a PKCS8 PEM (.p8).
    _write(key_file, _pkcs8(ec.generate_private_key(ec.SECP256R1())), private=True)
    ids = {"key_id": _random_id(), "team_id": _random_id(), "topic": APNS_TOPIC}
    _write(key_json, json.dumps(ids, indent=2).encode() + b"\n", private=False)


def _make_service_account(path: Path, token_uri: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = f"firebase-adminsdk-local@{FCM_PROJECT_ID}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": FCM_PROJECT_ID,
        "private_key_id": secrets.token_hex(20),
        "private_key": _pkcs8(key).decode(),
        "client_email": email,
        "client_id": str(10**20 + secrets.randbelow(9 * 10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    _write(path, json.dumps(info, indent=2).encode() + b"\n", private=True)


def make_local_credentials(dir: Path, *, fcm_token_uri: str | None = None) -> LocalCredentials:
    """Generate what is missing in `dir` and return the set; existing files are reused.

    `fcm_token_uri` (the local server's /token, known once it listens) is written into the
    service-account file when given; keys are never regenerated for it.
    """
    dir.mkdir(parents=True, exist_ok=True)
    ca_file, ca_key = dir / "ca.pem", dir / "ca.key"
    cert_file, key_file = dir / "server.pem", dir / "server.key"
    apns_key, apns_json = dir / "apns_key.p8", dir / "apns_key.json"
    sa_file = dir / "fcm_service_account.json"

    new_ca = not (ca_file.exists() and ca_key.exists())
    if new_ca:
        _make_ca(ca_file, ca_key)
    if new_ca or not (cert_file.exists() and key_file.exists()):
        _make_server_cert(ca_file, ca_key, cert_file, key_file)
    if not (apns_key.exists() and apns_json.exists()):
        _make_apns_key(apns_key, apns_json)
    if not sa_file.exists():
        _make_service_account(sa_file, fcm_token_uri or GOOGLE_TOKEN_URI)
    sa: dict[str, Any] = json.loads(sa_file.read_text())
    if fcm_token_uri is not None and sa.get("token_uri") != fcm_token_uri:
        sa["token_uri"] = fcm_token_uri
        _write(sa_file, json.dumps(sa, indent=2).encode() + b"\n", private=True)
    ids: dict[str, str] = json.loads(apns_json.read_text())
    return LocalCredentials(
        dir=dir,
        ca_file=ca_file,
        ca_key_file=ca_key,
        server_cert_file=cert_file,
        server_key_file=key_file,
        apns_key_file=apns_key,
        apns_key_json=apns_json,
        apns_key_id=ids["key_id"],
        apns_team_id=ids["team_id"],
        apns_topic=ids.get("topic", APNS_TOPIC),
        fcm_service_account_file=sa_file,
        fcm_project_id=str(sa["project_id"]),
        fcm_client_email=str(sa["client_email"]),
    )

"""TLS contexts for both sides, built once per config, and the demo's self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from relay.config import TLSFiles, Upstream

log = logging.getLogger("relay.tls")


def server_context(files: TLSFiles, hostname: str) -> ssl.SSLContext:
    """The listeners' context; makes a self-signed pair first when allowed and missing."""
    if files.self_signed and not (files.cert.exists() and files.key.exists()):
        make_self_signed(files.cert, files.key, hostname)
        log.warning("made a self-signed certificate for %s at %s (demo use only)", hostname, files.cert)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    # TLS 1.3 session tickets: OpenSSL sends two after every handshake. One is enough for a
    # smarthost's session cache (Postfix keeps the latest per destination) to resume, and an
    # application that never resumes pays for one instead of two (docs/decisions.md).
    context.num_tickets = 1
    return context


class ServerTLS:
    """The listeners' TLS, whose certificate a reload replaces without touching open sessions.

    Sockets and STARTTLS keep the first context; its SNI callback (called for every
    handshake, with or without SNI) hands each new handshake to the newest context. A
    certificate that fails to load fails in :func:`server_context`, before anything changes.
    """

    def __init__(self, files: TLSFiles, hostname: str):
        self.context = server_context(files, hostname)
        self._current = self.context
        self.context.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self._current is not context:
            ssl_object.context = self._current

    def install(self, context: ssl.SSLContext) -> None:
        """Serve new handshakes with ``context`` (made by :func:`server_context`)."""
        self._current = context


def upstream_context(upstream: Upstream) -> ssl.SSLContext:
    """Verifying client context: the system store, or ``upstream.ca_file`` for a private CA."""
    context = ssl.create_default_context(cafile=str(upstream.ca_file) if upstream.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def unverified_upstream_context() -> ssl.SSLContext:
    """Encryption without authentication: Postfix's ``may`` and ``encrypt`` TLS policies."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """An EC key and a one-year certificate for ``hostname``, localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = {hostname, "localhost"}
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in sorted(names)] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

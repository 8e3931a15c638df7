"""TLS contexts for both sides, built once per config, and the demo's self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from pathlib import Path

from relay.config import TLSFiles, Upstream

log = logging.getLogger("relay.tls")

# Mozilla's "intermediate" server profile (ssl-config.mozilla.org, guidelines 5.7), what
# `sslyze --mozilla_config intermediate` checks: TLS 1.2 and 1.3; in TLS 1.2 only these AEAD
# suites with forward secrecy, no CBC. TLS 1.3's suites are OpenSSL's three defaults, which are
# the profile's (Python cannot set them). DHE covers RSA-certificate clients without ECDHE-RSA
# with GCM (IE 11 and .NET on Windows 7 / Server 2008 R2, still common among legacy senders).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
# The profile's curves are X25519, prime256v1 and secp384r1; OpenSSL 3's default list adds
# X448 and secp521r1, which sslyze flags. Python 3.11 can set one group only (set_ecdh_curve),
# so the one every client has: prime256v1. A TLS 1.3 client whose first key share is X25519
# (OpenSSL's, Go's) pays one extra round trip (HelloRetryRequest); X25519 alone would lock out
# Java 8 and Windows 7 clients (docs/decisions.md).
ECDH_CURVE = "prime256v1"
# RFC 7919's ffdhe2048 (the profile's DH parameters), for the DHE suites above; without
# parameters OpenSSL offers no DHE suite at all.
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def apply_intermediate_profile(context: ssl.SSLContext) -> None:
    """Mozilla's intermediate profile on a server context: versions, suites, curve, DH group.

    The client's cipher order wins, as the profile says: every suite left is strong, and a
    phone without AES instructions then picks ChaCha20.
    """
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_ecdh_curve(ECDH_CURVE)
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    with tempfile.NamedTemporaryFile(suffix=".pem") as params:  # load_dh_params takes a path only
        params.write(FFDHE2048)
        params.flush()
        context.load_dh_params(params.name)


def server_context(files: TLSFiles, hostname: str) -> ssl.SSLContext:
    """The listeners' context; makes a self-signed pair first when allowed and missing."""
    if files.self_signed and not (files.cert.exists() and files.key.exists()):
        make_self_signed(files.cert, files.key, hostname)
        log.warning("made a self-signed certificate for %s at %s (demo use only)", hostname, files.cert)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    apply_intermediate_profile(context)
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

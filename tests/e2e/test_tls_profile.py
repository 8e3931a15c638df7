"""The listeners' TLS is Mozilla's "intermediate" profile, as sslyze checks it.

Two layers: handshakes from Python's own client, which need nothing else installed (no CBC
suite, no curve outside the profile, the client's cipher order wins), and sslyze's
``--mozilla_config intermediate`` check against a TLS server built from
:func:`relay.tls.server_context` and against the running relay (STARTTLS and implicit TLS).

sslyze is used through its Python API when importable, else its command line (``$SSLYZE`` or
``sslyze`` on PATH: it lives best in a venv of its own, ``pip install sslyze``); without either
the test skips, or fails under ``RELAY_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.config import TLSFiles
from relay.tls import server_context
from tests.support import require_peer

try:
    import sslyze  # noqa: F401
    HAVE_SSLYZE_API = True
except ImportError:
    HAVE_SSLYZE_API = False
SSLYZE_CLI = os.environ.get("SSLYZE") or shutil.which("sslyze")


def leaf_certificate(ca, directory: Path, key_type: str) -> Path:
    """A server certificate the profile accepts, signed by the test CA: 90 days, SAN not
    critical (trustme marks it critical next to a non-empty subject, which the verifier sslyze
    uses rejects), an ECDSA P-256 or RSA 2048 key. Key and chain in one PEM file."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1()) if key_type == "ecdsa" else rsa.generate_private_key(65537, 2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = directory / f"{key_type}.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return path


class TLSServer:
    """Accepts connections, does the handshake with ``context``, greets and closes."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(10)
            with self.context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"hello\r\n")
                tls.recv(1024)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(params=["ecdsa", "rsa"])
def tls_server(request, ca, tmp_path):
    pair = leaf_certificate(ca, tmp_path, request.param)
    server = TLSServer(server_context(TLSFiles(cert=pair, key=pair), "localhost"))
    yield server
    server.close()


def handshake(port: int, ca_file: Path, *, ciphers: str | None = None, curve: str | None = None,
              tls12: bool = False) -> tuple[str, str]:
    """Connect with Python's client; the (version, cipher) agreed, or ssl.SSLError."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        context.set_ciphers(ciphers)
    if curve:
        context.set_ecdh_curve(curve)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.version(), tls.cipher()[0]


# -- handshakes from Python's client ---------------------------------------------------------


@pytest.mark.parametrize("cbc", ["ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256",
                                 "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384",
                                 "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"])
def test_no_cbc_suite_in_tls_1_2(tls_server, ca_file, cbc):
    with pytest.raises(ssl.SSLError):
        handshake(tls_server.port, ca_file, ciphers=cbc, tls12=True)


@pytest.mark.parametrize("curve", ["secp521r1", "X448"])
def test_no_curve_outside_the_profile(tls_server, ca_file, curve):
    with pytest.raises(ssl.SSLError):
        handshake(tls_server.port, ca_file, curve=curve)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_0_and_1_1_are_refused(tls_server, ca_file):
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="localhost")


def test_the_client_s_cipher_order_wins(tls_server, ca_file):
    """Server preference off, as the profile says: a client without AES-NI gets ChaCha20."""
    for first, second in [("AES128-GCM-SHA256", "CHACHA20-POLY1305"), ("CHACHA20-POLY1305", "AES128-GCM-SHA256")]:
        ciphers = ":".join(f"ECDHE-{kind}-{suite}" for suite in (first, second) for kind in ("ECDSA", "RSA"))
        version, cipher = handshake(tls_server.port, ca_file, ciphers=ciphers, tls12=True)
        assert version == "TLSv1.2" and cipher.endswith(first)


def test_dhe_is_offered_with_an_rsa_certificate(ca, ca_file, tmp_path):
    """DHE-RSA with RFC 7919's 2048-bit group: Windows 7's clients have no ECDHE-RSA with GCM."""
    pair = leaf_certificate(ca, tmp_path, "rsa")
    server = TLSServer(server_context(TLSFiles(cert=pair, key=pair), "localhost"))
    try:
        assert handshake(server.port, ca_file, ciphers="DHE-RSA-AES256-GCM-SHA384", tls12=True) == (
            "TLSv1.2", "DHE-RSA-AES256-GCM-SHA384")
    finally:
        server.close()


# -- sslyze --mozilla_config intermediate ------------------------------------------------------


def mozilla_intermediate_issues(port: int, ca_file: Path, starttls: bool = False) -> dict[str, str]:
    """What sslyze's intermediate-profile check finds wrong ({} when compliant)."""
    if HAVE_SSLYZE_API:
        return _issues_from_api(port, ca_file, starttls)
    require_peer(bool(SSLYZE_CLI), "sslyze (its Python API, $SSLYZE or sslyze on PATH)")
    return _issues_from_cli(port, ca_file, starttls)


def _issues_from_api(port: int, ca_file: Path, starttls: bool) -> dict[str, str]:
    from sslyze import (
        ProtocolWithOpportunisticTlsEnum,
        ScanCommandsExtraArguments,
        Scanner,
        ServerNetworkConfiguration,
        ServerNetworkLocation,
        ServerScanRequest,
    )
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )
    from sslyze.plugins.certificate_info.implementation import (
        CertificateInfoExtraArgument,
    )

    network = ServerNetworkConfiguration(
        tls_server_name_indication="localhost",
        tls_opportunistic_encryption=ProtocolWithOpportunisticTlsEnum.SMTP if starttls else None,
    )
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", port), network_configuration=network,
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)),
    )])
    (result,) = scanner.get_results()
    try:
        check_server_against_tls_configuration(result, MozillaTlsConfiguration.get(TlsConfigurationEnum("intermediate")))
    except ServerNotCompliantWithTlsConfiguration as not_compliant:
        return dict(not_compliant.issues)
    return {}


def _issues_from_cli(port: int, ca_file: Path, starttls: bool) -> dict[str, str]:
    command = [SSLYZE_CLI, "--mozilla_config", "intermediate", "--certinfo_ca_file", str(ca_file)]
    command += ["--starttls", "smtp"] if starttls else []
    done = subprocess.run([*command, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300, check=False)
    # "        * ciphers: Cipher suites {...} are supported, but should be rejected."
    issues = dict(re.findall(r"(?m)^\s+\* ([a-z0-9_]+): (.*)$", done.stdout))
    assert done.returncode == (1 if issues else 0), done.stdout[-3000:] + done.stderr[-3000:]
    return issues


def test_sslyze_mozilla_intermediate_passes(tls_server, ca_file):
    assert mozilla_intermediate_issues(tls_server.port, ca_file) == {}


# The test relay's certificate comes from trustme as it is (critical SAN, valid until 3000):
# that is the fixture's, not the profile's; every other finding counts.
FIXTURE_CERTIFICATE = {"certificate_path_validation", "maximum_certificate_lifespan"}


@pytest.mark.parametrize("listener, starttls", [("smtp", True), ("smtps", False)])
def test_the_running_relay_serves_the_profile(relay, ca_file, listener, starttls):
    issues = mozilla_intermediate_issues(relay.port(listener), ca_file, starttls=starttls)
    assert {key: text for key, text in issues.items() if key not in FIXTURE_CERTIFICATE} == {}

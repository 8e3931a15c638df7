"""The formats of secrets the config accepts: password hashes and DKIM private keys.

The config stage validates them when the file is loaded, so a plaintext password or an
unreadable key is a config error with its line; the stages that use them (verification in
:mod:`relay.policy.auth`, signing in :mod:`relay.rewrite.dkim`) read them through these same
functions, so the two can never disagree on what is valid.
"""

from __future__ import annotations

import base64
import binascii
import re


def is_supported_hash(value: str) -> bool:
    return value.startswith("$argon2id$") or parse_scrypt(value) is not None


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def parse_scrypt(value: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = value.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return None
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        parsed = int(params["ln"]), int(params["r"]), int(params["p"]), _b64decode(parts[3]), _b64decode(parts[4])
    except (KeyError, ValueError):
        return None
    log_n, r, p, _, expected = parsed
    if log_n < 1 or r < 1 or p < 1 or not expected:
        return None
    return parsed



def key_algorithm(key: bytes) -> bytes:
    """``rsa-sha256`` for a PEM RSA key, ``ed25519-sha256`` for a base64 ed25519 seed; else ValueError."""
    if b"-----BEGIN" in key:
        from dkim.crypto import UnparsableKeyError, parse_pem_private_key  # dkim pulls in dnspython: only for a key

        try:
            parse_pem_private_key(key)
        except (UnparsableKeyError, ValueError):  # bad base64 inside the PEM is a ValueError
            raise ValueError(
                "not an RSA private key dkimpy can read: use a PKCS#1 PEM key "
                "('BEGIN RSA PRIVATE KEY', as `sendcloud-relay dkim keygen` writes)"
            ) from None
        return b"rsa-sha256"
    try:
        seed = base64.b64decode(key.strip(), validate=True)
    except binascii.Error:
        seed = b""
    if len(seed) != 32:
        raise ValueError("not a DKIM key: expected a PEM RSA key or a base64 ed25519 private key (32 bytes)")
    return b"ed25519-sha256"


_DSN_URI = re.compile(r"^postgres(?:ql)?://")
_DSN_URI_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:/@?#]*:)([^/?#]*)(@)")  # to the last @: the host follows
_DSN_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)()")
_DSN_KEY_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)()")


def _password_patterns(dsn: str) -> tuple[re.Pattern, ...]:
    return (_DSN_URI_PASSWORD, _DSN_QUERY_PASSWORD) if _DSN_URI.match(dsn) else (_DSN_KEY_PASSWORD,)


def dsn_passwords(dsn: str) -> list[str]:
    """The passwords a PostgreSQL DSN holds (URI userinfo, ``?password=``, ``password=`` keyword):
    what the logs must mask."""
    found = [match.group(2).strip("'") for pattern in _password_patterns(dsn) for match in pattern.finditer(dsn)]
    return [password for password in found if password]


def redacted_dsn(dsn: str) -> str:
    """The DSN with every password replaced by ``***``: for a log line or an error that names the database."""
    for pattern in _password_patterns(dsn):
        dsn = pattern.sub(lambda match: match.group(1) + "***" + match.group(3), dsn)
    return dsn


def mask_dsn_passwords(text: str, dsn: str) -> str:
    """``text`` (an error from the database driver) with the DSN's passwords masked."""
    for password in dsn_passwords(dsn):
        text = text.replace(password, "***")
    return text

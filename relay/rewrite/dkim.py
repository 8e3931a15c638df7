"""Optional DKIM signing with dkimpy (rsa-sha256 and ed25519-sha256), off the event loop.

dkimpy's RSA is pure Python and holds the GIL (about 5 ms for a small message, 50 ms at
5 MB), so threads would stall every session: signing runs in a small process pool. It signs
the final bytes, after every rewrite, so nothing the relay changes breaks the signature.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from relay.config import DkimKey
from relay.config.formats import key_algorithm

# Headers SendCloud may rewrite or remove on its side are left out of the signature:
# X-SMTPAPI (consumed by SendCloud; restricted per upstream transaction) is not in dkimpy's
# default list, which is what is signed.
_CANONICALIZE = (b"relaxed", b"relaxed")


def sign(message: bytes, domain: str, selector: str, key: bytes) -> bytes:
    """The DKIM-Signature header field for ``message``, to go before it (runs in a worker process)."""
    import dkim  # here: dkimpy imports dnspython, which a relay that signs nothing never needs

    return dkim.sign(
        message, selector.encode(), domain.encode(), key,
        canonicalize=_CANONICALIZE, signature_algorithm=key_algorithm(key),
    )


def signing_domain(keys: dict[str, DkimKey], from_domain: str) -> str | None:
    """The configured domain that is the From domain or its closest parent (relaxed DMARC alignment)."""
    candidates = [
        domain for domain in keys
        if from_domain.lower() == domain.lower() or from_domain.lower().endswith("." + domain.lower())
    ]
    return max(candidates, key=len) if candidates else None


def generate(algorithm: str, bits: int = 2048) -> bytes:
    """A new private key in the format :func:`sign` reads (``dkim keygen``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(seed) + b"\n"
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def dns_record(key: bytes) -> str:
    """The DNS TXT value (``v=DKIM1; k=...; p=...``) that publishes a private key's public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if key_algorithm(key) == b"ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.strip()))
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
    private = serialization.load_pem_private_key(key, password=None)
    public = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


class Signer:
    """The process pool, started on first use (most relays sign nothing) and closed on shutdown."""

    def __init__(self, workers: int | None = None):
        self._workers = workers or min(2, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    async def sign(self, pieces: Sequence[bytes | memoryview], domain: str, key: DkimKey) -> bytes:
        """The signature header for the message made of ``pieces``.

        The worker needs the message as one object: joined here (one copy), pickled to the
        worker (one more, transient); only the header field comes back.
        """
        if self._pool is None:
            # forkserver: forking this process (an event loop, the spool's threads) is unsafe.
            self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("forkserver"))
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, sign, b"".join(pieces), domain, key.selector, key.key.get_secret_value().encode()
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

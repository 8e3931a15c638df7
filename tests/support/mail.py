"""Reading what arrived at the fake SendCloud: raw header fields, parsed headers, the body."""

from __future__ import annotations

import email
import email.policy
import re

_FIELD = re.compile(rb"^[!-9;-~]+:")


def fields(data: bytes) -> list[bytes]:
    """The raw header fields (continuation lines included, CRLF kept), in order."""
    head = data.split(b"\r\n\r\n", 1)[0]
    head += b"" if head.endswith(b"\r\n") else b"\r\n"
    found: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and found:
            found[-1] += line
        else:
            assert _FIELD.match(line), f"not a header field: {line!r}"
            found.append(line)
    return found


def names(data: bytes) -> list[str]:
    return [field.split(b":", 1)[0].decode() for field in fields(data)]


def body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def added_fields(original: bytes, arrived: bytes) -> list[str]:
    """Names of the fields the relay added; asserts every other field and the body are untouched.

    Each original field must arrive byte for byte, in its original order, and the body must be
    identical: what the relay did not have to change, it did not change.
    """
    assert body(arrived) == body(original)
    before, after = fields(original), fields(arrived)
    for field in before:
        assert field in after, f"{field!r} did not arrive unchanged"
    assert [field for field in after if field in before] == before, "original fields arrived reordered"
    return [field.split(b":", 1)[0].decode() for field in after if field not in before]

"""A message's header section as a list of raw fields, edited on bytes.

Only the fields a rewrite changes are rebuilt; every other field keeps its exact bytes
(folding, encoding, case, even a 998-character line), and the body is never touched, so
DKIM signatures made by earlier hops stay valid.
"""

from __future__ import annotations

import dataclasses
import email.policy
import re
from email.headerregistry import Address

# RFC 5322 field-name: printable US-ASCII except the colon; a field is "name:" then anything.
_FIELD_START = re.compile(rb"^[!-9;-~]+:")
_DECODING = email.policy.default
# SMTP policy with encoded words for non-ASCII text and CRLF line ends, for the fields we write.
_WRITING = email.policy.SMTP.clone(max_line_length=78)


@dataclasses.dataclass(eq=False)  # fields are compared by identity: two equal lines are still two fields
class Field:
    raw: bytes  # "Name: value" with any folded lines and the final CRLF
    _parsed: tuple[bytes, object] | None = dataclasses.field(default=None, init=False, repr=False)  # (raw, parsed())

    @property
    def name(self) -> str:
        return self.raw.split(b":", 1)[0].decode("ascii").strip()

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def raw_value(self) -> bytes:
        """The value's bytes after the colon, folding kept, final CRLF removed."""
        return self.raw.split(b":", 1)[1].removesuffix(b"\r\n")

    def text(self) -> str:
        """The unfolded value as text: encoded words decoded; 8-bit bytes read as UTF-8."""
        return str(self.parsed())

    def parsed(self):
        """The value parsed by the standard library's header classes (``.addresses``, ...).

        Kept for the bytes it was parsed from: rewriting asks for the From twice per message,
        and the email package's parser is the costliest step of an acceptor's rewrite.
        """
        if self._parsed is None or self._parsed[0] is not self.raw:
            value = self.raw_value.decode("utf-8", "surrogateescape")
            value = re.sub(r"\r\n(?=[ \t])", "", value).strip()
            self._parsed = (self.raw, _DECODING.header_factory(self.name, value))
        return self._parsed[1]


# The From of nearly every message: ``a@b``, ``<a@b>`` or ``Some Name <a@b>`` in plain atoms.
# For these the email package's parser (the costliest step of an acceptor's rewrite, ~100 µs)
# gives exactly the parts the regular expression finds; anything else (quotes, comments,
# encoded words, which start with "=?", several addresses, obsolete forms) goes to it.
_WORD = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+"  # RFC 5322 atext without "=" and "?"
_DOT_WORDS = rf"{_WORD}(?:\.{_WORD})*"
_SIMPLE_MAILBOX = re.compile(
    rf"(?:(?P<name>{_WORD}(?: {_WORD})*) ?(?=<))?(?P<open><)?(?P<local>{_DOT_WORDS})@(?P<domain>{_DOT_WORDS})(?(open)>)"
)


def mailbox_addresses(field: Field) -> tuple[Address, ...]:
    """The addresses of an address field (From): the standard library's, by a shortcut for one plain mailbox."""
    value = re.sub(r"\r\n(?=[ \t])", "", field.raw_value.decode("utf-8", "surrogateescape")).strip()
    match = _SIMPLE_MAILBOX.fullmatch(value)
    if match is None:
        return tuple(field.parsed().addresses)
    return (Address(display_name=match["name"] or "", username=match["local"], domain=match["domain"]),)


def make_field(name: str, value: str) -> Field:
    """A new field, folded at 78 characters and RFC 2047-encoded where it is not ASCII."""
    header = _WRITING.header_factory(name, value)
    return Field(header.fold(policy=_WRITING).encode("ascii"))


def raw_field(name: str, value: bytes) -> Field:
    """A field written exactly as given, on one line (never folded)."""
    return Field(name.encode("ascii") + b": " + value + b"\r\n")


class Message:
    """Header fields (editable), then the separator and body bytes exactly as received."""

    def __init__(self, data: bytes | bytearray):
        self.fields: list[Field] = []
        position = 0
        while position < len(data):
            end = data.find(b"\r\n", position)
            end = len(data) if end < 0 else end + 2
            line = bytes(data[position:end])
            if line == b"\r\n":
                break
            if line[:1] in (b" ", b"\t") and self.fields:
                self.fields[-1].raw += line
            elif _FIELD_START.match(line):
                self.fields.append(Field(line))
            else:  # not a header: the header section ended without an empty line
                break
            position = end
        if self.fields and self.fields[-1].raw[-2:] != b"\r\n":  # headers only, no final CRLF
            self.fields[-1].raw += b"\r\n"
        # A body that did not start with an empty line gets one, so it stays the body.
        self._separator = b"" if data.startswith(b"\r\n", position) or position == len(data) else b"\r\n"
        self._body = memoryview(data)[position:]  # a view: the body is never copied here

    def all(self, name: str) -> list[Field]:
        key = name.lower()
        return [field for field in self.fields if field.key == key]

    def first(self, name: str) -> Field | None:
        found = self.all(name)
        return found[0] if found else None

    def remove(self, *names: str) -> None:
        keys = {name.lower() for name in names}
        self.fields = [field for field in self.fields if field.key not in keys]

    def replace(self, old: Field, new: Field) -> None:
        self.fields[self.fields.index(old)] = new

    def pieces(self) -> tuple[bytes, memoryview]:
        """The edited header section (with the separator), and a view of the body as received:
        the spool writes them one after the other, so a large body is never copied."""
        return b"".join([*(field.raw for field in self.fields), self._separator]), self._body

    def bytes(self) -> bytes:
        """The message with its edited header, joined (a copy: for header-sized texts)."""
        return b"".join(self.pieces())

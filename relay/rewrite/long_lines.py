"""No line upstream over 998 octets (RFC 5322 2.1.1), whatever line length a client sent.

Legacy applications send a whole HTML page on one line or a ``To:`` with 300 addresses on
one; SendCloud, like every MTA, refuses lines over 998. :func:`fit_line_length` changes the
least it can, and only where a line is too long:

- a header field is folded before whitespace (RFC 5322 folding: unfolding gives the value
  back, and DKIM's relaxed header canonicalisation does not see the change); a line with no
  whitespace to fold at is broken by inserting CRLF SP, as Postfix's ``smtp_line_length_limit``
  does. ``X-SMTPAPI`` is never touched: SendCloud reads it from one line only;
- a leaf body part with such a line is re-encoded as quoted-printable, losslessly: decoding
  gives back every octet, 8-bit bytes and line breaks included. A ``base64`` part is re-wrapped
  to 76 characters instead (same characters, so every decoder gets the same octets: RFC 2045
  6.8 makes them ignore line breaks), and a ``quoted-printable`` one is decoded and encoded
  again. ``multipart/*`` is entered: delimiters, preamble and epilogue stay byte for byte, and
  only the parts that need it change;
- ``message/*`` parts are leaves: QP-encoded as a whole when a line in them is too long, so
  the enclosed message's own bytes (its DKIM signature, an abuse report's evidence) decode
  back exactly. RFC 2046 5.2.1 allows only 7bit/8bit/binary there; readers decode QP anyway,
  and the alternative, rewriting the enclosed message, would lose what the part is for.

A message with no line over the limit is returned as the same object: it passes byte for
byte. The input has CRLF line ends (see :func:`relay.rewrite.normalise_line_endings`).
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import re
from bisect import bisect_right
from dataclasses import dataclass

LIMIT = 998  # RFC 5322 2.1.1, without the CRLF
QP_WIDTH = 76  # RFC 2045 6.7 (5): encoded lines, the soft-break "=" included
BASE64_WIDTH = 76  # RFC 2045 6.8
FOLD_WIDTH = 78  # RFC 5322 2.1.1's SHOULD, the width folded header lines aim at

_FIELD_START = re.compile(rb"^[!-9;-~]+:")
# Where a header line may fold: before a run of whitespace that follows a non-space and is
# followed by one (a folded line never consists of whitespace only, RFC 5322 3.2.2).
_FOLD_POINT = re.compile(rb"(?<=[^ \t])(?=[ \t]+[^ \t])")
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_QP_CTE = b"Content-Transfer-Encoding: quoted-printable\r\n"
_UNCHANGED_ENCODINGS = ("", "7bit", "8bit", "binary")
_NOT_ON_ONE_LINE = ("x-smtpapi",)  # names (lowercase) never folded: SendCloud's X-SMTPAPI


def fit_line_length(data: bytes, limit: int = LIMIT) -> bytes:
    """``data`` with no line over ``limit`` octets (CRLF excluded); ``data`` itself when none is."""
    if not has_long_line(data, limit):
        return data
    result = _entity(data, limit, "text/plain", top=True)
    return data if result is None else result.data


def has_long_line(data: bytes, limit: int = LIMIT) -> bool:
    """Is any line of ``data`` longer than ``limit``? Steps from the last LF of each window of
    ``limit + 2`` bytes: ten thousand steps for 10 MB rather than a step per line."""
    position, size = 0, len(data)
    while size - position > limit:
        end = data.rfind(b"\n", position, position + limit + 2)
        if end < 0:
            return True
        position = end + 1
    return False


# -- entities -----------------------------------------------------------------------------


@dataclass
class _Result:
    data: bytes
    mime_changed: bool  # a part's content transfer encoding changed: MIME-Version is needed


@dataclass
class _Entity:
    fields: list[bytes]  # raw fields, continuation lines included, each ending CRLF
    separator: bytes  # b"\r\n", or b"" when the header section ended without an empty line
    body: bytes
    unterminated: bool = False  # the last field ended the data without a CRLF (added in fields)


def _split(data: bytes) -> _Entity:
    """Header fields, the empty line, the body; a non-header line also ends the header."""
    fields: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line == b"\r\n":
            return _Entity(fields, b"\r\n", data[end:])
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            break
        position = end
    if fields and not fields[-1].endswith(b"\r\n"):  # a header-only part, before its delimiter
        fields[-1] += b"\r\n"
        return _Entity(fields, b"", b"", unterminated=True)
    return _Entity(fields, b"", data[position:])


def _entity(data: bytes, limit: int, default_type: str, top: bool = False) -> _Result | None:
    """One MIME entity fitted, or None when nothing in it had to change."""
    entity = _split(data)
    headers = _HEADERS.parsebytes(b"".join(entity.fields) + b"\r\n")
    headers.set_default_type(default_type)
    fields = [_fold_field(field, limit) for field in entity.fields]
    changed = any(new is not old for new, old in zip(fields, entity.fields))
    body, mime_changed = entity.body, False

    boundary = headers.get_boundary() if headers.get_content_maintype() == "multipart" else None
    if boundary:
        inner = "message/rfc822" if headers.get_content_subtype() == "digest" else "text/plain"
        fitted = _multipart(entity.body, boundary.encode("ascii", "surrogateescape"), limit, inner)
        if fitted is not None:
            body, mime_changed = fitted.data, fitted.mime_changed
    elif has_long_line(entity.body, limit):
        encoding = str(headers.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding == "base64":
            body = _rewrap_base64(entity.body, min(BASE64_WIDTH, limit // 4 * 4))
        elif encoding == "quoted-printable":
            body = encode_qp(binascii.a2b_qp(entity.body), min(QP_WIDTH, limit))
        elif encoding in _UNCHANGED_ENCODINGS:
            body = encode_qp(entity.body, min(QP_WIDTH, limit))
            fields = _with_qp_encoding(fields, top)
            mime_changed = True
        # else: an encoding we do not know (x-uuencode, ...) cannot be wrapped in another: as is

    if not changed and body is entity.body:
        return None
    if top and mime_changed and headers.get("MIME-Version") is None:
        fields = _insert(fields, b"MIME-Version: 1.0\r\n", top, before="content-")
    separator = entity.separator or (b"\r\n" if body else b"")
    joined = b"".join([*fields, separator, body])
    return _Result(joined[:-2] if entity.unterminated and not body else joined, mime_changed)


def _multipart(body: bytes, boundary: bytes, limit: int, inner_type: str) -> _Result | None:
    """The parts between delimiter lines fitted; delimiters, preamble, epilogue kept as they are."""
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    pieces: list[bytes] = []
    mime_changed = False
    matches = list(_delimiters(delimiter, body))
    if not matches:  # no parts at all: the body is all preamble
        broken = _break_long_lines(body, limit)
        return None if broken is body else _Result(broken, False)
    pieces.append(_break_long_lines(body[: matches[0].start()], limit))  # the preamble
    for current, following in zip(matches, [*matches[1:], None]):
        pieces.append(body[current.start() : current.end()])
        if current.group(1):  # the close delimiter: the rest is epilogue
            pieces.append(_break_long_lines(body[current.end() :], limit))
            break
        end = following.start() if following else len(body)
        region = body[current.end() : end]
        # The CRLF after a delimiter line and the one before the next belong to the delimiters.
        lead = 2 if region.startswith(b"\r\n") else 0
        tail = 2 if following is not None and region.endswith(b"\r\n") and len(region) >= lead + 2 else 0
        part = region[lead : len(region) - tail]
        fitted = _entity(part, limit, inner_type)
        if fitted is not None:
            mime_changed |= fitted.mime_changed
            region = region[:lead] + fitted.data + region[len(region) - tail :]
        pieces.append(region)
    joined = b"".join(pieces)
    return None if joined == body else _Result(joined, mime_changed)


def _delimiters(delimiter: re.Pattern[bytes], body: bytes):
    """Delimiter lines up to and including the close delimiter (later ones are epilogue)."""
    for match in delimiter.finditer(body):
        yield match
        if match.group(1):
            return


# -- header fields ------------------------------------------------------------------------


def _fold_field(field: bytes, limit: int) -> bytes:
    """The field with every line over ``limit`` folded; the same object when none is."""
    if not has_long_line(field, limit):
        return field
    name = field.split(b":", 1)[0]
    if name.strip().decode("ascii", "replace").lower() in _NOT_ON_ONE_LINE:
        return field
    lines = field.removesuffix(b"\r\n").split(b"\r\n")
    folded = [fold_line(line, limit, min(FOLD_WIDTH, limit), first=index == 0) for index, line in enumerate(lines)]
    return b"\r\n".join(folded) + b"\r\n"


def fold_line(line: bytes, limit: int = LIMIT, width: int = FOLD_WIDTH, first: bool = True) -> bytes:
    """One header line over ``limit`` folded, aiming at ``width``: before whitespace where there
    is some (never inside the field name), else broken by inserting CRLF SP (Postfix's way).

    Lines at or under ``limit`` are returned unchanged: only what must change does.
    """
    if len(line) <= limit:
        return line
    colon = line.find(b":") if first else 0
    points = [match.start() for match in _FOLD_POINT.finditer(line) if match.start() > colon]
    pieces: list[bytes] = []
    start, lead = 0, b""  # lead: the SP a hard break put before the next piece
    while len(lead) + len(line) - start > width:
        reach, most = start + width - len(lead), start + limit - len(lead)
        index = bisect_right(points, reach) - 1
        if index >= 0 and points[index] > start:
            cut = points[index]  # the last fold point within the width
        elif index + 1 < len(points) and points[index + 1] <= most:
            cut = points[index + 1]  # else the first one past it, within the limit
        elif len(lead) + len(line) - start <= limit:
            break  # too wide to look nice but short enough: leave it
        else:
            cut = _hard_break(line, start, most)
            pieces.append(lead + line[start:cut])
            start, lead = cut, b" "
            continue
        pieces.append(lead + line[start:cut])
        start, lead = cut, b""
    pieces.append(lead + line[start:])
    return b"\r\n".join(pieces)


def _hard_break(line: bytes, start: int, most: int) -> int:
    """Where to break a run with no whitespace: at ``most``, backed off to the start of a UTF-8
    sequence so that a character is never split across lines."""
    for cut in range(most, max(start + 1, most - 3) - 1, -1):
        if not 0x80 <= line[cut] < 0xC0:
            return cut
    return most


def _with_qp_encoding(fields: list[bytes], top: bool) -> list[bytes]:
    """The fields with one ``Content-Transfer-Encoding: quoted-printable``, in the old one's place."""
    found = [index for index, field in enumerate(fields) if _name(field) == "content-transfer-encoding"]
    if not found:
        return _insert(fields, _QP_CTE, top)
    result = [field for index, field in enumerate(fields) if index not in found[1:]]
    result[found[0]] = _QP_CTE
    return result


def _insert(fields: list[bytes], new: bytes, top: bool, before: str | None = None) -> list[bytes]:
    """A new field before the first whose name starts with ``before``, else at the end of the
    header but before X-SMTPAPI, which SendCloud wants last."""
    for index, field in enumerate(fields):
        name = _name(field)
        if (before and name.startswith(before)) or (top and name in _NOT_ON_ONE_LINE):
            return [*fields[:index], new, *fields[index:]]
    return [*fields, new]


def _name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


# -- bodies -------------------------------------------------------------------------------


def encode_qp(octets: bytes, width: int = QP_WIDTH) -> bytes:
    """Quoted-printable text of ``octets`` that decodes back to exactly them.

    CRLF pairs become the encoded text's line breaks; a bare CR or LF is encoded (=0D, =0A),
    so nothing of the line structure is lost. Lines are at most ``width`` characters, end in
    CRLF, never end in whitespace, and never start with ``-``: a soft break could otherwise
    start a line with ``--boundary`` and end the MIME part early. ``binascii.b2a_qp`` does the
    escaping (in C); it only breaks lines at LF and leaves whitespace before a CR alone, so the
    breaks and the line ends are placed here.
    """
    escaped = binascii.b2a_qp(octets, quotetabs=False, istext=False, header=False)
    # Its soft breaks: "=\r\n" when the data has a CRLF, else "=\n". A literal "=", CR or LF is
    # always escaped (istext=False), so these are never anything else.
    escaped = escaped.replace(b"=\r\n", b"").replace(b"=\n", b"")
    return b"\r\n".join(_wrap_qp_line(line, width) for line in escaped.split(b"=0D=0A"))


def _wrap_qp_line(line: bytes, width: int) -> bytes:
    """One escaped line as soft-broken lines of at most ``width`` characters."""
    if line[-1:] in (b" ", b"\t"):
        line = line[:-1] + (b"=20" if line[-1:] == b" " else b"=09")
    if len(line) <= width and not line.startswith(b"-"):
        return line
    pieces, start = [], 0
    while True:
        lead = b""
        if line[start : start + 1] == b"-":
            lead, start = b"=2D", start + 1
        room = width - len(lead)
        if len(line) - start <= room:
            pieces.append(lead + line[start:])
            return b"\r\n".join(pieces)
        end = start + room - 1  # room for the soft break's "="
        if line[end - 1 : end] == b"=":  # never split an =XX escape
            end -= 1
        elif line[end - 2 : end - 1] == b"=":
            end -= 2
        pieces.append(lead + line[start:end] + b"=")
        start = end


def _rewrap_base64(body: bytes, width: int) -> bytes:
    """The same base64 characters in lines of ``width``; decoders ignore line breaks."""
    text = body.translate(None, b"\r\n")
    lines = [text[index : index + width] for index in range(0, len(text), width)]
    return b"\r\n".join(lines) + (b"\r\n" if body.endswith(b"\r\n") else b"")


def _break_long_lines(text: bytes, limit: int) -> bytes:
    """Preamble and epilogue (which readers ignore): lines over ``limit`` broken with CRLF SP,
    so that no piece can start with ``--`` and pass for a delimiter. Same object if none is."""
    if not has_long_line(text, limit):
        return text
    lines = []
    for line in text.split(b"\r\n"):
        pieces = [line[:limit]]
        pieces += [b" " + line[index : index + limit - 1] for index in range(limit, len(line), limit - 1)]
        lines.append(b"\r\n".join(pieces))
    return b"\r\n".join(lines)

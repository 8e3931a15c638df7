"""relay.rewrite.long_lines: no line over 998 octets upstream, nothing lost, nothing else changed."""

from __future__ import annotations

import binascii
import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.rewrite.long_lines import (
    encode_qp,
    fit_line_length,
    fold_line,
    has_long_line,
)

LIMIT = 998
HEAD = b"From: app@info.acme.com\r\nSubject: hi\r\n"


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def longest(data: bytes) -> int:
    return max(map(len, lines(data)))


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def header_section(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def unfolded(data: bytes, name: bytes) -> bytes:
    """The raw value of header ``name``, unfolded (RFC 5322 3.2.2: remove the CRLFs)."""
    for field in header_section(data).replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t").split(b"\r\n"):
        if field.lower().startswith(name.lower() + b":"):
            return field
    raise AssertionError(f"no {name!r}")


# -- whole messages, as a table ------------------------------------------------------------

LONG_TO = b"To: " + b", ".join(b"user%d@example.com" % n for n in range(200)) + b"\r\n"
HTML = b"<html><body>" + b"<p>hello <b>world</b></p>" * 8000 + b"</body></html>"  # 200 KB, one line
UTF8_TEXT = ("中文 text, ünïcødé " * 200).encode()
SMTPAPI = b"X-SMTPAPI: " + b"eyJ0byI6" * 300 + b"\r\n"
ALTERNATIVE = (
    HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
    b"This is a multi-part message in MIME format.\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nshort plain text\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + HTML + b"\r\n"
    b"--b1--\r\nepilogue\r\n"
)


@pytest.mark.parametrize(
    "name, message, check",
    [
        ("long To: folds at whitespace, nothing else changes", HEAD + LONG_TO + b"\r\nbody\r\n", "to"),
        ("one-line 200 KB HTML becomes QP, Content-Type kept",
         HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + HTML + b"\r\n", "html"),
        ("multipart/alternative: only the long part is re-encoded", ALTERNATIVE, "alternative"),
        ("8-bit UTF-8 text without MIME headers gains MIME-Version and QP",
         HEAD + b"\r\n" + UTF8_TEXT + b"\r\nsecond line\r\n", "utf8"),
        ("a message with Content-Type but no MIME-Version keeps its Content-Type",
         HEAD + b"Content-Type: text/plain; charset=gbk\r\n\r\n" + b"x" * 1500 + b"\r\n", "no-mime"),
    ],
)
def test_long_lines_are_fitted(name, message, check):
    out = fit_line_length(message)
    assert longest(out) <= LIMIT
    parsed, original = parse(out), parse(message)
    if check == "to":
        assert out.split(b"\r\n\r\n", 1)[1] == b"body\r\n"
        assert unfolded(out, b"To") == LONG_TO.removesuffix(b"\r\n")  # folding only inserted CRLFs
        assert longest(header_section(out)) <= 78
        assert parsed["To"].addresses == original["To"].addresses
    elif check == "html":
        assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in header_section(out)  # byte for byte
        assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
        assert parsed.get_payload(decode=True) == HTML + b"\r\n"
        assert longest(out.split(b"\r\n\r\n", 1)[1]) <= 76
    elif check == "alternative":
        plain, html = parsed.get_payload()
        assert plain.get_payload(decode=True) == b"short plain text"
        assert html["Content-Transfer-Encoding"] == "quoted-printable"  # replaced in place
        assert html.get_payload(decode=True) == HTML
        # everything but the HTML part's header and body is byte for byte as it was
        before, after = message.split(HTML), out.split(b"quoted-printable\r\n\r\n")
        assert after[0] == before[0].replace(b"8bit\r\n\r\n", b"")
        assert after[1].endswith(b"\r\n--b1--\r\nepilogue\r\n")
    elif check == "utf8":
        assert parsed["MIME-Version"] == "1.0" and parsed["Content-Transfer-Encoding"] == "quoted-printable"
        assert parsed.get_payload(decode=True) == UTF8_TEXT + b"\r\nsecond line\r\n"
        assert out.startswith(HEAD)  # the new fields go after the existing ones
    elif check == "no-mime":
        assert b"\r\nContent-Type: text/plain; charset=gbk\r\n" in header_section(out) and parsed["MIME-Version"] == "1.0"
        assert parsed.get_payload(decode=True) == b"x" * 1500 + b"\r\n"


@pytest.mark.parametrize(
    "message",
    [
        HEAD + b"\r\nshort body\r\n",
        HEAD + b"X-Long: " + b"a" * 990 + b"\r\n\r\n" + b"b" * LIMIT + b"\r\n",  # exactly at the limit
        HEAD + b"\r\n" + b"\xe4" * LIMIT,  # at the limit, no final CRLF
        b"",
    ],
)
def test_message_within_the_limit_is_the_same_object(message):
    assert fit_line_length(message) is message


def test_x_smtpapi_stays_on_one_line_and_new_fields_go_before_it():
    message = HEAD + SMTPAPI + b"\r\n" + b"y" * 2000 + b"\r\n"
    out = fit_line_length(message)
    assert SMTPAPI in out  # untouched, the only line allowed over the limit
    assert header_section(out).endswith(b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n" + SMTPAPI)
    assert parse(out).get_payload(decode=True) == b"y" * 2000 + b"\r\n"


def test_header_with_no_whitespace_is_broken_by_crlf_sp():
    value = b"k" * 2500
    out = fit_line_length(HEAD + b"X-Token: " + value + b"\r\n\r\nbody\r\n")
    assert longest(out) <= LIMIT
    pieces = unfolded(out, b"X-Token").split(b": ", 1)[1].split(b" ")
    assert b"".join(pieces) == value  # Postfix's CRLF SP: only spaces were added


def test_utf8_header_is_never_broken_inside_a_character():
    value = "主题".encode() * 600  # 3-byte characters, no whitespace
    out = fit_line_length(HEAD.replace(b"Subject: hi", b"Subject: " + value) + b"\r\nbody\r\n")
    for line in lines(header_section(out)):
        line.decode("utf-8")  # every line is whole characters


@pytest.mark.parametrize(
    "encoding, body, decoded",
    [
        ("base64", binascii.b2a_base64(bytes(range(256)) * 10, newline=False),
         bytes(range(256)) * 10),  # base64 on one line: re-wrapped, stays base64
        ("quoted-printable", b"caf=C3=A9 " * 300, "café ".encode() * 300),  # QP with a long line: re-encoded
    ],
)
def test_already_encoded_parts_keep_their_encoding(encoding, body, decoded):
    message = HEAD + f"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode() + body + b"\r\n"
    out = fit_line_length(message)
    assert longest(out) <= 76 + 2 and parse(out)["Content-Transfer-Encoding"] == encoding
    assert parse(out).get_payload(decode=True) == parse(message).get_payload(decode=True)  # what readers see
    assert parse(out).get_payload(decode=True).startswith(decoded)


def test_message_rfc822_part_is_qp_encoded_as_a_whole():
    inner = b"From: x@y\r\nSubject: forwarded\r\n\r\n" + b"z" * 1200 + b"\r\n"
    message = (HEAD + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n'
               b"--m\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--m--\r\n")
    out = fit_line_length(message)
    assert longest(out) <= LIMIT
    part = out.split(b"--m\r\n", 1)[1].split(b"\r\n--m--")[0]
    head, body = part.split(b"\r\n\r\n", 1)
    assert b"Content-Transfer-Encoding: quoted-printable" in head
    assert binascii.a2b_qp(body) == inner  # the enclosed message's bytes, exactly


def test_preamble_and_epilogue_lines_are_broken_so_none_can_pass_for_a_delimiter():
    message = (HEAD + b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n' + b"p" * 1000 + b"--m\r\n"
               b"--m\r\n\r\npart\r\n--m--\r\n" + b"e" * 1500 + b"\r\n")
    out = fit_line_length(message)
    assert longest(out) <= LIMIT
    assert [part.get_payload() for part in parse(out).iter_parts()] == ["part"]


def test_qp_soft_break_never_starts_a_line_with_a_dash():
    """A soft break before ``--m`` inside a long line would end the part right there."""
    line = b"a" * 74 + b"--m" + b"b" * 1000
    message = (HEAD + b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
               b"--m\r\n\r\n" + line + b"\r\n--m\r\n\r\nsecond\r\n--m--\r\n")
    out = fit_line_length(message)
    first, second = parse(out).iter_parts()
    assert first.get_payload(decode=True) == line and second.get_payload() == "second"
    assert not any(piece.startswith(b"-") for piece in lines(out.split(b"--m\r\n")[1].split(b"\r\n\r\n", 1)[1]))


# -- the encoders --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "octets",
    [
        b"trailing space \r\ntrailing tab\t\r\n",
        b".\r\n.leading dot\r\n",
        b"bare\rcr and bare\nlf\r\n",
        b"=3D is not an escape\r\n",
        b"\x00\xff\x80" * 400,
        b"",
        b"\r\n\r\n",
    ],
)
def test_encode_qp_is_lossless_with_short_crlf_lines(octets):
    encoded = encode_qp(octets)
    assert binascii.a2b_qp(encoded) == octets
    for line in lines(encoded):
        assert len(line) <= 76 and line[-1:] not in (b" ", b"\t") and b"\r" not in line and b"\n" not in line


@pytest.mark.parametrize(
    "line, folded",
    [
        (b"Short: value", b"Short: value"),
        (b"To: " + b"a@b.c, " * 200, None),  # checked by the invariants below
        (b"X: " + b"x" * 2000, None),
    ],
)
def test_fold_line(line, folded):
    out = fold_line(line)
    if folded is not None:
        assert out == folded
    assert max(map(len, out.split(b"\r\n"))) <= LIMIT
    assert all(piece[:1] in (b" ", b"\t") for piece in out.split(b"\r\n")[1:])


@pytest.mark.parametrize("data, long", [(b"a" * 998, False), (b"a" * 999, True), (b"a\r\n" * 5000, False),
                                       (b"a" * 998 + b"\r\n" + b"b" * 999 + b"\r\n", True)])
def test_has_long_line(data, long):
    assert has_long_line(data) is long


# -- property: any body, any line lengths ----------------------------------------------------

LINE = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=900, max_size=3000),
    st.text(alphabet="中文 aé-.=\t", min_size=300, max_size=1200).map(str.encode),
).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b""))
BODY = st.lists(LINE, min_size=1, max_size=6).map(b"\r\n".join)


@settings(max_examples=150, deadline=None)
@given(body=BODY, final_crlf=st.booleans())
def test_any_single_part_body_fits_and_decodes_back(body, final_crlf):
    body += b"\r\n" if final_crlf else b""
    message = HEAD + b"\r\n" + body
    out = fit_line_length(message)
    assert longest(out) <= LIMIT
    assert parse(out).get_payload(decode=True) == body
    assert (out is message) is not has_long_line(body)


@settings(max_examples=100, deadline=None)
@given(first=BODY, second=BODY)
def test_any_multipart_body_fits_and_each_part_decodes_back(first, second):
    message = (HEAD + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b"\r\n\r\n'
               b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + first + b"\r\n"
               b"--=_b\r\nContent-Type: application/octet-stream\r\n\r\n" + second + b"\r\n--=_b--\r\n")
    out = fit_line_length(message)
    assert longest(out) <= LIMIT
    parts = list(parse(out).iter_parts())
    assert [part.get_payload(decode=True) for part in parts] == [first, second]

"""rewrite.pipeline.within_line_length: fitted only when a line is over 998, never copied otherwise."""

from __future__ import annotations

from relay.rewrite.long_lines import has_long_line
from relay.rewrite.pipeline import within_line_length


def _pieces(data: bytes, header: bytes) -> tuple[bytes, memoryview]:
    """A new header and a view of ``data``'s body, as rewrite_message gives them."""
    body_start = data.index(b"\r\n\r\n") + 4
    return header, memoryview(data)[body_start:]


def test_a_message_with_no_long_line_passes_as_the_same_pieces():
    data = b"Subject: x\r\n\r\n" + b"short line\r\n" * 1000
    pieces = _pieces(data, b"Subject: x\r\nReceived: from a\r\n\r\n")
    assert within_line_length(data, pieces) is pieces


def test_a_long_body_line_is_fitted():
    data = b"Subject: x\r\n\r\n<html>" + b"a" * 200_000 + b"</html>\r\n"
    (fitted,) = within_line_length(data, _pieces(data, b"Subject: x\r\n\r\n"))
    assert not has_long_line(fitted) and b"quoted-printable" in fitted


def test_a_long_new_header_line_is_fitted():
    data = b"Subject: x\r\n\r\nbody\r\n"
    header = b"To: " + b", ".join(b"user%d@example.net" % n for n in range(200)) + b"\r\n\r\n"
    (fitted,) = within_line_length(data, _pieces(data, header))
    assert not has_long_line(fitted) and fitted.endswith(b"\r\n\r\nbody\r\n")


def test_a_long_line_only_in_the_replaced_header_leaves_the_pieces_alone():
    data = b"From: " + b"x" * 2000 + b"@a.test\r\n\r\nbody\r\n"
    pieces = _pieces(data, b"From: noreply@a.test\r\n\r\n")
    assert within_line_length(data, pieces) is pieces

"""relay.process.spill: a body past SPILL_AT waits in a file, its 8-bit need found on the way in."""

from __future__ import annotations

import pytest

from relay.process.spill import SPILL_AT, ReceivedBody
from relay.spool import FileRegion, is_eight_bit, piece_chunks


@pytest.mark.parametrize(("spilled", "held", "eight_bit"), [
    (b"a", b"b", False),
    (b"\xc3\xbc", b"b", True),  # in the file: known without reading it back
    (b"a", b"\xc3\xbc", True),  # in memory: a view is scanned as ever
])
async def test_a_spilled_body_keeps_its_bytes_in_order_and_knows_its_8bit_need(tmp_path, spilled, held, eight_bit):
    body = ReceivedBody(tmp_path)
    frames = [b"x" * (SPILL_AT // 2) + spilled, b"y" * (SPILL_AT // 2), held]
    try:
        for frame in frames:
            await body.add(frame)
        pieces = body.pieces()
        region = pieces[0]
        assert isinstance(region, FileRegion) and region.eight_bit is (spilled != b"a")
        assert not isinstance(pieces[-1], FileRegion)
        assert b"".join(bytes(chunk) for piece in pieces for chunk in piece_chunks(piece, 100_000)) == b"".join(frames)
        assert is_eight_bit(pieces) is eight_bit
    finally:
        body.close()


def test_a_region_whose_writer_knew_its_8bit_need_is_not_read_for_it(tmp_path):
    with open(tmp_path / "body", "w+b") as file:
        file.write(b"\xff" * 10)
        file.flush()
        assert is_eight_bit([FileRegion(file, 0, 10)])  # unknown: read and scanned
        assert not is_eight_bit([FileRegion(file, 0, 10, eight_bit=False)])  # the writer's word stands

"""`dkim keygen` prints a TXT record a DNS server takes: strings of at most 255 bytes."""

from __future__ import annotations

import re

import pytest

from relay.cli import main
from relay.cli.dkim import zone_text

SPLITS = {
    "short": ("v=DKIM1; k=ed25519; p=abc", '"v=DKIM1; k=ed25519; p=abc"'),
    "exactly_255": ("x" * 255, f'"{"x" * 255}"'),
    "256": ("x" * 256, f'"{"x" * 255}" "x"'),
    "two_and_a_bit": ("y" * 600, f'"{"y" * 255}" "{"y" * 255}" "{"y" * 90}"'),
}


@pytest.mark.parametrize("value, text", SPLITS.values(), ids=SPLITS.keys())
def test_zone_text_splits_into_255_byte_strings(value, text):
    assert zone_text(value) == text


def test_keygen_prints_a_2048_bit_key_as_strings_that_join_to_the_record(tmp_path, capsys):
    assert main(["dkim", "keygen", "acme.com", "--selector", "s1", "--out", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "IN TXT" in line)
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MIIBIjAN")

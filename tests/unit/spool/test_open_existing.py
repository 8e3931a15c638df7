"""The operator's commands open a spool that exists, and never make an empty one where there is none."""

from __future__ import annotations

import pytest

from relay.config import Spool as SpoolSettings
from relay.spool import SpoolMissing, open_spool


async def test_a_missing_spool_is_not_created(tmp_path):
    spool = open_spool(SpoolSettings(path=tmp_path / "var" / "spool.db"), create=False)
    with pytest.raises(SpoolMissing, match="no spool at .*spool.db"):
        await spool.open()
    assert not (tmp_path / "var").exists()


async def test_an_existing_spool_opens_as_usual(tmp_path):
    settings = SpoolSettings(path=tmp_path / "spool.db")
    made = open_spool(settings)
    await made.open()
    await made.close()
    existing = open_spool(settings, create=False)
    await existing.open()
    assert await existing.counts() == {}
    await existing.close()

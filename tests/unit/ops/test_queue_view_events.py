"""`queue show` with SendCloud's events: the spec's JSON shape and the text lines."""

from __future__ import annotations

from relay.ops.queue_view import show_lines, show_record
from relay.spool.events_model import Fate, RecipientEvent
from tests.unit.ops.test_queue_view import DEFERRED, NOW

FATES = {
    0: Fate("invalid", NOW + 20, (
        RecipientEvent("deliver", NOW + 10, ip="10.1.2.3"),
        RecipientEvent("click", NOW + 15, ip="203.0.113.9", url="https://acme.com/x"),
        RecipientEvent("invalid", NOW + 20, sub_stat="406", sub_stat_desc="address does not exist"),
    )),
}


def test_show_record_carries_status_and_events_per_recipient():
    first, second = show_record(DEFERRED, NOW, FATES)["recipients"]
    assert first["status"] == "invalid"
    assert first["events"] == [
        {"event": "deliver", "time": NOW + 10, "ip": "10.1.2.3"},
        {"event": "click", "time": NOW + 15, "ip": "203.0.113.9", "url": "https://acme.com/x"},
        {"event": "invalid", "time": NOW + 20, "subStat": "406", "subStatDesc": "address does not exist"},
    ]
    assert (second["status"], second["events"]) == (None, [])


def test_show_lines_list_the_events_under_their_recipient():
    text = "\n".join(show_lines(DEFERRED, None, NOW, FATES))
    assert "SendCloud status: invalid" in text
    assert "click (ip 203.0.113.9, url https://acme.com/x)" in text
    assert "invalid (subStat 406, subStatDesc address does not exist)" in text
    assert text.count("SendCloud status") == 1

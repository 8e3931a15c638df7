"""The listener's fast paths give exactly what the slow paths they skip would give."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, Session

from relay.smtp.protocol import RelaySMTP
from relay.smtp.session import ListenerHandler
from relay.spool import new_queue_id, use_queue_id_partition

ADDRESSES = [
    "<a@b.c>", "<a@b.c> SIZE=12", "<a.b+c@x-y.example.net>  BODY=8BITMIME", "<a@b.c>\tX", "<a@b>x",
    "<a@b.c> \t SIZE=1 ", "<a@b.c>>", "<a@b.c> (comment) SIZE=1", "<a@b.c>(c)", "<a@[1.2.3.4]>",
    "<a..b@c>", "<.a@c>", "<a.@c>", '<"q"@c>', "<a@b.c", "<@x:a@b>", "<>", " <a@b.c>", "a@b.c",
    "<o'brien!#$%&*+/=?^_`{|}~@x.y>", "<ü@example.com>", "",
]


@pytest.mark.parametrize("arg", ADDRESSES)
@pytest.mark.parametrize("local_part_limit", [0, 3])
def test_mail_and_rcpt_addresses_parse_as_aiosmtpd_parses_them(arg, local_part_limit):
    ours, theirs = RelaySMTP.__new__(RelaySMTP), SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = local_part_limit
    assert ours._getaddr(arg) == theirs._getaddr(arg)


def test_hook_listing_finds_what_a_full_dir_finds():
    """aiosmtpd looks up smtp_*/auth_*/handle_* in dir(); the short listing must miss none."""
    for cls in (RelaySMTP, ListenerHandler):
        full = {name for name in dir(cls) if name.startswith(("smtp_", "auth_", "handle_"))}
        assert set(dir(cls.__new__(cls))) == full


def test_the_kept_ehlo_signature_is_the_hooks_own():
    """aiosmtpd reads the EHLO hook's parameters on every connection: the kept signature must list
    exactly the function's own (5 after self: aiosmtpd's current hook form)."""
    hook = ListenerHandler.handle_EHLO
    names = hook.__code__.co_varnames[: hook.__code__.co_argcount]
    assert list(hook.__signature__.parameters) == list(names)
    assert len(inspect.signature(ListenerHandler.__new__(ListenerHandler).handle_EHLO).parameters) == 5


def test_processes_of_one_relay_never_make_the_same_queue_id():
    try:
        made = []
        for partition in range(3):  # the same millisecond in three processes
            use_queue_id_partition(partition, 3)
            made += [new_queue_id(1_700_000_000.0) for _ in range(2000)]
        assert len(set(made)) == len(made)
    finally:
        use_queue_id_partition(0, 1)


def test_a_session_takes_its_login_without_a_log_record(monkeypatch):
    """aiosmtpd sets ``login_data`` after every successful AUTH; its deprecated property logs each time."""
    logged = []
    monkeypatch.setattr(aiosmtpd.smtp, "log", SimpleNamespace(warning=logged.append))
    session = RelaySMTP.__new__(RelaySMTP)
    session.loop = None
    made = session._create_session()
    made.login_data = "billing"
    assert made.login_data == "billing" and logged == []
    assert vars(Session(None)).keys() <= vars(made).keys()  # everything else aiosmtpd's Session has
    Session(None).login_data = "billing"
    assert logged  # what it saves

"""The Web API listener's pure pieces: the size refusal and the form split (fields, uploads)."""

from __future__ import annotations

import io

import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict, MultiDictProxy

from relay.webapi.answer import status_for_reply
from relay.webapi.request import RequestError
from relay.webapi.server import form_parts, plaintext_off_host, too_big


@pytest.mark.parametrize(("size", "limit", "status"), [(10, 10, None), (11, 10, 413), (0, 10, None)])
def test_a_message_over_max_message_size_is_413(size, limit, status):
    reply = too_big(size, limit)
    assert (status_for_reply(reply) if reply else None) == status


def upload(name: str) -> web.FileField:
    return web.FileField("attachments", name, io.BytesIO(b"data"), "text/plain", CIMultiDict())


def test_form_parts_keep_repeats_and_only_attachments_uploads():
    first, second = upload("a.txt"), upload("b.txt")
    form = MultiDictProxy(MultiDict([
        ("to", "a@example.net"), ("to", "b@example.net"), ("attachments", first), ("other", upload("c.txt")),
        ("attachments", second), ("subject", "主题"),
    ]))
    fields, files = form_parts(form)
    assert fields == {"to": ["a@example.net", "b@example.net"], "subject": ["主题"]}  # a repeat is kept: the parser refuses it
    assert files == [first, second]  # in order; a file under another name is ignored like unknown parameters


def test_text_under_attachments_is_400_not_mail_without_its_files():
    with pytest.raises(RequestError) as refused:
        form_parts(MultiDictProxy(MultiDict([("attachments", "invoice.pdf")])))
    assert refused.value.status == 400


def test_an_empty_attachments_field_is_no_attachment():
    assert form_parts(MultiDictProxy(MultiDict([("attachments", ""), ("to", "a@example.net")]))) == (
        {"to": ["a@example.net"]}, [])


@pytest.mark.parametrize(("listen", "tls", "warned"), [
    ("127.0.0.1:8027", False, False), ("[::1]:8027", False, False), ("localhost:8027", False, False),
    ("0.0.0.0:8027", False, True), ("10.1.2.3:8027", False, True), ("relay.acme.internal:8027", False, True),
    ("0.0.0.0:8027", True, False),
])
def test_plaintext_keys_off_loopback_are_warned_about(listen, tls, warned):
    assert plaintext_off_host(listen, tls) is warned

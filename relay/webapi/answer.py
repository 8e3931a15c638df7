"""SendCloud's JSON answers, and the HTTP status for each SMTP refusal of the pipeline.

Success: ``{"result": true, "statusCode": 200, "message": "请求成功", "info": {"queueId": ID,
"emailIdList": [...]}}``, the shape of SendCloud's answer (``sources/email_v2/send_email.md``)
with the relay's queue ID in place of SendCloud's messageId; ``emailIdList`` is left out when
the request says ``respEmailId=false``. Failure: ``{"result": false, "statusCode": <the HTTP
status>, "message": <why>}`` (SendCloud puts its own 40xxx codes in ``statusCode``; the relay
puts the HTTP status there, as the spec says).

The intake refuses with :class:`~relay.errors.SMTPReply`; :func:`status_for_reply` is the one
table from those replies to the spec's HTTP codes:

=====================================================  ======  ==========================
reply                                                   status  why
=====================================================  ======  ==========================
535 5.7.8, 530, any x.7.8                               401     bad apiUser/apiKey
454 4.7.0 "Too many failed logins ..." (lockout)        429     locked out
454 other (the failure counts could not be asked)       503     try again later
451 4.7.1, 421 4.7.1 (rate limit, too many connections) 429     rate limit
552, any x.3.4                                          413     over ``max_message_size``
other 5.7.x: 553 5.7.1 sender, 554/550 5.7.1            403     not allowed for this user
452 4.5.3 too many recipients                           400     a bound of the request
other 5xx: 550 5.1.1 suppressed, 501 5.1.3, 554 5.6.0   400     the request cannot be sent
other 4xx: 451 4.3.0 spool unavailable, 421 4.3.x       503     try again later
=====================================================  ======  ==========================

A suppressed recipient (550 5.1.1) is a 400: retrying the same request cannot succeed.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.errors import SMTPReply

OK_MESSAGE = "请求成功"  # SendCloud's text for statusCode 200
TEMPLATES_STATUS = 400  # not a 5xx: SDKs and HTTP clients retry those, and this never changes
TEMPLATES_UNAVAILABLE_MESSAGE = (
    "Template sending (/apiv2/mail/sendtemplate) is not available through the relay: "
    "send the rendered content with /apiv2/mail/send"
)


def email_ids(queue_id: str, recipients: Iterable[str]) -> list[str]:
    """``<queueId>.<n>$<address>``, n from 0 in envelope order (to, cc, bcc, or xsmtpapi ``to``).

    SendCloud's own emailId is messageId + n + ``$`` + address with nothing between the
    first two (``sources/guide/rule.md``: its messageIds end in ``-inbound``); the relay's queue
    IDs may end in a digit, so the spec puts a ``.`` there to keep the number unambiguous.
    """
    return [f"{queue_id}.{index}${address}" for index, address in enumerate(recipients)]


def success(queue_id: str, email_ids: list[str] | None) -> dict:
    """The 200 answer; ``email_ids=None`` (``respEmailId=false``) leaves out ``emailIdList``."""
    info: dict = {"queueId": queue_id}
    if email_ids is not None:
        info["emailIdList"] = list(email_ids)
    return {"result": True, "statusCode": 200, "message": OK_MESSAGE, "info": info}


def failure(status: int, message: str) -> dict:
    """The answer for HTTP ``status``: ``statusCode`` repeats it."""
    return {"result": False, "statusCode": status, "message": message}


def templates_unavailable() -> dict:
    """The answer to ``/apiv2/mail/sendtemplate``, with HTTP :data:`TEMPLATES_STATUS`."""
    return failure(TEMPLATES_STATUS, TEMPLATES_UNAVAILABLE_MESSAGE)


TEMPLATES_UNAVAILABLE = templates_unavailable()  # the answer as a value; call templates_unavailable() to get a copy


def status_for_reply(reply: SMTPReply) -> int:
    """The HTTP status for an SMTP refusal (the table in this module's docstring)."""
    code, enhanced = reply.code, reply.enhanced or ""
    if code < 400:
        raise ValueError(f"{reply} is not a refusal")
    if code in (530, 535) or enhanced.endswith(".7.8"):
        return 401
    if code == 454:
        return 429 if reply.text.lower().startswith("too many") else 503
    if enhanced == "4.7.1":
        return 429
    if code == 552 or enhanced.endswith(".3.4"):
        return 413
    if enhanced.startswith("5.7."):
        return 403
    if code == 452 and enhanced == "4.5.3":
        return 400
    return 400 if code >= 500 else 503


def refusal(reply: SMTPReply) -> tuple[int, dict]:
    """(HTTP status, answer) for an SMTP refusal; the message is the reply's text."""
    status = status_for_reply(reply)
    return status, failure(status, reply.text)

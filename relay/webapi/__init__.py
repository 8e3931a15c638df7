"""HTTP submission in SendCloud's Web API shape, as pure functions (no sockets here).

An application written against SendCloud's ``apiv2/mail/send`` posts the same form to the
relay: :mod:`relay.webapi.request` turns its fields and files into a validated
:class:`~relay.webapi.request.SendRequest` (or a :class:`~relay.webapi.request.RequestError`
carrying the HTTP status), :mod:`relay.webapi.mime` builds the RFC 5322 message and the
envelope that then enter the same intake as SMTP DATA, and :mod:`relay.webapi.answer` writes
SendCloud's JSON answers and maps the pipeline's SMTP refusals to the spec's HTTP codes. The
HTTP server, the key check and the lockout live elsewhere and call these.
"""

"""`send-test`: a small SMTP client (smtplib) that talks to a running relay as an application would.

With ``--http`` it is a Web API client instead: it posts SendCloud's ``apiv2/mail/send`` form to
the relay's ``http_api`` (``--user`` is the apiUser, the password options give the apiKey) and
prints the JSON answer, as an application switched from SendCloud would see it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import ssl
import sys
import time
from pathlib import Path


def cmd_send_test(args: argparse.Namespace) -> int:
    """Talk to a running relay like an application would, printing every reply."""
    import smtplib
    from email.message import EmailMessage
    from email.utils import make_msgid

    host, _, port = args.server.rpartition(":")
    password = args.password or os.environ.get("RELAY_PASSWORD")
    if args.password_file:
        password = Path(args.password_file).read_text().rstrip("\r\n")
    if args.user and password is None:
        password = getpass.getpass(f"Password for {args.user}: ")
    context = ssl.create_default_context(cafile=args.ca_file)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if args.http:
        return _send_http(args, password, context)

    def show(step: str, reply: tuple[int, bytes]) -> None:
        lines = reply[1].decode(errors="replace").splitlines() or [""]
        print(f"{step:<28} -> {reply[0]} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<28}    {reply[0]} {line}")

    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = ", ".join(args.to)
    message["Subject"] = args.subject
    message["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S %z")
    message["Message-ID"] = make_msgid(domain=args.sender.rpartition("@")[2] or None)
    message.set_content("This is a test message sent by `sendcloud-relay send-test`.\n")
    smtp_class = smtplib.SMTP_SSL if args.tls == "implicit" else smtplib.SMTP
    kwargs = {"context": context} if args.tls == "implicit" else {}
    try:
        with smtp_class(host or "127.0.0.1", int(port), timeout=args.timeout, **kwargs) as client:
            show("EHLO", client.ehlo())
            if args.tls == "starttls" or (args.tls == "auto" and client.has_extn("starttls")):
                show("STARTTLS", client.starttls(context=context))
                show("EHLO", client.ehlo())
            if args.user:
                try:
                    show(f"AUTH as {args.user}", client.login(args.user, password))
                except smtplib.SMTPAuthenticationError as error:
                    show(f"AUTH as {args.user}", (error.smtp_code, error.smtp_error))
                    return 1
            show(f"MAIL FROM:<{args.sender}>", client.mail(args.sender))
            accepted = 0
            for rcpt in args.to:
                reply = client.rcpt(rcpt)
                show(f"RCPT TO:<{rcpt}>", reply)
                accepted += reply[0] in (250, 251)
            if not accepted:
                client.rset()
                return 1
            reply = client.data(message.as_bytes())
            show("DATA", reply)
            return 0 if reply[0] == 250 else 1
    except (OSError, smtplib.SMTPException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def http_form(user: str, key: str, sender: str, to: list[str], subject: str) -> dict[str, str]:
    """The apiv2/mail/send parameters of the test message (SendCloud's names; ``;`` between recipients)."""
    return {"apiUser": user, "apiKey": key, "from": sender, "to": ";".join(to), "subject": subject,
            "plain": "This is a test message sent by `sendcloud-relay send-test --http`.\n"}


def _send_http(args: argparse.Namespace, key: str | None, context: ssl.SSLContext) -> int:
    """POST the test message to the relay's http_api and print the JSON answer; 0 when it was queued."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not args.user or not key:
        print("error: --http needs --user (the apiUser) and an apiKey (--password, --password-file or "
              "$RELAY_PASSWORD)", file=sys.stderr)
        return 2
    scheme = "https" if args.tls == "implicit" else "http"
    body = urllib.parse.urlencode(http_form(args.user, key, args.sender, args.to, args.subject)).encode()
    request = urllib.request.Request(f"{scheme}://{args.server}/apiv2/mail/send", data=body, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context if scheme == "https" else None) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        answer = json.loads(text)
    except ValueError:
        print(f"HTTP {status}: {text}")
        return 1
    print(f"HTTP {status}")
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0 if status == 200 and answer.get("result") is True else 1


def register(sub) -> None:
    test = sub.add_parser("send-test", help="send a test message through a running relay")
    test.add_argument("--server", default="127.0.0.1:2525", help="HOST:PORT of the relay (its http_api with --http)")
    test.add_argument("--http", action="store_true",
                      help="post to the relay's http_api (SendCloud's Web API shape) instead of SMTP; "
                           "--user is the apiUser, the password options give the apiKey; --tls implicit for https")
    test.add_argument("--user", help="AUTH username (omit to rely on a trusted network)")
    test.add_argument("--password", help="AUTH password or, with --http, apiKey (prefer --password-file or $RELAY_PASSWORD)")
    test.add_argument("--password-file", help="a file holding the AUTH password")
    test.add_argument("--from", dest="sender", default="test@example.com", help="envelope and From: sender")
    test.add_argument("--to", action="append", default=None, help="recipient (repeatable)")
    test.add_argument("--subject", default="sendcloud-relay test", help="the Subject: header")
    test.add_argument("--tls", choices=["auto", "starttls", "implicit", "none"], default="auto",
                      help="auto (default): STARTTLS when offered")
    test.add_argument("--ca-file", help="CA to verify the relay's certificate")
    test.add_argument("--insecure", action="store_true", help="do not verify the certificate (self-signed demo)")
    test.add_argument("--timeout", type=float, default=30, help="seconds per SMTP step (default 30)")
    test.set_defaults(func=cmd_send_test)

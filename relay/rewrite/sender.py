"""Sender modes (PRODUCT.md): what removes the "on behalf of" / 代发 display.

Mailbox providers show it when the header From and the envelope sender (and the DKIM domain)
disagree. SendCloud sets the envelope sender's domain to the account's sending domain, so a
From in that domain is aligned; one outside it is rewritten into it.
"""

from __future__ import annotations

from email.headerregistry import Address

from relay.rewrite.fields import Field, Message, mailbox_addresses, make_field


def aligned(domain: str, account_domain: str) -> bool:
    """The From domain is the account's sending domain or a subdomain of it."""
    domain, account_domain = domain.lower().rstrip("."), account_domain.lower().rstrip(".")
    return domain == account_domain or domain.endswith("." + account_domain)


def apply_sender_mode(message: Message, mode: str, from_local: str, account_domain: str, envelope_sender: str) -> str:
    """Rewrite From/Sender/Reply-To in place as ``mode`` says; returns the upstream envelope sender.

    ``keep`` passes everything as sent. ``align`` makes the envelope sender the From address
    and drops Sender when the From domain is aligned, and otherwise acts as ``rewrite``:
    From becomes ``"display name" <from_local@account domain>``, the original From moves to
    Reply-To unless one is present, Sender is dropped. A null envelope sender (a bounce)
    stays null: it must never start a bounce loop.
    """
    if mode == "keep":
        return envelope_sender
    field = message.first("From")
    addresses = list(mailbox_addresses(field)) if field is not None else []
    if mode == "align" and len(addresses) == 1 and addresses[0].domain and aligned(addresses[0].domain, account_domain):
        message.remove("Sender")
        return envelope_sender and addresses[0].addr_spec
    new_address = f"{from_local}@{account_domain}"
    display_name = addresses[0].display_name if addresses else ""
    if _undecodable(display_name):  # 8-bit bytes that are not UTF-8: better no name than a wrong one
        display_name = ""
    new_from = make_field("From", str(Address(display_name=display_name, addr_spec=new_address)))
    if field is None:
        message.fields.append(new_from)
    else:
        message.replace(field, new_from)
        if message.first("Reply-To") is None and any(address.domain for address in addresses):
            position = message.fields.index(new_from) + 1
            message.fields.insert(position, Field(b"Reply-To:" + field.raw_value + b"\r\n"))
    message.remove("Sender")
    return envelope_sender and new_address


def _undecodable(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)

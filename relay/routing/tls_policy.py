"""The upstream hop's TLS policy per account and recipient domain (Postfix's smtp_tls_policy_maps)."""

from __future__ import annotations

from relay.config import Config, TLSPolicy


def tls_policy(config: Config, account: str, recipient: str) -> TLSPolicy:
    """The upstream hop's TLS policy for one recipient, as Postfix's smtp_tls_policy_maps.

    The first ``tls_rules`` entry for this account (or any) and the recipient's domain (or a
    parent of it) wins; otherwise ``verify``, except ``may`` when the upstream is plaintext
    (``kind: smtp`` with ``tls: none``, a local staging relay).
    """
    domain = recipient.rpartition("@")[2].lower().rstrip(".")
    for rule in config.tls_rules:
        if rule.account is not None and rule.account != account:
            continue
        if rule.domains is None or any(_within(domain, wanted) for wanted in rule.domains):
            return rule.rule
    return "may" if config.upstream.tls == "none" else "verify"


def _within(domain: str, parent: str) -> bool:
    parent = parent.lower().strip(".")
    return domain == parent or domain.endswith("." + parent)

"""`domain check`: the DNS records SendCloud's domain page asks for, looked up with dnspython.

SPF, DKIM and MX are required for a sending domain, DMARC is recommended (SendCloud's
console marks it optional). Each record comes back as a row like the console's: name,
status, type, host, the value needed and the value found.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from relay.config import Resolver

SPF_INCLUDE = "spf.sendcloud.org"
MX_HOST = "mx.sendcloud.org"
DKIM_SELECTOR = "mail"


@dataclass(frozen=True)
class Record:
    name: str
    required: bool
    status: str  # ok | missing | wrong | error
    type: str
    host: str
    needed: str
    found: list[str]
    error: str | None = None  # why the lookup failed (status error): timeout, SERVFAIL, ...

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Expected:
    spf_include: str = SPF_INCLUDE
    mx: str = MX_HOST
    dkim_selector: str = DKIM_SELECTOR
    dkim_value: str | None = None  # the exact TXT value when the key is known (our own DKIM key)


def make_resolver(settings: Resolver) -> dns.asyncresolver.Resolver:
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [str(address) for address in settings.nameservers]
        resolver.port = settings.port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = settings.timeout
    return resolver


async def _lookup(resolver: dns.asyncresolver.Resolver, host: str, kind: str) -> list[str] | str:
    """Answers as text (TXT strings of one record joined); [] when none; why, as a str, when DNS failed."""
    try:
        answer = await resolver.resolve(host, kind)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.Timeout:
        servers = ", ".join(str(server) for server in resolver.nameservers) or "the system resolver"
        return f"no answer from {servers} within {resolver.lifetime:g}s"
    except dns.exception.DNSException as error:  # SERVFAIL/REFUSED from every server, a bad name, ...
        return str(error) or type(error).__name__
    if kind == "TXT":
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]
    return [rdata.exchange.to_text().rstrip(".").lower() for rdata in answer]


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        key, _, tag_value = part.partition("=")
        tags[key.strip().lower()] = "".join(tag_value.split())
    return tags


def judge_spf(found: list[str], include: str) -> str:
    records = [value for value in found if value.lower().startswith("v=spf1")]
    if not records:
        return "missing"
    if len(records) > 1:  # RFC 7208 4.5: more than one SPF record is a permanent error
        return "wrong"
    return "ok" if f"include:{include}".lower() in records[0].lower().split() else "wrong"


def judge_dkim(found: list[str], needed: str | None) -> str:
    keys = [_tags(value) for value in found if "p" in _tags(value)]
    if not keys:
        return "missing"
    if needed is None:
        return "ok" if any(key["p"] for key in keys) else "wrong"
    return "ok" if any(key["p"] == _tags(needed).get("p") for key in keys) else "wrong"


def judge_mx(found: list[str], host: str) -> str:
    if not found:
        return "missing"
    return "ok" if host.lower().rstrip(".") in found else "wrong"


def judge_dmarc(found: list[str]) -> str:
    records = [value for value in found if value.replace(" ", "").upper().startswith("V=DMARC1")]
    if not records:
        return "missing"
    return "ok" if len(records) == 1 and _tags(records[0]).get("p") in ("none", "quarantine", "reject") else "wrong"


async def check_domain(domain: str, resolver: dns.asyncresolver.Resolver, expected: Expected = Expected()) -> list[Record]:
    domain = domain.lower().rstrip(".")
    dkim_host = f"{expected.dkim_selector}._domainkey.{domain}"
    spf, dkim, mx, dmarc = await asyncio.gather(
        _lookup(resolver, domain, "TXT"),
        _lookup(resolver, dkim_host, "TXT"),
        _lookup(resolver, domain, "MX"),
        _lookup(resolver, f"_dmarc.{domain}", "TXT"),
    )

    def row(name, required, found, judge, kind, host, needed):
        if isinstance(found, str):
            return Record(name, required, "error", kind, host, needed, [], error=found)
        relevant = found
        if kind == "TXT" and name == "SPF":
            relevant = [value for value in relevant if value.lower().startswith("v=spf1")]
        return Record(name, required, judge(found), kind, host, needed, relevant)

    return [
        row("SPF", True, spf, lambda found: judge_spf(found, expected.spf_include), "TXT", domain,
            f"v=spf1 include:{expected.spf_include} ~all"),
        row("DKIM", True, dkim, lambda found: judge_dkim(found, expected.dkim_value), "TXT", dkim_host,
            expected.dkim_value or "k=rsa;p=<the public key shown on SendCloud's domain page>"),
        row("MX", True, mx, lambda found: judge_mx(found, expected.mx), "MX", domain, expected.mx),
        row("DMARC", False, dmarc, judge_dmarc, "TXT", f"_dmarc.{domain}", "v=DMARC1; p=none;"),
    ]


def table(records: list[Record]) -> list[str]:
    """The console's layout as text: one line per record, found values below when they differ."""
    lines = [f"{'NAME':<6} {'STATUS':<8} {'REQUIRED':<9} {'TYPE':<5} {'HOST':<40} VALUE NEEDED"]
    for record in records:
        lines.append(
            f"{record.name:<6} {record.status:<8} {'yes' if record.required else 'no':<9} {record.type:<5} "
            f"{record.host:<40} {record.needed}"
        )
        for value in record.found:
            lines.append(f"{'':<6} found: {value}")
        if record.error:
            lines.append(f"{'':<6} lookup failed: {record.error}")
    return lines

"""`domain check` says why a lookup failed, not only that it did."""

from __future__ import annotations

import dns.exception
import dns.message
import dns.resolver

from relay.ops.domaincheck import check_domain, table


class FailingResolver:
    """A resolver whose every query fails as ``error`` says."""

    def __init__(self, error: Exception):
        self.error = error
        self.nameservers = ["192.0.2.53"]
        self.lifetime = 2.0

    async def resolve(self, host: str, kind: str):
        raise self.error


async def test_a_timeout_names_the_server_and_the_time():
    records = await check_domain("acme.com", FailingResolver(dns.exception.Timeout(timeout=2.0)))
    assert {record.status for record in records} == {"error"}
    assert records[0].error == "no answer from 192.0.2.53 within 2s"
    assert "       lookup failed: no answer from 192.0.2.53 within 2s" in table(records)


async def test_a_servfail_says_what_the_servers_answered():
    query = dns.message.make_query("acme.com", "TXT")
    error = dns.resolver.NoNameservers(request=query, errors=[("192.0.2.53", False, 53, "SERVFAIL")])
    records = await check_domain("acme.com", FailingResolver(error))
    assert records[0].status == "error" and "SERVFAIL" in records[0].error
    assert records[0].as_dict()["error"] == records[0].error  # --json says it too


async def test_a_name_that_is_not_there_is_missing_not_an_error():
    records = await check_domain("acme.com", FailingResolver(dns.resolver.NXDOMAIN()))
    assert [record.status for record in records] == ["missing"] * 4 and records[0].error is None

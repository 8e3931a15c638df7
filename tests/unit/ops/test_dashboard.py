"""The dashboard's pure parts (session, escaping, CSV, chart data) and its HTTP rules on a MemorySpool."""

from __future__ import annotations

import ipaddress
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.config import ConfigError
from relay.ops.dashboard import pages, session
from relay.ops.dashboard.render import Html, json_island, render
from relay.ops.http import AdminBackend, AdminServer
from relay.policy.auth import hash_password
from relay.spool import NewMessage
from relay.spool.memory import MemorySpool
from tests.unit.helpers import BASE, config_from

SECRET = b"k" * 32
PASSWORD = "operator-password"
PROXY = "127.0.0.1"


# -- session and CSRF -------------------------------------------------------------------------

def test_a_session_round_trips_and_any_change_or_expiry_voids_it():
    cookie = session.issue(SECRET, "ops ü", 1000.0, 60)
    found = session.verify(SECRET, cookie, 1059.0)
    assert found is not None and found.user == "ops ü"
    assert session.verify(SECRET, cookie, 1061.0) is None  # expired
    assert session.verify(b"other" * 8, cookie, 1001.0) is None  # another secret
    name, expires, nonce, mac = cookie.split(".")
    assert session.verify(SECRET, f"{name}.{int(expires) + 9999}.{nonce}.{mac}", 1001.0) is None  # longer life forged
    assert session.verify(SECRET, "", 1001.0) is None and session.verify(SECRET, "a.b", 1001.0) is None


def test_the_csrf_token_belongs_to_one_session():
    one = session.verify(SECRET, session.issue(SECRET, "ops", 0, 60), 1)
    two = session.verify(SECRET, session.issue(SECRET, "ops", 0, 60), 1)
    token = session.csrf_token(SECRET, one)
    assert session.csrf_ok(session.csrf_token(SECRET, one), token)
    assert not session.csrf_ok(session.csrf_token(SECRET, two), token)
    assert not session.csrf_ok(token, None) and not session.csrf_ok(token, "") and not session.csrf_ok(token, ["x"])


@pytest.mark.parametrize(("secure", "peer", "proto", "expected"), [
    (True, "198.51.100.1", None, True),  # our own TLS
    (False, "10.0.0.1", "https", True),  # the trusted proxy says so
    (False, "10.0.0.1", "HTTPS, http", True),
    (False, "10.0.0.1", "http", False),
    (False, "198.51.100.1", "https", False),  # anyone else saying so is ignored
    (False, None, "https", False),
])
def test_cookies_are_secure_behind_tls_only(secure, peer, proto, expected):
    assert session.behind_tls(secure, peer, proto, [ipaddress.ip_address("10.0.0.1")]) is expected


# -- escaping and data ------------------------------------------------------------------------

def test_every_value_is_escaped_and_only_rendered_markup_passes():
    evil = '<script>alert("x")</script>'
    shown = render("<td>$v</td><td>$safe</td>", v=evil, safe=render("<b>$x</b>", x=evil))
    assert "<script>" not in shown and shown.count("&lt;script&gt;") == 2 and "<b>" in shown
    assert render("$v", v=Html("<i>ok</i>")) == "<i>ok</i>"


def test_a_json_island_cannot_close_its_script_element():
    island = json_island("c", {"label": "</script><script>alert(1)</script>"})
    assert island.count("</script>") == 1 and island.endswith("</script>")


def test_csv_cells_never_start_a_formula():
    text = pages.to_csv(("period", "label", "requested"), [{"period": "2026-12-01", "label": "=HYPERLINK(1)", "requested": 3},
                                                          {"period": "2026-12-02", "label": "-1+2"}])
    assert text.splitlines() == ["period,label,requested", "2026-12-01,'=HYPERLINK(1),3", "2026-12-02,'-1+2,"]


def test_chart_data_totals_groups_per_period_in_order():
    rows = [{"period": "2026-12-02", "requested": 2, "delivered": 1}, {"period": "2026-12-01", "requested": 5},
            {"period": "2026-12-02", "requested": 3, "open": 4}]
    data = pages.chart_data(rows)
    assert data["x"] == [pages.period_start("2026-12-01"), pages.period_start("2026-12-02")]
    assert data["x"][1] - data["x"][0] == 86400 and data["step"] == 86400
    assert (data["series"]["requested"], data["series"]["delivered"], data["series"]["open"]) == ([5, 5], [0, 1], [0, 4])
    hourly = pages.chart_data([{"period": "2026-12-01T10", "requested": 1}, {"period": "2026-12-01T13", "requested": 2}])
    assert hourly["step"] == 3600 and hourly["series"]["requested"] == [1, 0, 0, 2]


def test_a_grouped_chart_has_one_series_per_value_of_one_counter():
    rows = [{"period": "2026-12-01", "user": "billing", "requested": 2, "open": 9},
            {"period": "2026-12-02", "user": "crm", "requested": 3}, {"period": "2026-12-02", "user": "billing", "open": 1}]
    assert pages.chart_data(rows, "user")["series"] == {"billing": [2, 0], "crm": [0, 3]}
    assert pages.chart_data(rows, "user", "open")["series"] == {"billing": [9, 1], "crm": [0, 0]}


def test_a_lone_period_is_drawn_between_zeros():
    data = pages.chart_data([{"period": "2026-12-01", "requested": 7}])
    assert data["series"]["requested"] == [0, 7, 0]
    assert data["x"] == [pages.period_start("2026-11-30"), pages.period_start("2026-12-01"), pages.period_start("2026-12-02")]


def test_admin_users_take_hashes_only():
    with pytest.raises(ConfigError, match="plaintext"):
        config_from(BASE + "admin:\n  users:\n    ops: {password_hash: secret, role: operator}\n")


# -- the HTTP rules ---------------------------------------------------------------------------

def _config(users: str):
    text = BASE.replace("server:\n", "server:\n  auth_failure_delay: 1ms\n  auth_lockout_failures: 3\n", 1)
    return config_from(text + f"admin:\n  token: api-token\n  trusted_proxies: [{PROXY}]\n  users:\n{users}")


OPERATOR_ONLY = f'    ops: {{password_hash: "{hash_password(PASSWORD)}", role: operator}}\n'


@pytest.fixture
async def board():
    """A signed-out client on an admin endpoint over a MemorySpool; ``client.configs[0]`` is what a reload swaps."""
    spool = MemorySpool()
    await spool.open()
    configs = [_config(OPERATOR_ONLY)]

    async def reload():
        return None, []

    server = AdminServer(AdminBackend(lambda: configs[0], spool, lambda: False, list, dict, reload))
    client = TestClient(TestServer(server._app()))
    client.configs = configs
    await client.start_server()
    yield client, spool
    await client.close()


async def _sign_in(client, headers=None):
    return await client.post("/signin", data={"name": "ops", "password": PASSWORD}, allow_redirects=False,
                             headers=headers or {})


async def test_the_cookie_is_httponly_strict_and_secure_only_behind_a_trusted_tls_proxy(board):
    client, _ = board
    plain = (await _sign_in(client)).headers["Set-Cookie"]
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Secure" not in plain
    proxied = (await _sign_in(client, {"X-Forwarded-Proto": "https"})).headers["Set-Cookie"]
    assert "Secure" in proxied


async def test_sign_in_locks_out_after_repeated_failures(board):
    client, _ = board
    statuses = [(await client.post("/signin", data={"name": "ops", "password": "guess"})).status for _ in range(3)]
    assert statuses == [401, 401, 401]
    assert (await _sign_in(client)).status == 429  # the right password is not even checked now
    unknown = await client.post("/signin", data={"name": "nobody", "password": PASSWORD})
    assert unknown.status == 429  # the address is locked too, whatever name it tries


async def test_an_unknown_name_is_refused_like_a_wrong_password(board):
    client, _ = board
    response = await client.post("/signin", data={"name": "nobody", "password": PASSWORD}, allow_redirects=False)
    assert response.status == 401 and "Set-Cookie" not in response.headers
    assert "Wrong name or password." in await response.text()


async def test_pages_escape_what_the_spool_holds(board):
    client, spool = board
    response = await _sign_in(client)
    assert response.status == 303
    await spool.add_suppressions([('"><script>x</script>@evil.test', "manual", frozenset({"batch"}), None, 1.0, None,
                                   "manual")])
    text = await (await client.get("/suppression")).text()
    assert "<script>x</script>" not in text and "&lt;script&gt;x&lt;/script&gt;@evil.test" in text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', text).group(1)
    added = await client.post("/suppression/add", data={"address": "a@b.test", "csrf": csrf}, allow_redirects=False)
    assert added.status == 303 and "a@b.test" in [row[0] for row in await spool.suppressions()]


async def test_the_token_guards_the_api_and_opens_no_page(board):
    client, _ = board
    assert (await client.get("/api/suppressions")).status == 401
    assert (await client.get("/api/suppressions", headers={"Authorization": "Bearer api-token"})).status == 200
    page = await client.get("/suppression", headers={"Authorization": "Bearer api-token"}, allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (303, "/signin")
    assert (await client.get("/healthz")).status == 200


def test_an_account_shows_sendclouds_pause_and_upstream_failures():
    assert pages.account_state(None, 0.0, 1000.0) == "ok"
    assert pages.account_state(None, 90.0, 1000.0) == "paused by SendCloud for 1m30s more"
    assert pages.account_state(400.0, 30.0, 1000.0) == "paused by SendCloud for 30s more; failing for 10m"
    assert pages.account_state(400.0, 0.0, 1000.0, 120.0) == (
        "upstream unreachable, delivery suspended (next probe in 2m); failing for 10m")
    assert pages.account_state(400.0, 0.0, 1000.0, 0.0).startswith("upstream unreachable, delivery suspended (probing)")


async def test_a_user_removed_by_a_reload_is_signed_out_at_once(board):
    client, _ = board
    await _sign_in(client)
    assert (await client.get("/", allow_redirects=False)).status == 200
    client.configs[0] = _config(f"    other: {{password_hash: \"{hash_password('x')}\"}}\n")
    assert (await client.get("/", allow_redirects=False)).headers["Location"] == "/signin"


async def test_messages_page_fifty_at_a_time_with_a_cursor(board):
    client, spool = board
    for number in range(52):
        await spool.store(NewMessage(f"M{number:03}", 1_700_000_000.0 + number, "billing", "smtp", "10.0.0.5",
                                     "acme_trigger", "trigger", "app@acme.com", ["a@example.org"], b"Subject: x\r\n\r\nx\r\n"))
    await _sign_in(client)
    first = await (await client.get("/messages")).text()
    assert first.count('href="/messages/M') == 50 and 'href="/messages/M049"' in first
    assert 'href="/messages?after=M049">Next page' in first
    second = await (await client.get("/messages?after=M049")).text()
    assert re.findall(r'href="/messages/(M\d+)"', second) == ["M050", "M051"] and "Next page" not in second
    bad = await client.get("/messages?since=yesterday-ish")
    assert bad.status == 400 and "since" in await bad.text()

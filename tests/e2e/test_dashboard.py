"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium and chromedriver.

Mail goes through the relay with smtplib, SendCloud's signed webhooks are posted for it, and
then an operator signs in and finds it, sees its events, adds and removes a suppression and
sees the statistics drawn; a viewer sees the same pages without a single control that changes
anything, and a POST without the session's CSRF token is refused. Every page is saved as a
screenshot under ``tests/artifacts/dashboard/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from relay.policy.auth import hash_password
from tests.e2e.test_events import delivered, post, signed, with_events
from tests.e2e.test_relay import message, submit
from tests.support import free_port, require_peer
from tests.support.relay import wait_until

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OPERATOR, VIEWER, TOKEN = ("ops", "ops-password-1"), ("watcher", "watcher-password-2"), "api-token-xyz"
# What headless Chromium needs on this closed network (docs: machines/python.md).
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000")


def with_dashboard(events_port: int):
    events = with_events(events_port)

    def patch(config: dict) -> None:
        events(config)
        config["admin"]["token"] = TOKEN
        config["admin"]["users"] = {
            OPERATOR[0]: {"password_hash": hash_password(OPERATOR[1]), "role": "operator"},
            VIEWER[0]: {"password_hash": hash_password(VIEWER[1]), "role": "viewer"},
        }

    return patch


@pytest.fixture
def browser(monkeypatch):
    """A headless Chromium, quit (with its chromedriver) after the test."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    require_peer(webdriver is not None and Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
                 "selenium with Debian's chromium and chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Dashboard:
    """The browser on one relay's dashboard: small steps the tests read as sentences."""

    def __init__(self, driver, relay):
        from selenium.webdriver.common.by import By
        self.driver, self.by = driver, By
        host, port = relay.admin_address
        self.base = f"http://{host}:{port}"

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str) -> list:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def text(self, css: str = "main") -> str:
        return self.find(css).text

    def fill(self, form: str, **fields: str) -> None:
        for name, value in fields.items():
            box = self.find(f"{form} [name={name}]")
            if box.tag_name == "select":
                box.find_element(self.by.CSS_SELECTOR, f"option[value='{value}']").click()
            else:
                box.clear()
                box.send_keys(value)
        self.submit(self.find(f"{form} button[type=submit]"))

    def submit(self, button) -> None:
        """Click a button that loads a page, and wait until the new page replaced this one."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait
        old = self.find("html")
        # The DOM's own click (what the mouse's does: the form's submit), not chromedriver's, which
        # can fail with "node does not belong to the document" when the navigation wins the race.
        self.driver.execute_script("arguments[0].click()", button)
        WebDriverWait(self.driver, 20).until(expected_conditions.staleness_of(old))

    def sign_in(self, name: str, password: str) -> None:
        self.open("/signin")
        self.fill("form.signin", name=name, password=password)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def cookie(self) -> str:
        return self.driver.get_cookie("relay_session")["value"]


def raw_post(base: str, path: str, fields: dict, cookie: str | None = None) -> int:
    """A POST outside the browser (as a forging page would send it): its status, redirects not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(base + path, data=urllib.parse.urlencode(fields).encode(), method="POST")
    if cookie:
        request.add_header("Cookie", f"relay_session={cookie}")
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def get(base: str, path: str, cookie: str) -> str:
    """A download (CSV) with the browser's session, as the browser would fetch it."""
    request = urllib.request.Request(base + path, headers={"Cookie": f"relay_session={cookie}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.headers["Content-Type"].startswith("text/csv")
        return response.read().decode()


@pytest.fixture
def mail(make_relay, client_tls):
    """A relay with the dashboard on, one message delivered to two recipients, and SendCloud's events for it."""
    events_port = free_port()
    relay = make_relay(with_dashboard(events_port))
    queue_id = submit(relay, client_tls, ["reader@example.net", "bounce@example.org"], message("dashboard"))
    one, two = delivered(relay, queue_id, 2)["recipients"]
    base = {"apiUser": "acme_trigger", "emailId": one["email_id"], "recipient": one["address"]}
    for event in ("deliver", "open", "click"):
        assert post(events_port, signed({**base, "event": event, "url": "https://acme.com/offer"})) == 200
    assert post(events_port, signed({"apiUser": "acme_trigger", "emailId": two["email_id"], "recipient": two["address"],
                                     "event": "invalid", "subStatDesc": "mailbox unknown"})) == 200
    assert wait_until(lambda: '"invalid"' in relay.cli("queue", "show", queue_id, "--json").stdout, 10)
    return relay, queue_id


def test_an_operator_finds_the_message_its_events_and_manages_suppressions(mail, browser, tmp_path):
    relay, queue_id = mail
    board = Dashboard(browser, relay)

    board.open("/")  # no session: the sign-in page, whatever is asked for
    assert browser.current_url.endswith("/signin")
    board.sign_in(OPERATOR[0], "wrong password")
    assert "Wrong name or password" in board.text()
    board.shot("signin")
    board.sign_in(*OPERATOR)
    assert board.find("h1").text == "Overview"
    assert "acme_trigger" in board.text("table.accounts")
    # requested 2 today, delivered 1 (the deliver event), invalid 1
    tiles = {t.find_element(board.by.CSS_SELECTOR, ".label").text: t.find_element(board.by.CSS_SELECTOR, ".value").text
             for t in board.all(".tile")}
    assert (tiles["requested today"], tiles["delivered today"], tiles["invalid today"]) == ("2", "1", "1")
    assert_chart_drawn(board)
    board.shot("overview")

    board.open("/messages")
    board.fill("form.search", to="reader@example.net")
    assert [a.text for a in board.all("table.messages a")] == [queue_id]
    board.fill("form.search", to="nobody@example.net")
    assert board.all("table.messages tbody tr") == []
    board.fill("form.search", to="", sender="APP@acme.com", user="billing", state="delivered", since="1h")
    assert [a.text for a in board.all("table.messages a")] == [queue_id]
    board.fill("form.search", sender="someone-else@acme.com")
    assert board.all("table.messages tbody tr") == []
    email_id = json.loads(relay.cli("queue", "show", queue_id, "--json").stdout)["recipients"][0]["email_id"]
    board.fill("form.search", sender="", user="", state="", since="", email_id=email_id)  # what SendCloud said
    assert [a.text for a in board.all("table.messages a")] == [queue_id]
    board.fill("form.search", email_id="", status="invalid")
    assert [a.text for a in board.all("table.messages a")] == [queue_id]
    board.fill("form.search", status="soft_bounce")
    assert board.all("table.messages tbody tr") == []
    board.shot("messages")

    board.submit(board.find("nav a[href='/messages']"))
    board.fill("form.search", id=queue_id)
    assert board.find("h1").text == f"Message {queue_id}"
    timeline = [row.text for row in board.all("table.timeline tbody tr")]
    assert timeline[0].endswith(f"(all) accepted 250 2.0.0 Ok: queued as {queue_id}")  # from the 250 ...
    assert sorted(line.split()[3] for line in timeline[1:]) == ["click", "deliver", "invalid", "open"]  # ... on
    assert "mailbox unknown" in board.text("table.timeline")
    recipients = board.text("table.recipients")
    assert "reader@example.net delivered" in recipients and "invalid" in recipients
    assert "channel trigger → account acme_trigger" in board.text("dl.facts")
    assert [b.text for b in board.all(".actions button")] == ["Retry now", "Delete"]
    board.shot("message")
    board.submit(board.find(".actions button"))  # Retry now: nothing waits any more
    assert board.text(".notice") == "0 recipient(s) made due now"

    board.open("/suppression")
    assert "bounce@example.org" in board.text("table.suppressions")  # the invalid event suppressed it
    board.fill("form.add", address="Blocked@Example.com", reason="manual")
    assert "blocked@example.com added" in board.text(".notice")
    board.fill("form.search", q="blocked")
    rows = board.all("table.suppressions tbody tr")
    assert len(rows) == 1 and rows[0].text.startswith("blocked@example.com manual")
    board.shot("suppression")
    board.submit(rows[0].find_element(board.by.CSS_SELECTOR, "button"))
    assert "1 entry(ies) removed" in board.text(".notice")
    board.fill("form.search", q="blocked")
    assert board.all("table.suppressions tbody tr") == []
    assert '"blocked@example.com"' not in relay.http("/api/suppressions", token=TOKEN)[1]

    upload = tmp_path / "import.csv"
    upload.write_text("address,reason,account,expires,channels\nOne@Import.test,unsubscribe,,30d,batch\ntwo@import.test\n")
    board.find("form.import [name=file]").send_keys(str(upload))
    board.submit(board.find("form.import button"))
    assert "2 entry(ies) imported" in board.text(".notice")
    exported = get(board.base, "/suppression.csv?q=import.test", board.cookie())
    one, two = exported.splitlines()[1:]
    address, reason, account, expires, channels = one.split(",")
    assert (address, reason, account, channels) == ("one@import.test", "unsubscribe", "", "batch")
    assert 29 * 86400 < datetime.fromisoformat(expires).timestamp() - time.time() <= 30 * 86400
    assert two == "two@import.test,manual,,,all"
    upload.write_text("address\nnot-an-address\n")
    board.find("form.import [name=file]").send_keys(str(upload))
    board.submit(board.find("form.import button"))
    assert "nothing imported" in board.text(".notice") and "line 2" in board.text(".notice")

    board.open("/stats?since=1d&group=user")
    header = [th.text for th in board.all("table.stats th")]
    row = dict(zip(header, board.all("table.stats tbody tr")[0].text.split(), strict=True))
    assert (row["user"], row["requested"], row["delivered"], row["invalid"], row["delivered_rate"]) == (
        "billing", "2", "1", "1", "0.5")
    assert_chart_drawn(board)
    assert "billing" in [label.text for label in board.all("[data-chart] .u-legend .u-label")]  # a series per user
    board.shot("stats")
    assert get(board.base, "/stats.csv?since=1d&group=user", board.cookie()).splitlines()[1].startswith(
        f"{row['period']},billing,2,1,0,1,")

    board.open(f"/messages/{queue_id}")
    board.submit(board.all(".actions button")[1])  # Delete
    assert browser.current_url.endswith("/messages")
    assert relay.cli("queue", "show", queue_id).returncode != 0


def assert_chart_drawn(board) -> None:
    """uPlot drew the JSON beside the chart: a canvas with a real size, inside a box marked drawn."""
    assert wait_until(lambda: board.all("[data-chart][data-drawn=true] canvas"), 5)
    canvas = board.find("[data-chart] canvas")
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100
    assert board.driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (let i = 3; i < d.length; i += 4) { if (d[i]) return true; } return false;", canvas)


def test_a_viewer_reads_but_cannot_change_and_forged_posts_fail(mail, browser):
    relay, queue_id = mail
    board = Dashboard(browser, relay)
    board.sign_in(*VIEWER)
    assert "watcher (viewer)" in board.text("header")

    board.open(f"/messages/{queue_id}")
    assert "reader@example.net" in board.text("table.recipients")
    assert board.all(".actions button") == []
    board.open("/suppression")
    assert "bounce@example.org" in board.text("table.suppressions")
    assert board.all("form.add") == [] and board.all("table.suppressions button") == []
    board.shot("suppression-viewer")

    # A viewer's own valid form still cannot change anything; nobody's form without the token can.
    csrf = board.find("header form.who [name=csrf]").get_attribute("value")
    viewer_cookie = board.cookie()
    assert raw_post(board.base, "/suppression/add", {"address": "x@example.com", "csrf": csrf}, viewer_cookie) == 403
    assert raw_post(board.base, f"/messages/{queue_id}/delete", {"csrf": csrf}, viewer_cookie) == 403
    board.sign_in(*OPERATOR)
    operator_cookie = board.cookie()
    assert raw_post(board.base, "/suppression/add", {"address": "x@example.com"}, operator_cookie) == 403
    assert raw_post(board.base, "/suppression/add", {"address": "x@example.com", "csrf": csrf}, operator_cookie) == 403
    assert raw_post(board.base, f"/messages/{queue_id}/delete", {}, operator_cookie) == 403
    assert raw_post(board.base, "/suppression/add", {"address": "x@example.com"}) == 303  # to the sign-in page
    assert '"x@example.com"' not in relay.http("/api/suppressions", token=TOKEN)[1]
    assert relay.cli("queue", "show", queue_id).returncode == 0  # not deleted

    # The bearer token is for the JSON API only: it opens no page.
    assert relay.http("/", token=TOKEN)[1].count('action="/signin"') == 1
    assert relay.http("/api/queue")[0] == 401

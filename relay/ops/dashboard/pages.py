"""The dashboard's pages as pure functions: records (from ``queue_view`` / ``events_view``) in, Html out.

Nothing here reads the spool or the request; ``app.py`` gathers the data and picks what the
signed-in role may see (``operator`` gets the buttons that change things).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from relay.ops.dashboard.render import (
    Html,
    csrf_field,
    join,
    json_island,
    link,
    post_button,
    render,
    select,
    table,
    when,
)
from relay.ops.queue_view import format_age

CHART_SERIES = ("requested", "delivered", "soft_bounce", "invalid", "open", "click")
STATS_COLUMNS = ("requested", "delivered", "soft_bounce", "invalid", "unique_open", "unique_click",
                 "unsubscribe", "report_spam", "delivered_rate", "open_rate", "click_rate")


def period_start(period: str) -> float:
    """``2026-12-01`` or ``2026-12-01T10`` (UTC, as :func:`relay.events.stats.rollup` labels them) as epoch seconds."""
    text = period + ":00" if "T" in period else period
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def chart_data(rows: Iterable[Mapping], group: str | None = None, counter: str = "requested") -> dict:
    """uPlot's columns: the periods' starts, then one series per counter totalled over groups, or,
    with ``group``, one series per value of the group (each user, account, ...) of ``counter``."""
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = totals.setdefault(row["period"], {})
        pairs = [(str(row.get(group) or "(none)"), row.get(counter, 0))] if group else \
            [(name, row.get(name, 0)) for name in CHART_SERIES]
        for name, count in pairs:
            counts[name] = counts.get(name, 0) + count
    names = sorted({name for counts in totals.values() for name in counts}) if group else list(CHART_SERIES)
    by_start = {period_start(p): counts for p, counts in totals.items()}
    step = 3600 if any("T" in p for p in totals) else 86400
    x = timeline(sorted(by_start), step)
    return {"x": x, "step": step, "series": {name: [by_start.get(t, {}).get(name, 0) for t in x] for name in names}}


def timeline(starts: list[float], step: int) -> list[float]:
    """Every period from the first to the last (a period without rows counted nothing), and at
    least three, so a single period is drawn as a point between zeros rather than alone on an axis of years."""
    if not starts:
        return []
    first, last = starts[0], starts[-1]
    if first == last:
        first, last = first - step, last + step
    count = int((last - first) // step) + 1
    return [first + i * step for i in range(count)]


def chart(element_id: str, rows: list[Mapping], group: str | None = None, counter: str = "requested") -> Html:
    """A chart that ``static/charts.js`` draws from the JSON beside it; the table says the same without JS."""
    if not rows:
        return Html('<p class="empty">No statistics in this period yet.</p>')
    return join([render('<div class="chart" data-chart="$id" role="img" aria-label="statistics chart"></div>',
                        id=element_id), json_island(element_id, chart_data(rows, group, counter))])


def account_state(failing_since: float | None, paused_for: float, now: float, unreachable_for: float | None = None) -> str:
    """What an account's row says: unreachable, paused by SendCloud's throttle, failing upstream, or ok
    (several can hold). ``unreachable_for``: seconds to the next connect probe, None when reachable."""
    states = []
    if unreachable_for is not None:
        probe = f"next probe in {format_age(unreachable_for)}" if unreachable_for > 0 else "probing"
        states.append(f"upstream unreachable, delivery suspended ({probe})")
    if paused_for > 0:
        states.append(f"paused by SendCloud for {format_age(paused_for)} more")
    if failing_since:
        states.append(f"failing for {format_age(now - failing_since)}")
    return "; ".join(states) or "ok"


def overview(summary: tuple[int, Mapping[str, int], float | None], today: Mapping[str, int],
             accounts: Iterable[tuple[str, str, str]], recent: list[Mapping], now: float) -> Html:
    messages, by_state, oldest = summary
    oldest_age = format_age(now - oldest) if oldest else "-"
    tiles = [("messages waiting", messages), ("recipients queued", by_state.get("queued", 0)),
             ("recipients deferred", by_state.get("deferred", 0)), ("oldest waiting", oldest_age),
             ("requested today", today.get("requested", 0)), ("delivered today", today.get("delivered", 0)),
             ("soft bounces today", today.get("soft_bounce", 0)), ("invalid today", today.get("invalid", 0))]
    cards = join(render('<div class="tile"><span class="value">$v</span><span class="label">$l</span></div>', v=v, l=label)
                 for label, v in tiles)
    account_rows = list(accounts)
    return render('<section class="tiles" id="queue">$cards</section>'
                  '<h2>Accounts</h2>$accounts<h2>The last 48 hours</h2>$chart',
                  cards=cards, accounts=table(("account", "api_user", "upstream"), account_rows, "accounts"),
                  chart=chart("overview-chart", recent))


MESSAGE_FILTERS = ("id", "email_id", "to", "sender", "user", "state", "status", "since", "before", "after")


def search_form(values: Mapping[str, str], states: Iterable[str], statuses: Iterable[str] = ()) -> Html:
    def field(name: str, label: str, placeholder: str = "") -> Html:
        return render('<label>$label <input name="$name" value="$value" placeholder="$ph"></label>',
                      label=label, name=name, value=values.get(name, ""), ph=placeholder)

    return render('<form method="get" action="/messages" class="search">$id$email_id$to$sender$user$since$before'
                  '<label>state $states</label><label>SendCloud status $statuses</label>'
                  '<button type="submit">Search</button></form>',
                  id=field("id", "queue ID"), email_id=field("email_id", "SendCloud emailId"),
                  statuses=select("status", ("", *statuses), values.get("status", ""), "(any)"),
                  to=field("to", "recipient", "someone@example.com"),
                  sender=field("sender", "sender", "app@acme.com"), user=field("user", "user"),
                  since=field("since", "since", "1d or 2026-12-01"), before=field("before", "before", "2026-12-02"),
                  states=select("state", ("", *states), values.get("state", ""), "(any)"))


def messages(form: Html, records: list[Mapping], next_after: str | None, query: Mapping[str, str]) -> Html:
    rows = [(link(f"/messages/{r['id']}", r["id"]), when(r["received_at"]), r["age"], r["user"], r["account"],
             r["channel"], f"{r['recipients_pending']}/{r['recipients_total']}", r["state"]) for r in records]
    more = link("/messages", "Next page", **{**query, "after": next_after}) if next_after else Html("")
    return render('$form$table<p class="paging">$count message(s) $more</p>', form=form,
                  table=table(("queue ID", "received (UTC)", "age", "user", "account", "channel", "waiting", "state"),
                              rows, "messages"), count=len(records), more=more)


def message(record: Mapping, headers: str | None, operator: bool, csrf: str) -> Html:
    """One message: routing, recipients with SendCloud's status, every event in time order, headers."""
    facts = [("received (UTC)", when(record["received_at"])), ("user", record["user"]),
             ("listener / client", f"{record['listener']} from [{record['client']}]"),
             ("route", f"channel {record['channel']} → account {record['account']}"),
             ("sender", record["sender"]), ("size", f"{record['size']} bytes"), ("state", record["state"])]
    recipients = [(r["address"], r["state"], r["attempts"], r["last_reply"] or "", r["email_id"] or "",
                   r["status"] or "") for r in record["recipients"]]
    accepted = (record["received_at"], "(all)", "accepted", f"250 2.0.0 Ok: queued as {record['id']}")
    timeline = [accepted, *sorted((e["time"], r["address"], e["event"], e.get("subStatDesc") or e.get("url") or "")
                                  for r in record["recipients"] for e in r["events"])]
    actions = Html("")
    if operator:
        base = f"/messages/{record['id']}"
        actions = join([post_button(f"{base}/retry", "Retry now", csrf), post_button(f"{base}/delete", "Delete", csrf)])
    return render('<dl class="facts">$facts</dl><div class="actions">$actions</div>'
                  '<h2>Recipients</h2>$recipients<h2>Timeline</h2>$timeline<h2>Headers</h2>$headers',
                  facts=join(render("<dt>$k</dt><dd>$v</dd>", k=k, v=v) for k, v in facts), actions=actions,
                  recipients=table(("recipient", "state", "attempts", "upstream reply", "SendCloud emailId",
                                    "SendCloud status"), recipients, "recipients"),
                  timeline=table(("time (UTC)", "recipient", "event", "detail"),
                                 [(when(t), a, e, d) for t, a, e, d in timeline], "timeline"),
                  headers=render('<pre class="headers">$h</pre>', h=headers) if headers is not None
                  else Html('<p class="empty">The body is no longer in the spool (delivered or failed).</p>'))


def suppression(records: list[Mapping], search: str, reasons: Iterable[str], operator: bool, csrf: str) -> Html:
    rows = []
    for r in records:
        remove = post_button("/suppression/remove", "Remove", csrf, address=r["address"], account=r["account"] or "")
        rows.append((r["address"], r["reason"], ", ".join(r["channels"]), r["account"] or "(all)", r["added_at"],
                     r["expires_at"] or "never", remove if operator else ""))
    add = Html("")
    if operator:
        add = render('<form method="post" action="/suppression/add" class="add">$csrf'
                     '<label>address <input name="address" type="email" required></label>'
                     '<label>reason $reasons</label>'
                     '<label>account <input name="account" placeholder="(all)"></label>'
                     '<label>expires <input name="expires" placeholder="30d, or empty"></label>'
                     '<button type="submit">Add</button></form>'
                     '<form method="post" action="/suppression/import" enctype="multipart/form-data" class="add import">'
                     '$csrf<label>import CSV (address,reason,account,expires,channels) '
                     '<input name="file" type="file" accept=".csv,text/csv" required></label>'
                     '<button type="submit">Import</button></form>', csrf=csrf_field(csrf), reasons=select("reason", reasons, "manual"))
    return render('<form method="get" action="/suppression" class="search"><label>address contains '
                  '<input name="q" value="$q"></label><button type="submit">Search</button> $csv</form>$add$table',
                  q=search, csv=link("/suppression.csv", "Download CSV", q=search), add=add,
                  table=table(("address", "reason", "channels", "account", "added", "expires", ""), rows, "suppressions"))


def stats_page(rows: list[Mapping], query: Mapping[str, str], groups: Iterable[str]) -> Html:
    """The statistics table with rates; the chart shows every counter, or one counter per group value."""
    group = query.get("group") or ""
    counter = query.get("chart", "requested")
    columns = ("period", *((group,) if group else ()), *STATS_COLUMNS)
    body = [[row.get(c, "") for c in columns] for row in rows]
    return render('<form method="get" action="/stats" class="search">'
                  '<label>since <input name="since" value="$since"></label>'
                  '<label>until <input name="until" value="$until" placeholder="2026-12-31"></label>'
                  '<label>by $by</label><label>group $groups</label><label>chart (by group) $charts</label>'
                  '<button type="submit">Show</button> $csv</form>$chart$table',
                  since=query.get("since", "7d"), until=query.get("until", ""),
                  by=select("by", ("day", "hour"), query.get("by", "day")),
                  groups=select("group", ("", *groups), group, "(total)"),
                  charts=select("chart", CHART_SERIES, counter),
                  csv=link("/stats.csv", "Download CSV", **{k: v for k, v in query.items() if k != "chart"}),
                  chart=chart("stats-chart", rows, group or None, counter), table=table(columns, body, "stats"))


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula (a value starting with = + - @ gets a ')."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(columns: Iterable[str], rows: Iterable[Mapping]) -> str:
    columns = list(columns)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def signin(error: str | None, users_configured: bool) -> Html:
    hint = Html("") if users_configured else Html(
        '<p class="notice">No <code>admin.users</code> are configured: nobody can sign in.</p>')
    failure = render('<p class="error" role="alert">$e</p>', e=error) if error else Html("")
    return render('$hint$failure<form method="post" action="/signin" class="signin">'
                  '<label>name <input name="name" autocomplete="username" required autofocus></label>'
                  '<label>password <input name="password" type="password" autocomplete="current-password" required>'
                  '</label><button type="submit">Sign in</button></form>', hint=hint, failure=failure)

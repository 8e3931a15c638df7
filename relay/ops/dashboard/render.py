"""HTML from the standard library: ``string.Template`` whose every value is escaped unless marked safe.

Escaping is the default, not a habit: :func:`render` escapes each value it substitutes, and
only fragments that :func:`render` (or :func:`join`) itself produced are marked :class:`Html`
and pass through. No value from the spool, the config or the request can add markup.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from string import Template
from urllib.parse import urlencode


class Html(str):
    """Markup already escaped by :func:`render`."""


def escape(value: object) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def render(template: str, **values: object) -> Html:
    """``template`` with ``$name`` substituted by escaped ``values`` (Html values as they are)."""
    return Html(Template(template).substitute({key: escape(value) for key, value in values.items()}))


def join(parts: Iterable[Html]) -> Html:
    return Html("".join(escape(part) for part in parts))


def json_island(element_id: str, data: object) -> Html:
    """Data for a page's script, in a ``<script type="application/json">`` no payload can close early."""
    text = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Html(f'<script type="application/json" id="{escape(element_id)}">{text}</script>')


def when(t: float | None) -> str:
    """A time as operators read it in a table: UTC, to the second."""
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def link(path: str, text: object, **query: object) -> Html:
    shown = {key: value for key, value in query.items() if value not in (None, "")}
    href = path + ("?" + urlencode(shown) if shown else "")
    return render('<a href="$href">$text</a>', href=href, text=text)


def select(name: str, values: Iterable[str], chosen: str, empty_label: str = "") -> Html:
    """A ``<select>`` with ``chosen`` selected; the empty value is shown as ``empty_label``."""
    options = join(render('<option value="$v"$sel>$label</option>', v=v, label=v or empty_label,
                          sel=Html(" selected") if v == chosen else Html("")) for v in values)
    return render('<select name="$name">$options</select>', name=name, options=options)


def table(headings: Iterable[str], rows: Iterable[Iterable[object]], css: str = "") -> Html:
    head = join(render("<th>$h</th>", h=h) for h in headings)
    body = join(render("<tr>$cells</tr>", cells=join(render("<td>$c</td>", c=c) for c in row)) for row in rows)
    return render('<table class="$css"><thead><tr>$head</tr></thead><tbody>$body</tbody></table>',
                  css=css, head=head, body=body)


_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · sendcloud-relay</title>
<link rel="stylesheet" href="/static/dashboard.css">
<link rel="stylesheet" href="/static/uPlot.min.css">
</head><body>
<header><strong>sendcloud-relay</strong>
<nav>$nav</nav>
$who
</header>
<main><h1>$title</h1>
$notice
$body
</main>
<script src="/static/uPlot.iife.min.js"></script>
<script src="/static/charts.js"></script>
</body></html>
"""

NAV = (("/", "Overview"), ("/messages", "Messages"), ("/suppression", "Suppression"), ("/stats", "Statistics"))


def page(title: str, body: Html, *, user: str | None = None, role: str | None = None, csrf: str | None = None,
         notice: str | None = None) -> Html:
    """A whole page: the navigation, who is signed in (with the sign-out form), and ``body``."""
    nav = join(link(path, name) for path, name in NAV) if user else Html("")
    who = Html("")
    if user:
        who = render('<form method="post" action="/signout" class="who">$user ($role) $csrf'
                     '<button type="submit">Sign out</button></form>', user=user, role=role, csrf=csrf_field(csrf))
    shown = render('<p class="notice" role="status">$n</p>', n=notice) if notice else Html("")
    return render(_LAYOUT, title=title, nav=nav, who=who, notice=shown, body=body)


def csrf_field(token: str | None) -> Html:
    return render('<input type="hidden" name="csrf" value="$t">', t=token or "")


def post_button(action: str, label: str, csrf: str | None, **fields: str) -> Html:
    """A one-button form that changes something (operators only: callers decide)."""
    hidden = join(render('<input type="hidden" name="$k" value="$v">', k=k, v=v) for k, v in fields.items())
    return render('<form method="post" action="$action" class="inline">$csrf$hidden'
                  '<button type="submit">$label</button></form>',
                  action=action, csrf=csrf_field(csrf), hidden=hidden, label=label)

"""The one intake both fronts call: SMTP DATA and HTTP submission run the same policy and pipeline.

Postfix's ``smtpd`` and its ``sendmail``/``pickup`` both end in ``cleanup``: one place decides
routing, rewriting and what reaches the queue. Here that place sits between the fronts
(:mod:`relay.smtp`, :mod:`relay.webapi`) and :mod:`relay.rewrite`: prepare (route, rewrite,
sign), the :class:`~relay.spool.NewMessage`, the rate budgets (checked, charged before the
spool, given back if it fails), the store callable the process wiring hands over (spool commit
+ scheduler) and the ``queued`` log line and metrics. A front only turns its protocol into a
:class:`~relay.rewrite.pipeline.Submission` and a :class:`Refused` into its own answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.config import Config, Rate
from relay.errors import SMTPReply, spool_unavailable
from relay.observe import metrics
from relay.observe.logs import event
from relay.policy.checks import check_rate, check_recipient, check_relay, rate_budgets
from relay.policy.rates import PersistentRates
from relay.policy.suppression import SuppressionCache
from relay.rewrite.pipeline import Preparer, Submission
from relay.spool import NewMessage, new_queue_id

log = logging.getLogger("relay.smtpd")


class Refused(Exception):
    """The intake will not take the message: ``reply`` says why, ``fields`` go in the NOQUEUE line."""

    def __init__(self, reply: SMTPReply, **fields):
        super().__init__(str(reply))
        self.reply = reply
        self.fields = fields


@dataclass
class Intake:
    config: Callable[[], Config]
    preparer: Preparer
    rates: PersistentRates
    # Makes the message durable (the group commit, fsynced) and hands it to delivery.
    store: Callable[[NewMessage], Awaitable[None]]
    suppressions: SuppressionCache | None = None
    _clock: Callable[[], float] = field(default=time.time, repr=False)

    # -- per recipient: what SMTP asks at RCPT and HTTP asks for each listed address ----------

    def recipient_refusal(self, config: Config, user: str | None, client_ip: str, address: str,
                          accepted_so_far: int) -> SMTPReply | None:
        """Why ``address`` may not be one more recipient, or None (relay, count, suppression, rate)."""
        return (
            check_relay(user, address)
            or check_recipient(address, accepted_so_far, config.server.max_recipients)
            or self.suppressed(config, user, address)
            or self.over_rate(rate_budgets(config, user, client_ip), accepted_so_far + 1)
        )

    def suppressed(self, config: Config, user: str | None, address: str) -> SMTPReply | None:
        """550 when the address is suppressed for every channel the user has (from the cache: no I/O)."""
        cache = self.suppressions
        if cache is None or user is None or user not in config.users:
            return None
        return cache.rcpt_refusal(address, config.users[user].channels)

    def over_rate(self, budgets: list[tuple[str, str, Rate]], adding: int) -> SMTPReply | None:
        counter = self.rates.counter
        for who, key, rate in budgets:
            refusal = check_rate(who, counter.used(key, rate.period), adding, rate)
            if refusal is not None:
                return refusal
        return None

    def _charge(self, budgets: list[tuple[str, str, Rate]], recipients: int) -> None:
        for _, key, rate in budgets:
            self.rates.counter.add(key, rate.period, recipients)

    # -- the message ---------------------------------------------------------------------------

    async def accept(self, submission: Submission, started: float, label: int | None = None) -> NewMessage:
        """Prepare, charge and store ``submission``; returns once it is on disk, else raises Refused.

        ``label`` (a request's own SendCloud label) wins over the route's. ``started`` is the
        front's monotonic clock when the message began, for the latency metric.
        """
        config = self.config()
        now = self._clock()
        queue_id = new_queue_id(now)
        user = submission.user
        try:
            prepared = await self.preparer.prepare(config, submission, queue_id, now)
        except SMTPReply as refusal:
            raise Refused(refusal, **{"from": submission.sender}) from None
        # The spooled pieces are views of the text as received, so it is held once while the
        # spool writes it; if prepare made a new text (bare LFs normalised) it is spent: free it.
        if isinstance(submission.data, bytearray) and not prepared.holds(submission.data):
            submission.data.clear()
        route = prepared.route
        message = NewMessage(
            id=queue_id,
            received_at=now,
            user=user,
            listener=submission.listener,
            client=submission.client_ip,
            account=route.account,
            channel=route.channel,
            sender=submission.sender,
            recipients=submission.recipients,
            body=prepared.body,
            label=label if label is not None else route.options.label,
            mail_from=prepared.mail_from if prepared.mail_from != submission.sender else None,
        )
        budgets = rate_budgets(config, user, submission.client_ip)
        over = self.over_rate(budgets, len(message.recipients))
        if over:  # checked per recipient, but concurrent sessions of the same user may have spent it since
            raise Refused(over, **{"from": submission.sender})
        self._charge(budgets, len(message.recipients))  # no await since the check: no session slips in
        try:
            await self.store(message)
        except Exception:  # whatever went wrong, the message is not on disk
            log.exception("could not spool a message from client=[%s]", submission.client_ip)
            self._charge(budgets, -len(message.recipients))
            raise Refused(spool_unavailable(), **{"from": submission.sender, "nrcpt": len(message.recipients)}) from None
        metrics.accepted(user, route.account, route.channel, submission.listener, time.monotonic() - started)
        event(log, message.id, {
            "client": message.client, "listener": message.listener, "user": user, "from": message.sender,
            "size": message.size, "nrcpt": len(message.recipients), "channel": route.channel,
            "account": route.account, "rule": route.rule, "label": message.label, "status": "queued",
        })
        return message

"""The events stage: what SendCloud's webhooks tell about each recipient after the 250.

SendCloud reports a recipient's fate (delivered, bounced, opened, unsubscribed, ...) only
through webhooks. The pure decisions about them — parsing and verifying a webhook, SendCloud's
status per recipient, the suppression list's maintenance, the statistics and the teams'
fan-out — are ``webhook``, ``status``, ``suppression``, ``stats`` and ``fanout``; ``receiver``,
``applier`` and ``fanout_worker`` do the I/O around them, and ``service`` runs them together.
"""

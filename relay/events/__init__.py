"""The events stage: what SendCloud's webhooks tell about each recipient after the 250.

SendCloud reports a recipient's fate (delivered, bounced, opened, unsubscribed, ...) only
through webhooks. This package holds the pure decisions about them — parsing and verifying a
webhook, SendCloud's status per recipient, the suppression list, the statistics and the teams'
fan-out — so the receiver and the stores around them only do I/O.
"""

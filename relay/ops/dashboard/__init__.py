"""The web dashboard on the admin endpoint: sign-in, overview, messages, suppression, statistics."""

from relay.ops.dashboard.app import Dashboard

__all__ = ["Dashboard"]

"""Delivery: the scheduler (what to try when), the retry decisions, and the upstream hop."""

from relay.delivery.scheduler import Scheduler

__all__ = ["Scheduler"]

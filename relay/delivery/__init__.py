"""Delivery: the scheduler (what to try when), the retry decisions, the upstream hop
(``transport``), SendCloud's reply conventions, and bounces (DSNs)."""

"""What every stage reports through: maillog-shaped log lines (``logs``), Prometheus metrics
(``metrics``, ``metrics_directory``), and the pure readiness rules (``health``). A low layer:
it imports no stage, and every stage may use it."""

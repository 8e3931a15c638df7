"""What a config reload can change in a running relay, and what waits for a restart.

Everything the relay reads per message or per connection changes at once: users and their
passwords, rules, accounts and their API keys, limits, TLS certificates, logging. What is
fixed when a socket, file or process is opened — the listeners, the acceptor processes, the
spool's file, the admin address — keeps its old value until a restart; :func:`restart_needed`
names those settings so the operator is told instead of left wondering.
"""

from __future__ import annotations

from relay.config import Config


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted names of changed settings that a reload cannot apply."""
    changed = []
    if old.server.listeners != new.server.listeners:
        changed.append("server.listeners")
    if old.server.processes != new.server.processes:
        changed.append("server.processes")
    if (old.server.tls is None) != (new.server.tls is None):
        changed.append("server.tls")  # turning TLS on or off, as opposed to a new certificate
    if (old.spool.backend, old.spool.path) != (new.spool.backend, new.spool.path):
        changed.append("spool.path")
    for key in ("dsn", "node", "lease"):  # the shared spool's connection and identity are made at start
        if getattr(old.spool, key) != getattr(new.spool, key):
            changed.append(f"spool.{key}")
    if old.admin.listen != new.admin.listen:
        changed.append("admin.listen")
    if (old.events.listen, old.events.tls) != (new.events.listen, new.events.tls):
        changed.append("events.listen")  # the receiver's socket and certificate are made at start
    if (old.http_api.listen, old.http_api.tls) != (new.http_api.listen, new.http_api.tls):
        changed.append("http_api.listen")  # likewise the Web API listener's
    return changed

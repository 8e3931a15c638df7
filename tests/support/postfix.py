"""A private, real Postfix that uses the relay as its smarthost, as a customer's server would.

End-to-end tests inject mail into this Postfix over SMTP; it relays everything to
``[127.0.0.1]:relay_port`` with STARTTLS and SASL, which is the most common way the relay
will be used in production. Debian's postfix 3.7 package is used as installed, with its
own configuration directory, queue, data directory and log file, so it never touches
/etc/postfix or a system Postfix, and instances can follow each other in one test run.

Postfix must run as root (its master binds, then drops to the ``postfix`` user).

Pitfalls this module handles (see shared/notes/performance.md, testing.md):

- ``maillog_file`` must lie under ``maillog_file_prefixes`` (``/var`` by default), else
  ``postfix start`` exits 1 without a word; so the log is written to a unique
  ``/var/log/postfix-smarthost-<id>.log`` and moved into ``workdir`` by stop().
- The queue directory must exist before ``postfix start``; ``start`` then creates its
  subdirectories itself (``postfix-script check-fatal`` runs ``post-install
  create-missing``). ``-c`` takes an absolute path, and ``postmap`` needs it too (it reads
  main.cf, and Debian's "No configuration" install has no /etc/postfix/main.cf).
- The data directory must belong to ``postfix`` and be reachable by that user along its
  whole absolute path (the master opens ``master.lock`` there after dropping privileges).
  pytest's ``tmp_path`` sits under a 0700 root-owned directory, so the data directory is a
  unique ``/var/lib/postfix-smarthost-<id>``, removed by stop(). The queue directory can
  stay under ``workdir``: Postfix enters it as root and then uses relative paths only.
- Every service runs with chroot off: a chroot would need copies of /etc/resolv.conf,
  the SASL plugins and more inside the queue directory.
- With ``smtp_tls_security_level = encrypt`` Postfix encrypts but verifies nothing;
  ``smtp_tls_CAfile`` (the test CA) lets its log say "Trusted TLS connection".
- Retry timers are cut to seconds so tests of upstream outages finish quickly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import smtplib
import subprocess
import time
import uuid

from tests.support import free_port

POSTFIX = "/usr/sbin/postfix"
POSTMAP = "/usr/sbin/postmap"
POSTQUEUE = "/usr/sbin/postqueue"


def postfix_available() -> bool:
    """True if Postfix can be run here: its binaries exist and we are root (it must start as root)."""
    return os.path.exists(POSTFIX) and os.path.exists(POSTMAP) and os.geteuid() == 0


# The private instance's master.cf, shared with the benchmark's Postfix (bench/peers.py).
MASTER_CF = (pathlib.Path(__file__).parent / "postfix-master.cf").read_text()


class PostfixSmarthost:
    """A Postfix instance under ``workdir`` relaying all mail to ``[127.0.0.1]:relay_port``.

    It authenticates as ``username``/``password`` (SASL, any mechanism the relay offers)
    after a mandatory STARTTLS, trusting ``ca_file``. Mail for it is injected over SMTP at
    ``127.0.0.1:inject_port`` (a free port is picked when None); 127.0.0.0/8 may relay.
    The queue survives stop()/start(), like a real MTA's. Use as a context manager.
    """

    def __init__(self, workdir: pathlib.Path, relay_port: int, username: str, password: str,
                 ca_file: pathlib.Path, inject_port: int | None = None):
        # sasl_passwd holds "user:password" as the rest of a line, split at the first ":".
        if not username or ":" in username or any(c.isspace() for c in username):
            raise ValueError(f"username {username!r} cannot be written to a Postfix sasl_passwd table")
        if not password or "\n" in password or password != password.strip():
            raise ValueError("password cannot be written to a Postfix sasl_passwd table")
        self.workdir = pathlib.Path(workdir).absolute()
        self.relay_port = relay_port
        self.username = username
        self.password = password
        self.ca_file = pathlib.Path(ca_file).absolute()
        self.inject_port = inject_port if inject_port is not None else free_port()
        self.instance = f"postfix-smarthost-{uuid.uuid4().hex[:12]}"
        self.config_dir = self.workdir / "postfix" / "etc"
        self.queue_dir = self.workdir / "postfix" / "spool"
        self.data_dir = pathlib.Path("/var/lib") / self.instance
        self.maillog_file = pathlib.Path("/var/log") / f"{self.instance}.log"
        self.saved_maillog = self.workdir / "postfix" / "maillog"
        self._running = False

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Postfix and wait until its smtpd greets on ``inject_port``."""
        if self._running:
            raise RuntimeError("Postfix smarthost already running")
        try:
            self._write_config()
            self._run(POSTFIX, "-c", str(self.config_dir), "start")
        except BaseException:
            self._clean_var()
            raise
        self._running = True
        deadline = time.monotonic() + timeout
        while True:
            try:  # a greeting proves smtpd itself runs, not only the master's listener
                smtplib.SMTP("127.0.0.1", self.inject_port, timeout=5).quit()
                return
            except OSError as error:  # smtplib's errors are OSErrors too
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Postfix smarthost not listening on 127.0.0.1:{self.inject_port} "
                        f"after {timeout}s ({error}); maillog:\n{self.log()}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop Postfix (``postfix stop`` waits for its master to exit), keep its log in workdir."""
        if not self._running:
            return
        self._running = False
        try:
            self._run(POSTFIX, "-c", str(self.config_dir), "stop")
        finally:
            self._clean_var()

    def log(self) -> str:
        """The maillog text of this instance so far (for assertion messages)."""
        text = self.saved_maillog.read_text(errors="replace") if self.saved_maillog.exists() else ""
        if self.maillog_file.exists():
            text += self.maillog_file.read_text(errors="replace")
        return text

    def queue_is_empty(self) -> bool:
        """True when ``postqueue -p`` lists no message (nothing waiting to be relayed)."""
        listing = self._run(POSTQUEUE, "-c", str(self.config_dir), "-p")
        return listing.strip() == "Mail queue is empty"

    def __enter__(self) -> PostfixSmarthost:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _clean_var(self) -> None:
        """Move the maillog into workdir and delete the data directory: runs leave nothing under /var."""
        if self.maillog_file.exists():
            with self.saved_maillog.open("a") as saved:
                saved.write(self.maillog_file.read_text(errors="replace"))
            self.maillog_file.unlink()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _write_config(self) -> None:
        """Create the directories, main.cf, master.cf and the postmapped SASL password table."""
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, user="postfix")
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(inject=f"127.0.0.1:{self.inject_port}"))
        sasl_passwd = self.config_dir / "sasl_passwd"
        sasl_passwd.touch(mode=0o600)
        sasl_passwd.write_text(f"[127.0.0.1]:{self.relay_port} {self.username}:{self.password}\n")
        self._run(POSTMAP, "-c", str(self.config_dir), f"hash:{sasl_passwd}")
        os.chmod(f"{sasl_passwd}.db", 0o600)

    def _main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
myhostname = smarthost.test
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
maillog_file = {self.maillog_file}
syslog_name = {self.instance}

# Accept from loopback only and relay everything to the relay; deliver nothing locally.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
smtpd_peername_lookup = no
relayhost = [127.0.0.1]:{self.relay_port}

smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = hash:{self.config_dir}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {self.ca_file}
smtp_tls_loglevel = 1

# Retry within seconds, not minutes, once the relay is back.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""

    def _run(self, *command: str) -> str:
        """Run a Postfix command; on failure raise with its output and this instance's maillog."""
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\nmaillog:\n{self.log()}"
            )
        return result.stdout

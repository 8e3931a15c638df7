"""The relay under test, run as operators run it: `python -m relay serve -c FILE` in a process.

A separate process is what makes SIGTERM, SIGKILL and restart tests real, and it keeps the
synchronous test clients (smtplib, swaks, Postfix) from sharing an event loop with the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


class RelayProcess:
    """Writes ``config`` (a dict) to ``workdir/relay.yaml`` and runs the relay there."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.config_path = workdir / "relay.yaml"
        self.log_path = workdir / "relay.log"
        self.process: subprocess.Popen | None = None
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def port(self, listener: str) -> int:
        return next(item["port"] for item in self.config["server"]["listeners"] if item["name"] == listener)

    def start(self, timeout: float = 20.0) -> RelayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for listener in self.config["server"]["listeners"]:
            if not wait_for_port("127.0.0.1", listener["port"], timeout, self.process):
                self.kill()
                raise AssertionError(f"relay did not start listening on {listener['port']}:\n{self.log()}")
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the orderly shutdown path."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.process = None

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, input: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run another `sendcloud-relay` command against this relay's config."""
        command = [sys.executable, "-m", "relay", *args]
        if args and args[0] in ("queue", "check-config"):
            command += ["-c", str(self.config_path)]
        return subprocess.run(
            command, cwd=self.workdir, env=self.env, input=input, capture_output=True, text=True, timeout=60, check=check
        )

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            try:
                self.stop(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

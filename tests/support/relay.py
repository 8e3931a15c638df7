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
import urllib.error
import urllib.request
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
        ports = [listener["port"] for listener in self.config["server"]["listeners"]]
        if self.admin_address:
            ports.append(self.admin_address[1])
        for port in ports:
            if not wait_for_port("127.0.0.1", port, timeout, self.process):
                self.kill()
                raise AssertionError(f"relay did not start listening on {port}:\n{self.log()}")
        return self

    @property
    def admin_address(self) -> tuple[str, int] | None:
        listen = self.config.get("admin", {}).get("listen")
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        return host, int(port)

    def http(self, path: str, method: str = "GET", token: str | None = None) -> tuple[int, str]:
        """One request to the admin endpoint: (status, body), errors included."""
        host, port = self.admin_address
        request = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

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
        if args and args[0] in ("queue", "check-config", "reload"):
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

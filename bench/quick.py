"""Quick load: smtp-source → relay (trusted network, SQLite spool) → smtp-sink, on 127.0.0.1.

    .venv/bin/python bench/quick.py [--messages 5000] [--sessions 20] [--size 5120] [--strace]

Prints accepted msgs/s (until smtp-source has every 250), end-to-end msgs/s (until smtp-sink
has counted every message) and fsyncs per message: the spool's own commit count (one WAL
fsync each, from the relay's shutdown log line) and, with --strace, what `strace -f -c`
counted. Needs Debian's postfix package for smtp-source and smtp-sink. The full comparison
with Postfix is the job of the benchmark suite (issue #6); this is the yardstick for the core.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def sink_count(output: Path) -> int:
    counts = re.findall(rb"mesg=(\d+)", output.read_bytes())
    return int(counts[-1]) if counts else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--strace", action="store_true", help="count fsync/fdatasync with strace -f -c")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: apt-get install postfix")

    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    sink_port, relay_port = free_port(), free_port()
    config = {
        "server": {
            "hostname": "bench.relay",
            "listeners": [{"name": "smtp", "bind": "127.0.0.1", "port": relay_port, "tls": "none", "auth": "none"}],
            "trusted_networks": [{"cidr": "127.0.0.0/8", "user": "bench"}],
            "max_recipients": 1000,
        },
        "spool": {"path": str(work / "spool.db")},
        "upstream": {"kind": "smtp", "host": "127.0.0.1", "port": sink_port, "tls": "none", "connections_per_account": 8},
        "accounts": {"sink": {"api_user": "sink_user", "type": "trigger", "domain": "bench.test"}},
        "users": {"bench": {"channels": {"trigger": "sink"}}},
    }
    (work / "relay.yaml").write_text(yaml.safe_dump(config))
    sink_out = work / "sink.out"
    sink = subprocess.Popen(
        ["/usr/sbin/smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
        stdout=open(sink_out, "wb"), stderr=subprocess.STDOUT,
    )
    command = [sys.executable, "-m", "relay", "serve", "-c", str(work / "relay.yaml")]
    if args.strace:
        command = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(work / "strace.txt"), *command]
    log = open(work / "relay.log", "wb")
    relay = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(sink_port)
        wait_port(relay_port)
        started = time.monotonic()
        subprocess.run(
            ["/usr/sbin/smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
             "-f", "bench@bench.test", "-t", "sink@example.net", f"127.0.0.1:{relay_port}"],
            check=True,
        )
        accepted = time.monotonic() - started
        while sink_count(sink_out) < args.messages:
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {sink_count(sink_out)} of {args.messages} reached the sink")
            time.sleep(0.02)
        end_to_end = time.monotonic() - started
    finally:
        # Under strace the relay is strace's child: signal it, and strace exits after it.
        target = relay.pid
        if args.strace:
            children = Path(f"/proc/{relay.pid}/task/{relay.pid}/children").read_text().split()
            target = int(children[0]) if children else relay.pid
        os.kill(target, signal.SIGTERM)
        relay.wait(60)
        sink.terminate()
        sink.wait(10)
    text = (work / "relay.log").read_text()
    stats = re.search(r"after (\d+) writes in (\d+) commits", text)
    print(f"messages {args.messages}, {args.size} bytes, {args.sessions} sessions")
    print(f"accepted:    {args.messages / accepted:8.0f} msgs/s ({accepted:.2f} s)")
    print(f"end to end:  {args.messages / end_to_end:8.0f} msgs/s ({end_to_end:.2f} s)")
    if stats:
        writes, commits = map(int, stats.groups())
        print(f"spool:       {commits} commits for {writes} writes = {commits / args.messages:.2f} fsyncs per message")
    if args.strace:
        calls = sum(int(m) for m in re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync", (work / "strace.txt").read_text(), re.M))
        print(f"strace:      {calls} fsync+fdatasync calls = {calls / args.messages:.2f} per message")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

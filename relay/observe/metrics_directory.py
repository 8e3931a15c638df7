"""Where the processes of one relay keep their metrics (prometheus-client's multiprocess mode).

Apart from :mod:`relay.observe.metrics` so that ``serve`` can set it up before anything imports that
module: prometheus-client picks its value storage when each metric is created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
PROCESS_NAME = "SENDCLOUD_RELAY_METRICS_PROCESS"  # this process's file names in that directory


@contextlib.contextmanager
def shared_metrics(several_processes: bool) -> Iterator[None]:
    """A relay of several processes: a private directory (mode 0700) for the whole run, removed
    at exit (a ``kill -9`` leaves a few 64 KB files in the temp directory)."""
    if not several_processes:
        os.environ.pop(DIRECTORY, None)  # an inherited one would only collect stale files
        yield
        return
    if "relay.observe.metrics" in sys.modules:  # its metrics would already keep their values in memory
        raise RuntimeError("relay.observe.metrics was imported before the metrics directory was set up")
    directory = tempfile.mkdtemp(prefix="sendcloud-relay-metrics-")
    os.environ[DIRECTORY] = directory
    os.environ[PROCESS_NAME] = "main"
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)

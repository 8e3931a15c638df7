"""Hypothesis profiles for the fuzz tests.

The default profile is derandomized (the same cases every run, so the suite stays
deterministic) and small enough to keep the suite fast. ``RELAY_FUZZ_EXAMPLES=N`` raises the
number of cases per test and draws them at random: the soak run for finding new crashes.
Every crash found becomes an ``@example`` on its test, so it is replayed in every run.
"""

import os

from hypothesis import HealthCheck, settings

_examples = os.environ.get("RELAY_FUZZ_EXAMPLES")
settings.register_profile(
    "relay",
    max_examples=int(_examples) if _examples else 200,
    derandomize=not _examples,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("relay")

# The live-relay fuzz tests use the end-to-end fixtures (a CA, the client's TLS context).
from tests.e2e.conftest import ca, ca_file, client_tls  # noqa: E402, F401

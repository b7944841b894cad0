"""Shared test configuration.

Hypothesis profiles: ``ci`` (loaded when the ``CI`` environment variable is
set) keeps example counts bounded and tolerates a noisy 2-core machine by
disabling per-example deadlines; ``dev`` explores more; ``thorough`` runs
1,000 examples for every property test (``strategies.at_most`` caps the
count of slow tests in the other profiles, not in this one). Pick one
explicitly with ``--hypothesis-profile``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

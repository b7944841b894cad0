"""The Hypothesis profiles of conftest.py do what tests/README.md says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from strategies import _profile_name, at_most


@pytest.fixture
def restore_profile() -> Iterator[None]:
    name = _profile_name()
    yield
    settings.load_profile(name)


@pytest.mark.usefixtures("restore_profile")
def test_at_most_caps_ci_and_dev_but_not_thorough() -> None:
    settings.load_profile("ci")
    assert at_most(25).max_examples == 25
    assert at_most(400).max_examples == 40
    settings.load_profile("dev")
    assert at_most(400).max_examples == 100
    assert at_most(50, stateful_step_count=20).stateful_step_count == 20
    settings.load_profile("thorough")
    assert at_most(25).max_examples == 1000
    assert (
        at_most(50, stateful_step_count=20).stateful_step_count
        == settings.default.stateful_step_count
    )
    assert settings.default.deadline is None

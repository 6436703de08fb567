"""Suite-wide settings: hypothesis must not judge speed on a shared 2-core machine."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# before anything imports it, so its assertions are rewritten too
pytest.register_assert_rewrite("labfixtures")
pytest_plugins = ["labfixtures"]  # the `lab` and `lab_factory` fixtures

settings.register_profile(
    "holepunch",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=200,
)
settings.load_profile("holepunch")

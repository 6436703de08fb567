"""Suite-wide settings: hypothesis must not judge speed on a shared 2-core machine."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# before anything imports it, so its assertions are rewritten too
pytest.register_assert_rewrite("testsupport")
# the `lab`, `lab_factory` and `coturn` fixtures
pytest_plugins = ["testsupport.lab", "testsupport.stun"]

settings.register_profile(
    "holepunch",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=200,
)
settings.load_profile("holepunch")

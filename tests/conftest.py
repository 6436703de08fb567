"""Suite-wide settings: hypothesis must not judge speed on a shared 2-core machine."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "holepunch",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=200,
)
settings.load_profile("holepunch")

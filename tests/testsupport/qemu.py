"""QEMU tests need qemu-system-x86_64 and root; under CI=true they must run."""

from __future__ import annotations

import os
import shutil

import pytest


def require_qemu() -> None:
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 not installed")
    if os.geteuid() != 0:
        missing.append("not root")
    if missing:
        reason = ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(f"QEMU tests are required under CI=true: {reason}")
        pytest.skip(reason)

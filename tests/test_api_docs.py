"""docs/api.md says everything it names is importable from ``holepunch_mig``: hold it to
that, and to the report fields it documents."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import holepunch_mig
from holepunch_mig.report import Report

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
#: CamelCase names in backticks that are not ours (Python's, trio's)
NOT_OURS = {"None", "TypeError", "Stream"}


def test_every_class_the_api_page_names_is_importable() -> None:
    names = set(re.findall(r"`([A-Z][a-z]+[A-Za-z]*)[`(.]", API)) - NOT_OURS
    assert {"ResumeFailed", "TunnelRefused", "HandoffRefused", "Interruption"} <= names
    missing = sorted(n for n in names if not hasattr(holepunch_mig, n))
    assert not missing, f"named in docs/api.md but not importable: {missing}"
    assert set(holepunch_mig.__all__) >= names


def test_every_report_field_is_documented() -> None:
    section = API.split("## Report", 1)[1].split("\n## ", 1)[0]
    undocumented = [
        f.name
        for f in dataclasses.fields(Report)
        if f.name != "extra" and f"`{f.name}`" not in section
    ]
    assert not undocumented, undocumented

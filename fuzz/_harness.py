"""Shared runner for the fuzz targets in this directory.

Every target module defines ``test_one_input(data: bytes) -> None``, which must return
normally for every input: a decoder may reject input only with its specific error class
(caught inside the target), and anything else (another exception, a hang caught by
libFuzzer's ``-timeout``, memory past ``-rss_limit_mb``) is a finding.

``main(module_file, fn)`` runs the target under atheris (coverage-guided, libFuzzer
flags on the command line: ``python fuzz/fuzz_messages.py CORPUS_DIR -max_total_time=60``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def main(fn: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, fn)
    atheris.Fuzz()

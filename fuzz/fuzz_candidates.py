"""Fuzz target: the ICE candidate-line parser and ``parse_endpoint``.

``Candidate.from_line`` and ``parse_endpoint`` must return a value or raise
``CandidateError``; a parsed candidate must round-trip through ``to_line``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["holepunch_mig"]):
        from holepunch_mig.errors import CandidateError
        from holepunch_mig.wire.candidates import Candidate, parse_endpoint
else:
    from holepunch_mig.errors import CandidateError
    from holepunch_mig.wire.candidates import Candidate, parse_endpoint


# KNOWN BUG (tests/wire/test_fuzz_properties.py::test_hostname_check_is_not_exponential, xfail):
# parse_endpoint(allow_hostname=True) backtracks exponentially on a long name with one bad
# character (26 characters take ~10 s).  Until it is fixed, hostname mode is fuzzed with
# short inputs only, so this target keeps finding other bugs.  Remove when fixed.
KNOWN_BUG_MAX_HOSTNAME = 16


def test_one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "surrogateescape")
    mode = data[0] % 3
    if mode == 2:
        if data[0] & 4 and len(text) > KNOWN_BUG_MAX_HOSTNAME:
            return
        try:
            host, port = parse_endpoint(text, allow_hostname=bool(data[0] & 4))
        except CandidateError:
            return
        assert isinstance(host, str) and 1 <= port <= 65535
        return
    try:
        cand = Candidate.from_line(text)
    except CandidateError:
        return
    line = cand.to_line()
    assert Candidate.from_line(line) == cand, (text, line)


if __name__ == "__main__":
    from _harness import main

    main(test_one_input)

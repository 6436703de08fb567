"""The API's commit step: the destination runs it after END verified and before it says
ok; a failing commit is ``ok: false`` at the source, and nothing says ok before it."""

from __future__ import annotations

import io
import os

import pytest
import trio

from holepunch_mig.errors import CommitFailed, PeerAbort
from holepunch_mig.session import api
from holepunch_mig.session.link import TransferResult
from holepunch_mig.testing import memory_channel_pair


@pytest.mark.parametrize("resume", [0, 3])
async def test_commit_runs_before_ok_and_its_failure_fails_both(resume: int) -> None:
    a, b = memory_channel_pair()
    data = os.urandom(3 << 20)
    seen: list[TransferResult] = []
    outcome: dict[str, BaseException] = {}

    def commit(result: TransferResult) -> None:
        seen.append(result)
        raise OSError(28, "No space left on device")

    async def source() -> None:
        async with api.connect(a, role="source", resume_attempts=resume) as link:
            try:
                await link.send_file(io.BytesIO(data))
            except PeerAbort as exc:
                outcome["source"] = exc

    async def destination() -> None:
        async with api.connect(b, role="destination", resume_attempts=resume) as link:
            try:
                await link.receive_file(io.BytesIO(), commit=commit)
            except CommitFailed as exc:
                outcome["destination"] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    assert [(r.bytes, r.verified) for r in seen] == [(len(data), True)]
    assert "No space left on device" in str(outcome["destination"])
    assert "No space left on device" in str(outcome["source"])

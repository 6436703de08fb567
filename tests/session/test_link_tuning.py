"""Link.send_file/receive_file hand ``pipeline``/``prefetch`` to the record layer (the
bench's --pipeline/--prefetch reach the session rows through them)."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import trio

from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.session import api
from holepunch_mig.testing import memory_channel_pair


async def test_pipeline_and_prefetch_reach_the_record_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}
    send_file, receive_file = RecordWriter.send_file, RecordReader.receive_file

    def spy_send(self: RecordWriter, *args: Any, **kw: Any) -> Any:
        seen["pipeline"] = kw["pipeline"]
        return send_file(self, *args, **kw)

    def spy_receive(self: RecordReader, *args: Any, **kw: Any) -> Any:
        seen["prefetch"] = kw["prefetch"]
        return receive_file(self, *args, **kw)

    monkeypatch.setattr(RecordWriter, "send_file", spy_send)
    monkeypatch.setattr(RecordReader, "receive_file", spy_receive)
    a, b = memory_channel_pair()
    data = os.urandom(1 << 20)
    out = io.BytesIO()

    async def source() -> None:
        async with api.connect(a, role="source") as link:
            await link.send_file(io.BytesIO(data), pipeline=0)

    async def destination() -> None:
        async with api.connect(b, role="destination") as link:
            await link.receive_file(out, prefetch=5)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    assert seen == {"pipeline": 0, "prefetch": 5}
    assert out.getvalue() == data

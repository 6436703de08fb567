"""Tunnel throughput vs the direct encrypted link vs stop-and-wait, over loopback.

All three move the same AES-GCM record stream (Link.send_file / receive_file, sha256 on)
between a source in this process and a destination in a forked child (two event loops,
two GILs, as on two hosts; both share this machine's cores); the control channel is a
real loopback TCP connection with length-prefixed frames (StreamChannel), as the CLI's
--control uses:

* ``direct``: policy "direct": records on the punched loopback TCP link;
* ``tunnel``: policy "tunnel": records as 64 KiB TunnelData messages over the control
  connection, 16 MiB window, credit per 4 MiB;
* ``stop-and-wait``: the tunnel with a one-chunk window and credit per chunk, i.e. one
  reply per 64 KiB chunk (the libvirt-style RPC tunnel baseline).

``measure_tunnel(mode, size)`` returns a dict for a bench harness; ``python -m
holepunch_mig.bench.tunnel_loopback [MiB]`` prints a table.  No delay emulation (0 ms RTT only).
"""

from __future__ import annotations

import io
import multiprocessing
import socket
import sys
import time
from typing import Any

import trio

from holepunch_mig.net.control import StreamChannel
from holepunch_mig.session import api
from holepunch_mig.wire.credit import MAX_CHUNK

MODES = ("direct", "tunnel", "stop-and-wait")


class _Zeros(io.RawIOBase):
    """``size`` bytes of a repeating pattern without holding them in memory."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(range(256)) * 4096

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left, len(self.block))
        b[:n] = self.block[:n]
        self.left -= n
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(b)
        self.count += n
        return n


def _control_sockets() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _options(mode: str) -> dict[str, Any]:
    options: dict[str, Any] = {"policy": "direct" if mode == "direct" else "tunnel"}
    if mode == "stop-and-wait":
        options.update(tunnel_window=MAX_CHUNK, tunnel_credit_batch=MAX_CHUNK)
    return options


def _destination_process(sock: socket.socket, mode: str, size: int) -> None:
    async def destination() -> None:
        channel = StreamChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        sink = _Sink()
        async with api.connect(channel, role="destination", **_options(mode)) as link:
            await link.receive_file(sink)  # type: ignore[arg-type]
        await channel.aclose()
        if sink.count != size:
            raise SystemExit(f"destination got {sink.count} bytes, expected {size}")

    trio.run(destination)


async def _source(sock: socket.socket, mode: str, size: int) -> dict[str, Any]:
    a = StreamChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    box: dict[str, Any] = {}

    async def source() -> None:
        async with api.connect(a, role="source", **_options(mode)) as link:
            started = time.perf_counter()
            await link.send_file(_Zeros(size))  # type: ignore[arg-type]
            box["seconds"] = time.perf_counter() - started
            box["path"] = link.path
            if link.tunnel is not None:
                box["credits"] = link.tunnel.stats.credits_received
                box["messages"] = link.tunnel.stats.messages_sent

    with trio.fail_after(600):
        await source()
    await a.aclose()
    box.update(mode=mode, bytes=size, mb_per_s=size / box["seconds"] / 1e6, rtt_ms=0)
    return box


def measure_tunnel(mode: str = "tunnel", size: int = 256 << 20) -> dict[str, Any]:
    """One transfer of ``size`` bytes in ``mode`` (see MODES); returns
    ``{mode, path, bytes, seconds, mb_per_s, rtt_ms, [credits, messages]}``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    client, server = _control_sockets()
    child = multiprocessing.get_context("fork").Process(
        target=_destination_process, args=(server, mode, size), daemon=True
    )
    child.start()
    server.close()
    try:
        result: dict[str, Any] = trio.run(_source, client, mode, size)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"destination process exited {child.exitcode}")
    return result


def main(argv: list[str]) -> None:
    size = (int(argv[0]) if argv else 512) << 20
    results = {mode: measure_tunnel(mode, size) for mode in MODES}
    direct = results["direct"]["mb_per_s"]
    print(f"{size >> 20} MiB over loopback, 0 ms RTT, sha256 on")
    for mode, r in results.items():
        extra = f", {r['credits']} credit msgs" if "credits" in r else ""
        print(
            f"{mode:14} {r['mb_per_s']:8.1f} MB/s  {r['mb_per_s'] / direct:5.2f}x direct"
            f"  ({r['seconds']:.2f} s{extra})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Userspace packet delay for the lab: an NFQUEUE reader over a raw netlink socket.

The lab kernels have no ``tc netem``.  They do have NFQUEUE (``xt_NFQUEUE`` via
iptables; nft's own ``queue`` expression is not built) and ``nfnetlink_queue``.  So the
lab sends every packet arriving on a side's outer interface to queue 0 of that
namespace, *before* conntrack::

    iptables -t raw -A PREROUTING -i wan -j NFQUEUE --queue-num 0

and this module, running inside the same namespace, holds each packet for a fixed time
and then lets it continue (``NF_ACCEPT``).  It speaks ``nfnetlink_queue`` directly
(``AF_NETLINK``, ``NETLINK_NETFILTER``): no C library, no PyPI package.

Design choices:

* ``NFQNL_COPY_META``: the kernel sends only the packet id and metadata, never the
  payload, so a notification is ~100 bytes whatever the packet size.
* ``NFQA_CFG_F_GSO``: GSO super-packets are queued whole instead of being segmented
  first (we never look at the payload), so a bulk TCP flow costs few notifications.
* The delay is constant, so packets leave in arrival order and one
  ``NFQNL_MSG_VERDICT_BATCH`` (accept every id <= N) releases all that are due.  A
  batch verdict also releases packets whose notification was lost (socket overrun).
* Packets are held before conntrack sees them: an outbound SYN is confirmed in
  conntrack the moment it leaves, and the peer's SYN waits "on the wire", as with a real
  link delay.  (Delaying *outbound* packets instead would hold them unconfirmed in the
  queue and make the router drop the peer's crossing SYN as NEW.)
* Queue length 16384; when it is full the kernel drops (like a real queue).

Run: ``python -m holepunch_mig.lab.delay --queue 0 --delay-ms 10 [--stats FILE]``.  It
prints ``ready`` on stdout once bound, then runs until SIGTERM/SIGINT, releasing
everything still held before it exits; ``--stats`` gets a JSON line with counters.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

from holepunch_mig.errors import DelayError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 0x4
NF_ACCEPT = 1

QUEUE_MAXLEN = 16384

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _NLATTR.size : offset + length]
        offset += _align(length)
    return out


class DelayQueue:
    """One bound NFQUEUE that releases each packet `delay` seconds after it arrived."""

    def __init__(self, queue: int, delay: float) -> None:
        if not 0 <= queue < 65536:
            raise ValueError(f"queue number {queue} out of range")
        self.queue = queue
        self.delay = delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._seq = 0
        self.pending: collections.deque[tuple[float, int]] = collections.deque()
        self.packets = 0
        self.batches = 0
        self.max_held = 0
        self.late_max = 0.0

    # ------------------------------------------------------------------ config

    def _request(self, msg_type: int, attrs: bytes) -> None:
        """Send a request with NLM_F_ACK and wait for its ack (or raise its error)."""
        self._seq += 1
        seq = self._seq
        self.sock.send(_message(msg_type, self.queue, attrs, seq, NLM_F_ACK))
        deadline = time.monotonic() + 2.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise DelayError(errno.ETIMEDOUT, "nfnetlink_queue did not acknowledge")
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_ERROR and mseq == seq:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if code:
                        raise DelayError(-code, f"nfnetlink_queue: {os.strerror(-code)}")
                    return
                offset += _align(max(length, _NLMSGHDR.size))

    def bind(self) -> None:
        cmd = struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)
        self._request(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_CMD, cmd))
        params = struct.pack("!IB", 0, NFQNL_COPY_META)
        flags = struct.pack("!I", NFQA_CFG_F_GSO)
        self._request(
            NFQNL_MSG_CONFIG,
            _attr(NFQA_CFG_PARAMS, params)
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            + _attr(NFQA_CFG_MASK, flags)
            + _attr(NFQA_CFG_FLAGS, flags),
        )

    def unbind(self) -> None:
        cmd = struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, socket.AF_INET)
        with contextlib.suppress(OSError):
            self._request(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_CMD, cmd))

    # ------------------------------------------------------------------ data path

    def _read(self) -> None:
        """Drain the socket without blocking; note each packet's release time."""
        now = time.monotonic()
        for _ in range(256):
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # lost notifications; batch verdicts cover them
                    continue
                raise
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    msg = data[offset : offset + length]
                    hdr = _attrs(msg, _NLMSGHDR.size + _NFGENMSG.size).get(NFQA_PACKET_HDR)
                    if hdr is not None and len(hdr) >= 4:
                        (packet_id,) = struct.unpack_from("!I", hdr)
                        self.pending.append((now + self.delay, packet_id))
                        self.packets += 1
                offset += _align(length)
            self.max_held = max(self.max_held, len(self.pending))

    def _release(self, now: float, everything: bool = False) -> None:
        last: int | None = None
        while self.pending and (everything or self.pending[0][0] <= now):
            due, last = self.pending.popleft()
            self.late_max = max(self.late_max, now - due)
        if last is not None:
            hdr = struct.pack("!II", NF_ACCEPT, last)
            self._seq += 1
            msg = _message(NFQNL_MSG_VERDICT_BATCH, self.queue, _attr(NFQA_VERDICT_HDR, hdr), 0, 0)
            self.sock.send(msg)
            self.batches += 1

    def run(self, stop: list[bool]) -> None:
        while not stop[0]:
            now = time.monotonic()
            wait = 0.5 if not self.pending else max(0.0, self.pending[0][0] - now)
            try:
                readable = select.select([self.sock], [], [], wait)[0]
            except InterruptedError:
                readable = []
            if readable:
                self._read()
            self._release(time.monotonic())
        self._read()
        self._release(time.monotonic(), everything=True)

    def stats(self) -> dict[str, object]:
        return {
            "queue": self.queue,
            "delay_ms": self.delay * 1000,
            "packets": self.packets,
            "batches": self.batches,
            "max_held": self.max_held,
            "max_late_ms": round(self.late_max * 1000, 3),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m holepunch_mig.lab.delay",
        description="Hold every packet of an NFQUEUE for a fixed delay (lab RTT emulation).",
    )
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--stats", default=None, metavar="PATH", help="write counters here")
    args = parser.parse_args(argv)
    stop = [False]

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    queue = DelayQueue(args.queue, args.delay_ms / 1000.0)
    try:
        queue.bind()
    except OSError as exc:
        sys.stderr.write(f"delay: cannot bind NFQUEUE {args.queue}: {exc}\n")
        return 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.close(sys.stdout.fileno())  # the lab's pipe: nothing else goes there
    try:
        queue.run(stop)
    finally:
        queue.unbind()
        if args.stats:
            with contextlib.suppress(OSError), open(args.stats, "w") as fh:
                fh.write(json.dumps(queue.stats()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

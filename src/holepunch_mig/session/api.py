"""Public entry points: trio (``connect``), threads (``connect_blocking``), asyncio
(``connect_asyncio``).

All three run the same session; the synchronous facade runs trio in a daemon thread and
crosses into it with ``trio.from_thread.run``, so a threaded migration manager never
has to know trio is there, and asyncio code awaits the facade through a thread.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, BinaryIO, TypeVar

import trio

from holepunch_mig.errors import HolepunchError, single_exception
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.net.secure_control import secure
from holepunch_mig.report import Report
from holepunch_mig.roles import ROLES, Role
from holepunch_mig.session.link import Commit, Link, Progress, TransferResult
from holepunch_mig.session.negotiate import establish
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.wire import messages
from holepunch_mig.wire.control_auth import ControlAuth

T = TypeVar("T")


def _options(**kwargs: Any) -> ConnectOptions:
    known = ConnectOptions.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    options = replace(ConnectOptions(), **kwargs)
    options.check()
    return options


async def _authenticated(
    channel: ControlChannel, role: Role, auth: ControlAuth | None, opts: ConnectOptions
) -> ControlChannel:
    if auth is None:
        return channel
    return await secure(
        channel, auth, initiator=role == "source", timeout=min(opts.control_timeout, 30.0)
    )


@asynccontextmanager
async def connect(
    channel: ControlChannel, *, role: Role, auth: ControlAuth | None = None, **options: Any
) -> AsyncIterator[Link]:
    """Punch, authenticate and nominate a direct link over ``channel`` (or, as ``policy``
    allows, run the tunnel over it).

    ``channel`` is trusted as it is (it authenticated the peer: SSH, a manager's own
    connection) unless ``auth`` is given: then the control handshake with those
    credentials (pinned keys, a pre-shared secret or a pairing code; see
    :class:`~holepunch_mig.ControlAuth`) runs first, every control message is sealed,
    and every link is bound to that handshake.  The source initiates it.

    ``role`` is ``"source"`` (migration source, controlling side) or ``"destination"``.
    Options are the fields of :class:`ConnectOptions`.  ``policy`` (the source's counts;
    a destination's ``"direct"`` forbids the tunnel): ``"direct"`` (default) a direct link
    or ``NoDirectPath``; ``"auto"`` direct first, then the tunnel (``link.fell_back`` and
    ``link.report.path == "tunnel"`` tell it, and a warning is logged); ``"tunnel"`` the
    tunnel only.  Raises ``NoDirectPath`` (``TunnelRefused`` when the destination forbids
    the tunnel), with ``.report`` and ``.verdict``, when no allowed path works.
    """
    if role not in ROLES:
        raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
    opts = _options(**options)
    with single_exception():
        channel = await _authenticated(channel, role, auth, opts)
        async with trio.open_nursery() as nursery:
            established = await establish(channel, role, opts, nursery=nursery)
            link = Link(established)
            try:
                yield link
            finally:
                await link.aclose()


async def abort(channel: ControlChannel, reason: str, *, timeout: float = 1.0) -> bool:
    """Tell the peer why this side stops (an ``abort`` message) before closing
    ``channel``, so the survivor can say "peer aborted: REASON" instead of "control channel
    closed".  Best effort, bounded by ``timeout`` and shielded from cancellation (it runs
    while an interrupt unwinds); True if the message went out."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await channel.send_message(messages.encode(messages.Abort(reason=reason[:4096])))
        except (HolepunchError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
    return False


class BlockingLink:
    """The synchronous twin of :class:`Link`; every call runs in the session's trio thread."""

    def __init__(self, token: trio.lowlevel.TrioToken, link: Link, done: Callable[[], None]):
        self._token = token
        self._link = link
        self._done = done
        self.report: Report = link.report
        self.fell_back: bool = link.fell_back
        self.path: str = link.path

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def send_file(
        self, src: BinaryIO, *, digest: bool = True, progress: Progress | None = None
    ) -> TransferResult:
        result: TransferResult = self._run(
            lambda: self._link.send_file(src, digest=digest, progress=progress)
        )
        return result

    def receive_file(
        self,
        dst: BinaryIO,
        *,
        digest: bool = True,
        progress: Progress | None = None,
        commit: Commit | None = None,
    ) -> TransferResult:
        result: TransferResult = self._run(
            lambda: self._link.receive_file(dst, digest=digest, progress=progress, commit=commit)
        )
        return result

    def close(self) -> None:
        self._done()

    def __enter__(self) -> BlockingLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_blocking(
    control: socket.socket, *, role: Role, auth: ControlAuth | None = None, **options: Any
) -> BlockingLink:
    """Threaded managers: hand in the connected control socket; get a blocking link.

    The control socket is owned by the session from here on and closed with the link.
    ``auth`` as for :func:`connect`.
    """
    opts = _options(**options)
    ready: queue.Queue[tuple[str, Any]] = queue.Queue()

    async def main() -> None:
        closing = trio.Event()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(control))
        channel: ControlChannel = StreamChannel(stream)
        async with trio.open_nursery() as nursery:
            try:
                channel = await _authenticated(channel, role, auth, opts)
                established = await establish(channel, role, opts, nursery=nursery)
            except BaseException as exc:
                await channel.aclose()
                ready.put(("error", exc))
                return
            link = Link(established)
            token = trio.lowlevel.current_trio_token()
            ready.put(("ok", (token, link, lambda: token.run_sync_soon(closing.set))))
            await closing.wait()
            await link.aclose()
            await channel.aclose()

    thread = threading.Thread(target=trio.run, args=(main,), name="holepunch-mig", daemon=True)
    thread.start()
    kind, value = ready.get()
    if kind == "error":
        thread.join()
        raise value
    token, link, done = value
    return BlockingLink(token, link, done)


async def connect_asyncio(
    control: socket.socket, *, role: Role, auth: ControlAuth | None = None, **options: Any
) -> BlockingLink:
    """asyncio managers: the blocking facade, awaited through a worker thread.

    Call the returned link's methods with ``await asyncio.to_thread(link.send_file, f)``.
    """
    return await asyncio.to_thread(
        lambda: connect_blocking(control, role=role, auth=auth, **options)
    )

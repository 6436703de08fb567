"""A small trio QMP client over a UNIX socket.

QMP (the QEMU Machine Protocol) is line-delimited JSON: a greeting, then one
``{"execute": ...}`` per command, answered by ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}``; asynchronous ``{"event": ...}``
messages can arrive at any time and are collected in :attr:`QmpClient.events`.

Only one command is in flight at a time (a lock serialises callers) and every
wait has a deadline.  ``qemu.qmp`` from PyPI is asyncio-only; this is the part of
it the project needs, written for trio.
"""

from __future__ import annotations

import array
import collections
import json
import logging
import socket
from typing import Any

import trio

from holepunch_mig.errors import QmpError

log = logging.getLogger(__name__)

_MAX_LINE = 16 * 1024 * 1024
_MAX_EVENTS = 1000


class QmpClient:
    """A connected, negotiated QMP session.  Build with :meth:`connect`."""

    def __init__(self, stream: trio.SocketStream, greeting: dict[str, Any]) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self.greeting = greeting
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_EVENTS)

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> QmpClient:
        """Connect to QEMU's QMP socket at ``path``, read the greeting and leave
        capabilities negotiation mode.  Retries while the socket does not exist yet
        (QEMU creates it shortly after start); raises QmpError after ``timeout``."""
        try:
            with trio.fail_after(timeout):
                while True:
                    try:
                        stream = await trio.open_unix_socket(path)
                        break
                    except OSError as exc:
                        log.debug("QMP %s not ready yet: %s", path, exc)
                        await trio.sleep(0.02)
                return await cls.negotiate(stream, path)
        except trio.TooSlowError:
            raise QmpError(f"QMP {path}: no session within {timeout} s") from None

    @classmethod
    async def negotiate(cls, stream: trio.SocketStream, name: str = "socket") -> QmpClient:
        """Read the greeting on a connected ``stream`` and leave capabilities
        negotiation mode (the caller sets the deadline).  Asynchronous events that
        arrive before the greeting (a guest resuming while the monitor connects) are
        collected in :attr:`events`, not taken for the greeting; any other message in
        its place is an error.  Closes ``stream`` on failure."""
        client = cls(stream, {})
        try:
            while True:
                msg = await client._read_message()
                if "event" in msg and "QMP" not in msg:
                    client._collect(msg)
                    continue
                break
            if "QMP" not in msg:
                raise QmpError(f"QMP {name}: unexpected greeting {msg!r}")
            client.greeting = msg
            await client._execute_unlocked("qmp_capabilities", None)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        """Run ``command`` and return its ``return`` value (usually a dict).

        Raises QmpError carrying QEMU's error class and description when the command
        fails, and QmpError when no answer comes within ``timeout`` seconds.
        """
        try:
            with trio.fail_after(timeout):
                async with self._lock:
                    return await self._execute_unlocked(command, arguments)
        except trio.TooSlowError:
            raise QmpError(
                f"QMP command {command!r}: no answer within {timeout} s", command=command
            ) from None

    async def execute_with_fd(
        self,
        command: str,
        fd: int,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        """Run ``command`` with the file descriptor ``fd`` attached (SCM_RIGHTS) to the
        bytes of the request, e.g. ``execute_with_fd("getfd", sock.fileno(),
        {"fdname": "mig"})``.  QEMU receives its own duplicate of ``fd``; the caller
        still owns (and should close) ``fd``.  QEMU keeps a passed descriptor per
        monitor connection: a later command naming it (``migrate fd:NAME``) must be
        sent on this same client.  Errors and deadlines as :meth:`execute`."""
        try:
            with trio.fail_after(timeout):
                async with self._lock:
                    return await self._execute_unlocked(command, arguments, fd=fd)
        except trio.TooSlowError:
            raise QmpError(
                f"QMP command {command!r}: no answer within {timeout} s", command=command
            ) from None

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals -------------------------------------------------------------

    async def _execute_unlocked(
        self, command: str, arguments: dict[str, Any] | None, *, fd: int | None = None
    ) -> Any:
        self._next_id += 1
        msg_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            request["arguments"] = arguments
        log.debug("QMP -> %s%s", request, "" if fd is None else " (+fd)")
        if fd is None:
            await self._send(request)
        else:
            await self._send_with_fd(request, fd)
        while True:
            msg = await self._read_message()
            if "event" in msg:
                self._collect(msg)
                continue
            if msg.get("id") != msg_id:
                log.warning("QMP: dropping unexpected message %r", msg)
                continue
            if "error" in msg:
                err = msg["error"]
                cls_ = str(err.get("class", "?"))
                desc = str(err.get("desc", ""))
                raise QmpError(
                    f"QMP command {command!r} failed: {cls_}: {desc}",
                    command=command,
                    error_class=cls_,
                    desc=desc,
                )
            return msg.get("return", {})

    def _collect(self, event: dict[str, Any]) -> None:
        log.debug("QMP event %s", event.get("event"))
        self.events.append(event)

    async def _send(self, obj: dict[str, Any]) -> None:
        try:
            await self._stream.send_all(json.dumps(obj).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise QmpError(f"QMP socket broken: {exc}") from exc

    async def _send_with_fd(self, obj: dict[str, Any], fd: int) -> None:
        data = json.dumps(obj).encode() + b"\n"
        fds = array.array("i", [fd])
        sock = self._stream.socket
        try:
            # The descriptor travels with the first byte; the rest is ordinary data.
            sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            if sent < len(data):
                await self._stream.send_all(data[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise QmpError(f"QMP socket broken: {exc}") from exc

    async def _read_message(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip()
                del self._buf[: nl + 1]
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise QmpError(f"QMP: malformed JSON {line[:200]!r}") from exc
                if not isinstance(obj, dict):
                    raise QmpError(f"QMP: expected an object, got {line[:200]!r}")
                return obj
            if len(self._buf) > _MAX_LINE:
                raise QmpError("QMP: line too long")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise QmpError(f"QMP socket broken: {exc}") from exc
            if not chunk:
                raise QmpError("QMP socket closed by QEMU")
            self._buf += chunk

"""Control messages and their codec, sans-IO.

A control *frame* on a byte stream is a 4-byte big-endian length followed by that many
bytes (the *message*).  A message starts with one kind byte:

* ``0x01`` — a control message: a UTF-8 JSON object with ``"v"`` (protocol version) and
  ``"type"``, plus the fields listed in :data:`SCHEMAS`, and nothing else; decoded into
  the frozen dataclass of its type (:class:`Offer`, :class:`Answer` ...), whose fields are
  the schema's (a test holds them equal);
* ``0x02`` — tunnel data: opaque bytes of the fallback tunnel (see ``tunnel``);
* ``0x03`` — a control handshake frame and ``0x04`` — a sealed control frame: an
  authenticated control channel (``wire.control_auth``) wraps messages of kinds 0x01 and
  0x02 in these; :func:`decode` sees only what they carry.

Validation is strict on purpose: the control channel is trusted for integrity, so any
deviation means a bug or a version skew, and saying exactly what is wrong beats guessing.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Literal

from holepunch_mig.errors import ProtocolError
from holepunch_mig.roles import POLICIES, Policy

PROTOCOL_VERSION: Final = 2
MAX_MESSAGE: Final = 64 * 1024
"""Largest message (kind byte included); libvirt's RPC allows the same."""
LENGTH_PREFIX: Final = struct.Struct(">I")

KIND_CONTROL: Final = 0x01
KIND_TUNNEL: Final = 0x02
KIND_HANDSHAKE: Final = 0x03
KIND_SEALED: Final = 0x04
MAX_FRAME: Final = MAX_MESSAGE + 17
"""Largest frame body: a sealed frame adds a kind byte and a 16-byte tag to a message."""

_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{32}")


def _check_hex32(value: Any) -> bool:
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


def _check_hex16(value: Any) -> bool:
    return isinstance(value, str) and _HEX16.fullmatch(value) is not None


def _check_str_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= 64
        and all(isinstance(v, str) and 0 < len(v) <= 256 for v in value)
    )


def _check_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _check_short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 4096


def _check_limits(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= 16
        and all(isinstance(k, str) and _check_uint(v) for k, v in value.items())
    )


def _check_policy(value: Any) -> bool:
    return value in POLICIES


def _check_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _check_str_or_none(value: Any) -> bool:
    return value is None or _check_short_str(value)


_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
MAX_SOCKET_DIR = 200
"""Longest ``socket_dir``: its sockets' paths must fit sun_path (108 bytes) with room."""


def check_socket_dir(value: Any) -> bool:
    """An absolute, normalised directory path of plain name parts (no ``.``, ``..``,
    empty parts, spaces or shell characters): the libvirt migration's socket directory,
    created with the same name on both hosts."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_SOCKET_DIR:
        return False
    parts = value[1:].split("/")
    return all(_PATH_PART.fullmatch(p) is not None and p not in (".", "..") for p in parts)


def _check_digest_or_none(value: Any) -> bool:
    return value is None or _check_hex32(value)


MAX_LINKS: Final = 64
"""Most links (the first included) one session may carry."""


def _check_link_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < MAX_LINKS


def _check_link_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LINKS


_Checker = Any  # Callable[[Any], bool]; kept loose so the table stays readable

_MODES = ("mux", "handoff", "libvirt")

# type -> {field: (checker, description, required)}
SCHEMAS: Final[dict[str, dict[str, tuple[_Checker, str, bool]]]] = {
    "offer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
        "policy": (_check_policy, '"direct", "auto" or "tunnel"', True),
        "limits": (_check_limits, "an object of unsigned integers", True),
    },
    "answer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
        "limits": (_check_limits, "an object of unsigned integers", True),
        # the destination's own policy; "direct" forbids the tunnel.  Absent = "direct".
        "policy": (_check_policy, '"direct", "auto" or "tunnel"', False),
    },
    "ping": {"seq": (_check_uint, "an unsigned integer", True)},
    "pong": {"seq": (_check_uint, "an unsigned integer", True)},
    "sync": {"round": (_check_uint, "an unsigned integer", True)},
    "nominate": {
        "round": (_check_uint, "an unsigned integer", True),
        "link": (_check_uint, "an unsigned integer", True),
        # the chosen link's Noise handshake hash: binds the nomination to one handshake
        "handshake": (_check_hex32, "64 lowercase hex digits (the link's handshake hash)", True),
    },
    "round-failed": {
        "round": (_check_uint, "an unsigned integer", True),
        "retry": (_check_bool, "true or false", True),
        "reason": (_check_short_str, "a string of at most 4096 characters", True),
    },
    "path": {
        "path": (lambda v: v in ("direct", "tunnel"), '"direct" or "tunnel"', True),
        "reason": (_check_short_str, "a string of at most 4096 characters", True),
    },
    "credit": {"bytes": (_check_uint, "an unsigned integer", True)},
    "result": {
        "ok": (_check_bool, "true or false", True),
        "bytes": (_check_uint, "an unsigned integer", True),
        "sha256": (_check_digest_or_none, "64 lowercase hex digits or null", True),
        "error": (_check_str_or_none, "a string or null", True),
    },
    "abort": {"reason": (_check_short_str, "a string of at most 4096 characters", True)},
    # -- resume (docs/protocol.md section 7): stream transfers survive a dead link --
    # destination -> source during a resumable transfer: bytes of stream 0 written out
    "progress": {"bytes": (_check_uint, "an unsigned integer", True)},
    # destination -> source: the link of generation `epoch` failed; `bytes` kept so far
    "link-lost": {
        "epoch": (_check_uint, "an unsigned integer", True),
        "bytes": (_check_uint, "an unsigned integer", True),
        "reason": (_check_short_str, "a string of at most 4096 characters", True),
    },
    # source -> destination: re-punch for link generation `epoch` (>= 1) with fresh keys
    "resume-offer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "epoch": (_check_uint, "an unsigned integer", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
        "reason": (_check_short_str, "a string of at most 4096 characters", True),
        # HMAC under the last link's resume key (wire.resume_auth)
        "mac": (_check_hex32, "64 lowercase hex digits (HMAC-SHA256)", True),
    },
    # destination -> source: its fresh key and candidates, and where the stream resumes
    "resume-answer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "epoch": (_check_uint, "an unsigned integer", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
        "bytes": (_check_uint, "an unsigned integer", True),
        "mac": (_check_hex32, "64 lowercase hex digits (HMAC-SHA256)", True),
    },
    # -- more links (docs/protocol.md section 9): parallel links of one session --
    # source -> destination: punch link number `index` (>= 1; the first link is 0)
    "link-offer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "index": (_check_link_index, f"an integer 1-{MAX_LINKS - 1}", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
    },
    # destination -> source: its fresh key, port and candidates for link `index`
    "link-answer": {
        "session": (_check_hex16, "32 lowercase hex digits", True),
        "index": (_check_link_index, f"an integer 1-{MAX_LINKS - 1}", True),
        "key": (_check_hex32, "64 lowercase hex digits (X25519 public key)", True),
        "port": (_check_port, "a TCP port 1-65535", True),
        "candidates": (_check_str_list, "a list of at most 64 candidate lines", True),
    },
    # -- migrate-proxy (holepunch_mig.migration.api): QEMU migration streams over the link --
    # source -> destination once the link is up: how ENDs will be checked
    "migrate-offer": {
        "digest": (_check_bool, "true (SHA-256 in END) or false (count-only END)", True),
        # absent = "mux"; "handoff": the punched socket goes to QEMU (its own TLS-PSK);
        # "libvirt": mux with labelled streams into a socket directory (see migrate-ready)
        "mode": (lambda v: v in _MODES, '"mux", "handoff" or "libvirt"', False),
        # absent = 1: how many links (the first included) the source wants to punch
        "links": (_check_link_count, f"an integer 1-{MAX_LINKS}", False),
    },
    # destination -> source: its mux runs and the destination QEMU's socket exists
    "migrate-ready": {
        "digest": (_check_bool, "true or false, echoing migrate-offer", True),
        "mode": (lambda v: v in _MODES, '"mux", "handoff" or "libvirt"', False),
        # libvirt mode only: the directory the destination made for its QEMU's sockets;
        # the source makes the same path on its host and serves the same names there
        "socket_dir": (check_socket_dir, "an absolute normalised path of plain names", False),
        # absent = 1: how many links (the first included) carry the streams
        "links": (_check_link_count, f"an integer 1-{MAX_LINKS}", False),
    },
    # both ways at the end: this side's verdict on every stream it carried
    "migrate-result": {
        "ok": (_check_bool, "true or false", True),
        "streams": (_check_uint, "an unsigned integer", True),
        "sent": (_check_uint, "an unsigned integer", True),
        "received": (_check_uint, "an unsigned integer", True),
        "error": (_check_str_or_none, "a string or null", True),
    },
}


Mode = Literal["mux", "handoff", "libvirt"]


@dataclass(frozen=True)
class Message:
    """A control message.  Each subclass is one type of :data:`SCHEMAS`: ``TYPE`` is its
    wire name and its fields are the schema's, in order; an optional field is ``None``
    when absent (never sent).  Built messages are validated as the decoder would."""

    TYPE: ClassVar[str] = ""

    @property
    def type(self) -> str:
        return self.TYPE

    def __post_init__(self) -> None:
        _validate(self.TYPE, _present(self))


@dataclass(frozen=True)
class Offer(Message):
    TYPE: ClassVar[str] = "offer"
    session: str
    key: str
    port: int
    candidates: list[str]
    policy: Policy
    limits: dict[str, int]


@dataclass(frozen=True)
class Answer(Message):
    TYPE: ClassVar[str] = "answer"
    session: str
    key: str
    port: int
    candidates: list[str]
    limits: dict[str, int]
    policy: Policy | None = None


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int


@dataclass(frozen=True)
class Sync(Message):
    TYPE: ClassVar[str] = "sync"
    round: int


@dataclass(frozen=True)
class Nominate(Message):
    TYPE: ClassVar[str] = "nominate"
    round: int
    link: int
    handshake: str


@dataclass(frozen=True)
class RoundFailed(Message):
    TYPE: ClassVar[str] = "round-failed"
    round: int
    retry: bool
    reason: str


@dataclass(frozen=True)
class Path(Message):
    TYPE: ClassVar[str] = "path"
    path: Literal["direct", "tunnel"]
    reason: str


@dataclass(frozen=True)
class Credit(Message):
    TYPE: ClassVar[str] = "credit"
    bytes: int


@dataclass(frozen=True)
class Result(Message):
    TYPE: ClassVar[str] = "result"
    ok: bool
    bytes: int
    sha256: str | None
    error: str | None


@dataclass(frozen=True)
class Abort(Message):
    TYPE: ClassVar[str] = "abort"
    reason: str


@dataclass(frozen=True)
class Progress(Message):
    TYPE: ClassVar[str] = "progress"
    bytes: int


@dataclass(frozen=True)
class LinkLost(Message):
    TYPE: ClassVar[str] = "link-lost"
    epoch: int
    bytes: int
    reason: str


@dataclass(frozen=True)
class ResumeOffer(Message):
    TYPE: ClassVar[str] = "resume-offer"
    session: str
    epoch: int
    key: str
    port: int
    candidates: list[str]
    reason: str
    mac: str


@dataclass(frozen=True)
class ResumeAnswer(Message):
    TYPE: ClassVar[str] = "resume-answer"
    session: str
    epoch: int
    key: str
    port: int
    candidates: list[str]
    bytes: int
    mac: str


@dataclass(frozen=True)
class LinkOffer(Message):
    TYPE: ClassVar[str] = "link-offer"
    session: str
    index: int
    key: str
    port: int
    candidates: list[str]


@dataclass(frozen=True)
class LinkAnswer(Message):
    TYPE: ClassVar[str] = "link-answer"
    session: str
    index: int
    key: str
    port: int
    candidates: list[str]


@dataclass(frozen=True)
class MigrateOffer(Message):
    TYPE: ClassVar[str] = "migrate-offer"
    digest: bool
    mode: Mode | None = None
    links: int | None = None


@dataclass(frozen=True)
class MigrateReady(Message):
    TYPE: ClassVar[str] = "migrate-ready"
    digest: bool
    mode: Mode | None = None
    socket_dir: str | None = None
    links: int | None = None


@dataclass(frozen=True)
class MigrateResult(Message):
    TYPE: ClassVar[str] = "migrate-result"
    ok: bool
    streams: int
    sent: int
    received: int
    error: str | None


@dataclass(frozen=True)
class TunnelData:
    """Opaque bytes of the fallback tunnel."""

    data: bytes


Event = Message | TunnelData

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Offer,
        Answer,
        Ping,
        Pong,
        Sync,
        Nominate,
        RoundFailed,
        Path,
        Credit,
        Result,
        Abort,
        Progress,
        LinkLost,
        ResumeOffer,
        ResumeAnswer,
        LinkOffer,
        LinkAnswer,
        MigrateOffer,
        MigrateReady,
        MigrateResult,
    )
}
"""Wire name -> message class, one per :data:`SCHEMAS` entry."""


def _present(message: Message) -> dict[str, Any]:
    """The fields that go on the wire, in schema order (an absent optional one is None)."""
    schema = SCHEMAS.get(message.TYPE, {})
    out: dict[str, Any] = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if value is None and f.name in schema and not schema[f.name][2]:
            continue
        out[f.name] = value
    return out


def encode(event: Event) -> bytes:
    """Encode one message (without the length prefix)."""
    if isinstance(event, TunnelData):
        out = bytes([KIND_TUNNEL]) + event.data
    else:
        present = _present(event)
        _validate(event.TYPE, present)
        body = {"v": PROTOCOL_VERSION, "type": event.TYPE, **present}
        out = bytes([KIND_CONTROL]) + json.dumps(body, separators=(",", ":")).encode()
    if len(out) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(out)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    return out


class _DuplicateMember(Exception):
    """A JSON object named one member twice (raised out of the JSON parser)."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with unique member names only: the prologue hashes the raw bytes, so
    two readers that kept different copies of a member would agree on a hash and not on
    the message."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateMember(name)
        out[name] = value
    return out


def decode(data: bytes) -> Event:
    """Decode one message; any deviation raises :class:`ProtocolError` naming it."""
    if not data:
        raise ProtocolError("empty message (no kind byte)")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    kind = data[0]
    if kind == KIND_TUNNEL:
        return TunnelData(bytes(data[1:]))
    if kind in (KIND_HANDSHAKE, KIND_SEALED):
        raise ProtocolError(
            f"authenticated control frame (kind 0x{kind:02x}) on a channel this side does not "
            "authenticate: the peer runs with --identity/--peer, --psk-file or a pairing "
            "code; give this side the same"
        )
    if kind != KIND_CONTROL:
        raise ProtocolError(f"unknown message kind 0x{kind:02x}")
    try:
        obj = json.loads(bytes(data[1:]).decode("utf-8"), object_pairs_hook=_unique_members)
    except _DuplicateMember as exc:
        raise ProtocolError(f"control message has a duplicate member {str(exc)[:64]!r}") from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"control message is not UTF-8: {exc.reason}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, nesting
        raise ProtocolError(f"control message is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"control message is a JSON {type(obj).__name__}, not an object")
    version = obj.pop("v", None)
    if version is None:
        raise ProtocolError('control message has no "v" (protocol version)')
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})"
        )
    type_ = obj.pop("type", None)
    if not isinstance(type_, str):
        raise ProtocolError('control message has no string "type"')
    _validate(type_, obj)
    return MESSAGE_TYPES[type_](**obj)


def _validate(type_: str, fields: Mapping[str, Any]) -> None:
    schema = SCHEMAS.get(type_)
    if schema is None:
        raise ProtocolError(f"unknown message type {type_[:64]!r}")
    for name, (check, description, required) in schema.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{type_} message lacks field {name!r}")
            continue
        if not check(fields[name]):
            raise ProtocolError(f"{type_} message field {name!r} must be {description}")
    extra = sorted(set(fields) - set(schema))
    if extra:
        raise ProtocolError(f"{type_} message has unknown field {extra[0][:64]!r}")


class FrameDecoder:
    """Splits a byte stream into messages; feed bytes, pull complete messages.

    Refuses an oversized length before buffering the body, so a hostile peer cannot make
    us allocate more than one maximal frame.
    """

    def __init__(self, max_message: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_message

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data
        if len(self._buf) >= LENGTH_PREFIX.size:
            (length,) = LENGTH_PREFIX.unpack_from(self._buf)
            self._check_length(length)

    def _check_length(self, length: int) -> None:
        if length == 0:
            raise ProtocolError("zero-length frame")
        if length > self._max:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")

    def next_message(self) -> bytes | None:
        if len(self._buf) < LENGTH_PREFIX.size:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(self._buf)
        self._check_length(length)
        end = LENGTH_PREFIX.size + length
        if len(self._buf) < end:
            return None
        msg = bytes(self._buf[LENGTH_PREFIX.size : end])
        del self._buf[:end]
        if len(self._buf) >= LENGTH_PREFIX.size:
            self._check_length(LENGTH_PREFIX.unpack_from(self._buf)[0])
        return msg

    def next_length(self) -> int | None:
        """The next frame's declared length, once its prefix is buffered: lets a reader
        that expects only small frames refuse a large one before its body arrives."""
        if len(self._buf) < LENGTH_PREFIX.size:
            return None
        return int(LENGTH_PREFIX.unpack_from(self._buf)[0])

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole message."""
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Remove and return every buffered byte (for a reader that takes over the
        stream, such as the tunnel's worker thread)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


def frame(message: bytes) -> bytes:
    """Prefix a message (or a sealed frame body, up to :data:`MAX_FRAME`) with its length."""
    if not message:
        raise ProtocolError("cannot frame an empty message")
    if len(message) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(message)} bytes exceeds the {MAX_FRAME}-byte limit")
    return LENGTH_PREFIX.pack(len(message)) + message

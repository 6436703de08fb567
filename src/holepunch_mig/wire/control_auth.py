"""The control handshake and the sealed control channel, sans-IO (docs/protocol.md,
"Control channel authentication").

A TCP control channel the project opens itself starts with a three-message Noise
handshake, before any protocol message, carried in control frames of kind 0x03:

* pinned keys: ``Noise_XX_25519_AESGCM_SHA256``; each side checks the static key the
  other proved against its pinned set (the initiator before it reveals its own);
* pre-shared secret: ``Noise_XXpsk3_25519_AESGCM_SHA256`` with the psk derived from the
  secret; pinned keys are checked too when given;
* pairing code: SPAKE2 (Ed25519 group) messages ride as the payloads of XXpsk3 messages 1
  and 2; the SPAKE2 key becomes the psk that message 3 mixes in, so message 3 is the key
  confirmation and an attacker gets exactly one online guess per attempt.

Afterwards every control message travels sealed (kind 0x04): AES-256-GCM under the
handshake's split keys, nonce = a per-direction counter, associated data = kind byte,
counter and plaintext length.  The handshake hash binds every per-link handshake to this
control session.  Nothing here does I/O: the driver (``net.secure_control``) moves the
frames :class:`ControlHandshake` returns.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from holepunch_mig.errors import (
    ControlAuthError,
    ControlRejected,
    CredentialError,
    DecryptError,
    HandshakeError,
    PairingFailed,
    ProtocolError,
    UnknownPeer,
)
from holepunch_mig.wire.identity import Identity, PeerKey, PeerSet, b64
from holepunch_mig.wire.messages import KIND_HANDSHAKE, KIND_SEALED
from holepunch_mig.wire.noise import CipherState, HandshakeState

__all__ = [
    "CODE_ALPHABET",
    "MIN_PSK_BYTES",
    "SEAL_OVERHEAD",
    "ControlAuth",
    "ControlHandshake",
    "ControlSession",
    "Mode",
    "PairingCode",
    "Sealer",
    "Unsealer",
    "derive_psk",
    "normalize_code",
    "reject_frame",
    "safe_text",
]

Mode = Literal["keys", "psk", "pairing"]
MODE_BYTES: Final[dict[Mode, int]] = {"keys": 0x01, "psk": 0x02, "pairing": 0x03}
MODE_REJECT: Final = 0x00
PATTERNS: Final[dict[Mode, str]] = {"keys": "XX", "psk": "XXpsk3", "pairing": "XXpsk3"}
PROLOGUE_LABEL: Final = b"holepunch_mig control/1\x00"
PSK_INFO: Final = b"holepunch_mig control psk/1"
PAIRING_INFO: Final = b"holepunch_mig pairing psk/1"
SPAKE_ID_A: Final = b"holepunch_mig source"
SPAKE_ID_B: Final = b"holepunch_mig destination"
SPAKE_MESSAGE: Final = 33
MIN_PSK_BYTES: Final = 32
MAX_HANDSHAKE_FRAME: Final = 512
MAX_REJECT_TEXT: Final = 200
SEAL_OVERHEAD: Final = 1 + 16
"""A sealed frame is the kind byte plus the AES-GCM tag longer than its plaintext."""
_SEAL_AD = struct.Struct(">BQI")

CODE_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
"""Crockford's base32, lower case: 5 bits a character, no i, l, o, u."""
CODE_CHARS: Final = 10
_CODE_FIXES = str.maketrans({"o": "0", "i": "1", "l": "1"})


def safe_text(text: str, limit: int = MAX_REJECT_TEXT) -> str:
    """Peer text fit for a terminal or a log: printable ASCII only, the rest escaped."""
    out = []
    for ch in text[:limit]:
        out.append(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def derive_psk(secret: bytes) -> bytes:
    """The 32-byte Noise psk from a manager's secret (HKDF-SHA256, empty salt)."""
    if len(secret) < MIN_PSK_BYTES:
        raise CredentialError(
            f"a pre-shared secret must hold at least {MIN_PSK_BYTES} random bytes, got "
            f"{len(secret)} (make one with: head -c 32 /dev/urandom > FILE)"
        )
    return HKDF(hashes.SHA256(), 32, salt=None, info=PSK_INFO).derive(secret)


def normalize_code(text: str) -> str:
    """A pairing code as typed (``7k2qd-m9x4a``, any case, with or without the hyphen;
    o/i/l read as 0/1/1) -> its 10 canonical characters; CredentialError if malformed."""
    raw = text.strip().lower().replace("-", "").replace(" ", "").translate(_CODE_FIXES)
    if len(raw) != CODE_CHARS or any(ch not in CODE_ALPHABET for ch in raw):
        raise CredentialError(
            f"pairing code {safe_text(text, 40)!r} is not of the form xxxxx-xxxxx "
            f"(10 characters of {CODE_ALPHABET})"
        )
    return raw


@dataclass
class PairingCode:
    """The destination's one-time code: ~50 bits, one session, an expiry, and a budget
    of wrong attempts after which the pairing is over (each attempt is one guess)."""

    secret: str
    expires: float
    """Deadline on the caller's clock (the driver uses trio's)."""
    attempts: int = 3
    used: bool = False
    failures: int = 0

    @classmethod
    def generate(cls, now: float, lifetime: float = 600.0, attempts: int = 3) -> PairingCode:
        secret = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
        return cls(secret, now + lifetime, attempts)

    @property
    def text(self) -> str:
        """What a person reads out: ``xxxxx-xxxxx``."""
        return f"{self.secret[:5]}-{self.secret[5:]}"

    def check_usable(self, now: float) -> None:
        if self.used:
            raise PairingFailed("this pairing code was already used for a session")
        if self.failures >= self.attempts:
            raise PairingFailed(
                f"pairing ended after {self.failures} wrong attempts (someone may be guessing); "
                "start a new pairing for a new code"
            )
        if now >= self.expires:
            raise PairingFailed("the pairing code expired; start a new pairing for a new code")

    def __repr__(self) -> str:  # never show the code
        return f"PairingCode(used={self.used}, failures={self.failures}/{self.attempts})"


@dataclass(frozen=True)
class ControlAuth:
    """What one side knows to authenticate a control channel: pinned keys (identity +
    peers), a psk (optionally with pinned keys), or a pairing code (the destination holds
    a :class:`PairingCode`, the source the code's text)."""

    identity: Identity | None = None
    peers: PeerSet | None = None
    psk: bytes | None = field(default=None, repr=False)  # never in a log or traceback
    code: PairingCode | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.code is not None:
            if self.psk is not None or self.peers is not None:
                raise CredentialError("a pairing code replaces pinned keys and psks; give one")
            if isinstance(self.code, str):
                object.__setattr__(self, "code", normalize_code(self.code))
        elif self.psk is None:
            if self.identity is None or not self.peers:
                raise CredentialError(
                    "pinned keys need both this host's identity (--identity) and at least "
                    "one peer key (--peer / --peers)"
                )
        elif len(self.psk) != 32:
            raise CredentialError("the psk must be 32 bytes (use derive_psk on the secret)")
        if self.peers is not None and self.identity is None:
            raise CredentialError("pinned peer keys need this host's identity (--identity)")

    @classmethod
    def from_secret(
        cls, secret: bytes, identity: Identity | None = None, peers: PeerSet | None = None
    ) -> ControlAuth:
        """psk mode from a manager's secret (>= 32 random bytes), pinned keys optional."""
        return cls(identity=identity, peers=peers, psk=derive_psk(secret))

    @property
    def mode(self) -> Mode:
        if self.code is not None:
            return "pairing"
        return "psk" if self.psk is not None else "keys"

    def describe(self) -> str:
        if self.mode == "pairing":
            return "a pairing code"
        if self.mode == "psk":
            return "a pre-shared secret" + (" and pinned keys" if self.peers else "")
        return "pinned keys"


@dataclass(frozen=True)
class ControlSession:
    """Who the control handshake authenticated, and the binding for every link."""

    mode: Mode
    peer: str
    """In words, for reports and logs: "pinned key 'src-host' (hpm-x25519 AbC...)",
    "holder of the pre-shared secret", "holder of the pairing code"."""
    peer_name: str | None
    peer_key: bytes
    handshake_hash: bytes


class Sealer:
    """Seals outgoing control messages: kind 0x04 + AES-GCM(message), AD = kind,
    sequence number, plaintext length."""

    def __init__(self, key: bytes) -> None:
        self._cs = CipherState(key)

    def seal(self, message: bytes) -> bytes:
        ad = _SEAL_AD.pack(KIND_SEALED, self._cs.n, len(message))
        return bytes([KIND_SEALED]) + self._cs.encrypt_with_ad(ad, message)

    @property
    def sequence(self) -> int:
        return self._cs.n


class Unsealer:
    """Opens incoming sealed frames in order; any failure is final (the channel is dead)."""

    def __init__(self, key: bytes) -> None:
        self._cs = CipherState(key)
        self._dead: str | None = None

    def open(self, frame: bytes) -> bytes:
        if self._dead is not None:
            raise ProtocolError(f"sealed control channel already failed: {self._dead}")
        if not frame:
            raise ProtocolError("empty control frame")
        if frame[0] == KIND_HANDSHAKE and len(frame) > 1 and frame[1] == MODE_REJECT:
            # the responder's refusal of message 3 lands here, but so could anyone's on
            # the path: the text is shown, marked as not verified
            self._dead = "ended by an unauthenticated reject frame"
            text = safe_text(frame[2:].decode("utf-8", "replace"))
            raise ControlRejected(f"the peer refused (unauthenticated reject frame): {text}")
        if frame[0] != KIND_SEALED:
            self._dead = f"unsealed frame of kind 0x{frame[0]:02x}"
            raise ProtocolError(
                f"control frame of kind 0x{frame[0]:02x} on an authenticated control channel "
                "(every message must be sealed, kind 0x04)"
            )
        body = frame[1:]
        if len(body) < 16:
            self._dead = "short sealed frame"
            raise ProtocolError(f"sealed control frame of {len(body)} bytes, shorter than a tag")
        ad = _SEAL_AD.pack(KIND_SEALED, self._cs.n, len(body) - 16)
        try:
            return self._cs.decrypt_with_ad(ad, body)
        except DecryptError:
            self._dead = f"message {self._cs.n} failed authentication"
            raise ControlAuthError(
                f"sealed control message {self._cs.n} failed authentication: the peer does "
                "not hold the agreed secret or pairing code, or the stream was altered"
            ) from None


def reject_frame(reason: str) -> bytes:
    """The plaintext refusal a side sends before closing (its reason for the peer)."""
    text = safe_text(reason).encode("ascii")
    return bytes([KIND_HANDSHAKE, MODE_REJECT]) + text


@dataclass
class ControlHandshake:
    """One side of the control handshake.  The initiator (the side that dialled: the
    source) calls :meth:`start`; each side passes every received frame to
    :meth:`receive`, sends what it returns, and once :attr:`complete` takes
    :attr:`session`, :attr:`sealer` and :attr:`unsealer`.

    Errors: :class:`ControlRejected` (the peer refused), :class:`UnknownPeer`,
    :class:`PairingFailed` (wrong code), :class:`ControlAuthError` (wrong psk, mode
    mismatch), :class:`ProtocolError` (malformed frame).  ``reject`` then holds the frame
    to send the peer before closing, when there is one."""

    auth: ControlAuth
    initiator: bool
    now: float = 0.0
    reject: bytes | None = None
    session: ControlSession | None = None
    sealer: Sealer | None = None
    unsealer: Unsealer | None = None
    _hs: HandshakeState | None = None
    _spake: object = None
    _step: int = 0
    _identity: Identity = field(default_factory=Identity.generate)

    def __post_init__(self) -> None:
        if self.auth.identity is not None:
            self._identity = self.auth.identity
        mode = self.auth.mode
        prologue = PROLOGUE_LABEL + bytes([MODE_BYTES[mode]])
        psks: list[bytes] | None = [self.auth.psk] if self.auth.psk is not None else None
        if mode == "keys":
            psks = []
        self._hs = HandshakeState(
            PATTERNS[mode], self.initiator, prologue, s=self._identity.private, psks=psks
        )
        if mode == "pairing":
            if self.initiator and not isinstance(self.auth.code, str):
                raise CredentialError("the source pairs with the code's text (send --code)")
            if not self.initiator and not isinstance(self.auth.code, PairingCode):
                raise CredentialError("the destination pairs with a PairingCode it made")

    @property
    def complete(self) -> bool:
        return self.session is not None

    @property
    def mode(self) -> Mode:
        return self.auth.mode

    # -- frames ---------------------------------------------------------------------

    def _frame(self, payload: bytes = b"") -> bytes:
        assert self._hs is not None
        return bytes([KIND_HANDSHAKE, MODE_BYTES[self.mode]]) + self._hs.write_message(payload)

    def start(self) -> bytes:
        """The initiator's first frame."""
        if not self.initiator or self._step != 0:
            raise HandshakeError("start() is the initiator's first step only")
        self._step = 1
        payload = b""
        if self.mode == "pairing":
            payload = self._spake_start(initiator=True)
        return self._frame(payload)

    def receive(self, frame: bytes) -> bytes | None:
        """Process the peer's next handshake frame; return the frame to send, if any."""
        try:
            return self._receive(frame)
        except UnknownPeer as exc:
            self.reject = reject_frame(
                "your key is not pinned here" if not self.initiator else "key mismatch"
            )
            raise exc from None
        except ControlRejected:
            raise
        except (ControlAuthError, ProtocolError) as exc:
            self.reject = reject_frame(str(exc))
            raise

    def _payload(self, frame: bytes) -> bytes:
        if not frame or frame[0] != KIND_HANDSHAKE:
            kind = f"0x{frame[0]:02x}" if frame else "empty"
            hint = (
                " (the peer runs without control authentication: give it the same "
                "--identity/--peer, --psk-file or pairing options as this side)"
                if frame and frame[0] == 0x01
                else ""
            )
            raise ProtocolError(
                f"expected a control handshake frame (kind 0x03), got kind {kind}" + hint
            )
        if len(frame) > MAX_HANDSHAKE_FRAME:
            raise ProtocolError(
                f"control handshake frame of {len(frame)} bytes, over {MAX_HANDSHAKE_FRAME}"
            )
        if len(frame) < 2:
            raise ProtocolError("control handshake frame without its mode byte")
        if frame[1] == MODE_REJECT:
            raise ControlRejected(
                f"the peer refused the control handshake: "
                f"{safe_text(frame[2:].decode('utf-8', 'replace'))}"
            )
        mine = MODE_BYTES[self.mode]
        if frame[1] != mine:
            theirs = {v: k for k, v in MODE_BYTES.items()}.get(frame[1])
            if theirs is None:
                raise ProtocolError(f"unknown control handshake mode 0x{frame[1]:02x}")
            raise ControlAuthError(
                f"the peer authenticates with {_MODE_WORDS[theirs]}, this side with "
                f"{_MODE_WORDS[self.mode]}: give both sides the same kind of credentials"
            )
        return frame[2:]

    def _receive(self, frame: bytes) -> bytes | None:
        assert self._hs is not None
        message = self._payload(frame)
        if self.complete:
            raise ProtocolError("control handshake frame after the handshake completed")
        if self.initiator:
            if self._step != 1:
                raise HandshakeError("the initiator receives only message 2")
            payload = self._read(message, 2)
            if self.mode == "pairing":
                self._spake_finish(payload)
            self._check_peer()
            out = self._frame()
            self._finish()
            return out
        if self._step == 0:
            if self.mode == "pairing":
                assert isinstance(self.auth.code, PairingCode)
                self.auth.code.check_usable(self.now)
            payload = self._read(message, 1)
            self._step = 1
            reply = b""
            if self.mode == "pairing":
                reply = self._spake_start(initiator=False)
                self._spake_finish(payload)
            return self._frame(reply)
        if self._step == 1:
            if self.mode == "pairing":
                assert isinstance(self.auth.code, PairingCode)
                self.auth.code.check_usable(self.now)
            try:
                self._read(message, 3)
            except ControlAuthError:
                if self.mode == "pairing":
                    assert isinstance(self.auth.code, PairingCode)
                    code = self.auth.code
                    code.failures += 1
                    left = code.attempts - code.failures
                    raise PairingFailed(
                        f"wrong pairing code ({left} attempt{'s' if left != 1 else ''} left)"
                    ) from None
                raise
            self._check_peer()
            if self.mode == "pairing":
                assert isinstance(self.auth.code, PairingCode)
                self.auth.code.used = True
            self._finish()
            return None
        raise HandshakeError("control handshake already past message 3")

    def _read(self, message: bytes, number: int) -> bytes:
        assert self._hs is not None
        try:
            return self._hs.read_message(message)
        except HandshakeError as exc:
            what = {
                "keys": "tampered or truncated",
                "psk": "the peer holds another pre-shared secret",
                "pairing": "wrong pairing code",
            }[self.mode]
            if number < 3 and self.mode != "keys":
                what = "tampered or truncated"
            raise ControlAuthError(
                f"control handshake message {number} failed: {what} ({exc})"
            ) from None

    def _check_peer(self) -> None:
        assert self._hs is not None
        rs = self._hs.remote_static
        peers = self.auth.peers
        if peers is None or rs is None:
            return
        if self.auth.identity is not None and hmac.compare_digest(rs, self.auth.identity.public):
            raise UnknownPeer(
                "the peer proved this host's own key: a connection to itself (or a copied "
                "identity file); each host needs its own keygen"
            )
        if rs not in peers:
            who = "receiver" if self.initiator else "sender"
            known = ", ".join(sorted(peers.names())[:8])
            raise UnknownPeer(
                f"the {who} proved key {PeerKey(rs, '').short.rstrip('.')}... "
                f"({b64(rs)}), which is not pinned here (pinned: {known}); if it is "
                "genuine, add its key line with --peer or to the --peers file"
            )

    def _finish(self) -> None:
        assert self._hs is not None
        k1, k2 = self._hs.split()
        send, receive = (k1, k2) if self.initiator else (k2, k1)
        self.sealer, self.unsealer = Sealer(send), Unsealer(receive)
        rs = self._hs.remote_static or b""
        name: str | None = None
        if self.mode == "pairing":
            peer = "holder of the pairing code"
        elif self.auth.peers is not None and rs in self.auth.peers:
            pinned = self.auth.peers[rs]
            name = pinned.name
            peer = f"pinned key {name!r} ({pinned.short})"
            if self.mode == "psk":
                peer += " with the pre-shared secret"
        else:
            peer = "holder of the pre-shared secret"
        self.session = ControlSession(self.mode, peer, name, rs, self._hs.handshake_hash)
        self._step = 3

    # -- SPAKE2 -----------------------------------------------------------------------

    def _spake_start(self, *, initiator: bool) -> bytes:
        from spake2 import SPAKE2_A, SPAKE2_B  # imported here: only pairing needs it

        code = self.auth.code
        secret = code if isinstance(code, str) else code.secret if code is not None else ""
        cls = SPAKE2_A if initiator else SPAKE2_B
        self._spake = cls(secret.encode("ascii"), idA=SPAKE_ID_A, idB=SPAKE_ID_B)
        message: bytes = self._spake.start()  # type: ignore[attr-defined]
        return message

    def _spake_finish(self, peer_message: bytes) -> None:
        assert self._hs is not None
        if len(peer_message) != SPAKE_MESSAGE:
            raise ProtocolError(
                f"pairing message of {len(peer_message)} bytes, expected {SPAKE_MESSAGE}"
            )
        try:
            key: bytes = self._spake.finish(peer_message)  # type: ignore[attr-defined]
        except Exception as exc:  # spake2 raises its own errors and ValueError for bad points
            raise ControlAuthError(f"pairing message rejected: {type(exc).__name__}") from None
        psk = hmac.new(key, PAIRING_INFO, hashlib.sha256).digest()
        self._hs.add_psk(psk)


_MODE_WORDS: Final[dict[Mode, str]] = {
    "keys": "pinned keys (--identity with --peer/--peers)",
    "psk": "a pre-shared secret (--psk-file)",
    "pairing": "a pairing code (--pair / --code)",
}

"""Noise Protocol Framework (revision 34), sans-IO, for Noise_*_25519_AESGCM_SHA256.

Built from `cryptography` primitives and written against the spec text
(https://noiseprotocol.org/noise.html): CipherState (section 5.1), SymmetricState
(5.2), HandshakeState (5.3), HKDF (4.3), psk modifiers (9). Supported handshake
patterns: NN, KK, IK, XX, each optionally with psk modifiers ("NNpsk0",
"KKpsk0", "KKpsk2", "XXpsk3", ...).

Errors: wrong-length or missing keys at construction are ValueError. Everything that
goes wrong while the handshake runs is HandshakeError. A HandshakeState that raised
from read_message()/write_message() (other than an out-of-turn call) is dead: every
later call raises, so a half-processed message can never be continued.
No exception message ever contains key material.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from holepunch_mig.errors import DecryptError, HandshakeError, NonceExhausted

__all__ = [
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "PATTERNS",
    "TAGLEN",
    "CipherState",
    "HandshakeState",
    "generate_keypair",
    "hkdf",
    "public_key",
    "rekey_key",
]

DHLEN = 32
HASHLEN = 32
KEYLEN = 32
TAGLEN = 16
PSKLEN = 32
MAX_MESSAGE = 65535
MAX_NONCE = 2**64 - 1  # reserved: never used to encrypt a message (only by rekey)


# --- primitives -------------------------------------------------------------------------


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


def _check_len(name: str, value: bytes, length: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")
    return value


def rekey_key(key: bytes) -> bytes:
    """Noise REKEY(k) for AESGCM: ENCRYPT(k, 2**64-1, b"", 32 zero bytes)[:32]."""
    key = _check_len("rekey key", key, KEYLEN)
    return AESGCM(key).encrypt(_nonce(MAX_NONCE), bytes(32), b"")[:KEYLEN]


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF as Noise section 4.3 defines it (HMAC-SHA256, 2 or 3 outputs of HASHLEN)."""
    if num_outputs not in (2, 3):
        raise ValueError(f"HKDF num_outputs must be 2 or 3, got {num_outputs}")
    temp_key = _hmac(chaining_key, input_key_material)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private raw 32 bytes, public raw 32 bytes)."""
    priv = X25519PrivateKey.generate()
    return priv.private_bytes_raw(), priv.public_key().public_bytes_raw()


def public_key(private: bytes) -> bytes:
    """The X25519 public key (raw 32 bytes) for a raw 32-byte private key."""
    private = _check_len("X25519 private key", private, DHLEN)
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# --- CipherState (spec 5.1) -------------------------------------------------------------


class CipherState:
    """A key k (or None = empty) and a 64-bit counter nonce n. AESGCM nonce: 4 zero bytes
    then n as 8 bytes big-endian. With an empty key, encrypt/decrypt return their input."""

    def __init__(self, k: bytes | None = None, n: int = 0) -> None:
        self._aead: AESGCM | None = None
        self.k: bytes | None = None
        self.initialize_key(k)
        self.set_nonce(n)

    def initialize_key(self, k: bytes | None) -> None:
        self.k = None if k is None else _check_len("cipher key", k, KEYLEN)
        self._aead = None if self.k is None else AESGCM(self.k)
        self.n = 0

    def set_nonce(self, n: int) -> None:
        if not 0 <= n <= MAX_NONCE:
            raise ValueError(f"nonce must be in [0, 2**64-1], got {n}")
        self.n = n

    def has_key(self) -> bool:
        return self.k is not None

    def _check_nonce(self) -> None:
        if self.n >= MAX_NONCE:
            raise NonceExhausted("nonce 2**64-1 reached: this key must not be used again")

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        self._check_nonce()
        ct = self._aead.encrypt(_nonce(self.n), bytes(plaintext), bytes(ad))
        self.n += 1
        return ct

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt; on failure raise DecryptError and leave n unchanged (spec 5.1)."""
        if self._aead is None:
            return bytes(ciphertext)
        self._check_nonce()
        try:
            pt = self._aead.decrypt(_nonce(self.n), bytes(ciphertext), bytes(ad))
        except InvalidTag:
            raise DecryptError(
                f"ciphertext with nonce {self.n} failed authentication "
                "(wrong key, wrong associated data or tampered data)"
            ) from None
        self.n += 1
        return pt

    def rekey(self) -> None:
        if self.k is None:
            raise ValueError("rekey() on a CipherState with no key")
        n = self.n
        self.initialize_key(rekey_key(self.k))
        self.n = n  # Rekey() leaves the nonce alone

    def __repr__(self) -> str:  # never show the key
        return f"CipherState(has_key={self.has_key()}, n={self.n})"


# --- SymmetricState (spec 5.2) ----------------------------------------------------------


class _SymmetricState:
    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cs = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(temp_k[:KEYLEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1[:KEYLEN], k2[:KEYLEN]


# --- patterns ---------------------------------------------------------------------------

# name -> (initiator pre-message, responder pre-message, message patterns)
_Pattern = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]
PATTERNS: dict[str, _Pattern] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "KK": (("s",), ("s",), (("e", "es", "ss"), ("e", "ee", "se"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "XX": ((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}
_NAME_RE = re.compile(r"([A-Z]+)((?:psk\d+)(?:\+psk\d+)*)?")


def _parse_pattern(name: str) -> tuple[_Pattern, int]:
    """Pattern with psk modifiers applied, and the number of psk tokens."""
    m = _NAME_RE.fullmatch(name)
    if m is None or m.group(1) not in PATTERNS:
        raise ValueError(
            f"unsupported handshake pattern {name!r}; supported: "
            f"{', '.join(PATTERNS)}, optionally with psk modifiers such as 'KKpsk0'"
        )
    pre_i, pre_r, base = PATTERNS[m.group(1)]
    messages = [list(msg) for msg in base]
    positions = [int(p) for p in re.findall(r"psk(\d+)", m.group(2) or "")]
    if len(set(positions)) != len(positions):
        raise ValueError(f"pattern {name!r} repeats a psk modifier")
    for pos in positions:
        if pos == 0:
            messages[0].insert(0, "psk")
        elif pos <= len(messages):
            messages[pos - 1].append("psk")
        else:
            raise ValueError(f"pattern {name!r}: psk{pos} is past its {len(messages)} messages")
    return (pre_i, pre_r, tuple(tuple(msg) for msg in messages)), len(positions)


# --- HandshakeState (spec 5.3) ----------------------------------------------------------


class HandshakeState:
    """One side of a Noise handshake over X25519 / AES-256-GCM / SHA-256.

    s: our static private key (raw 32 bytes); rs: the peer's static public key when the
    pattern pre-shares it (KK both sides, IK initiator); e: a fixed ephemeral private key,
    for test vectors only; psks: one 32-byte key per psk token, in token order.
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        prologue: bytes,
        *,
        s: bytes | None = None,
        rs: bytes | None = None,
        e: bytes | None = None,
        psks: Sequence[bytes] | None = (),
    ) -> None:
        (pre_i, pre_r, messages), n_psk = _parse_pattern(pattern)
        self.protocol_name = f"Noise_{pattern}_25519_AESGCM_SHA256"
        self._initiator = bool(initiator)
        self._messages = messages
        self._index = 0
        self._failed = False

        my_pre, their_pre = (pre_i, pre_r) if initiator else (pre_r, pre_i)
        mine = range(0 if initiator else 1, len(messages), 2)
        theirs = range(1 if initiator else 0, len(messages), 2)
        side = "initiator" if initiator else "responder"
        needs_s = "s" in my_pre or any("s" in messages[i] for i in mine)
        needs_rs = "s" in their_pre
        remote_sends_s = any("s" in messages[i] for i in theirs)

        if needs_s and s is None:
            raise ValueError(f"pattern {pattern} needs a static key s for the {side}")
        if not needs_s and s is not None:
            raise ValueError(f"pattern {pattern} uses no static key for the {side}; s given")
        if needs_rs and rs is None:
            raise ValueError(f"pattern {pattern} needs the peer's static public key rs")
        if rs is not None and not needs_rs:
            what = "sends it in the handshake" if remote_sends_s else "has none"
            raise ValueError(f"pattern {pattern}: rs given but the peer {what}")

        self._s: X25519PrivateKey | None = None
        self._s_pub = b""
        if s is not None:
            self._s = X25519PrivateKey.from_private_bytes(_check_len("static key s", s, DHLEN))
            self._s_pub = self._s.public_key().public_bytes_raw()
        self._rs = None if rs is None else _check_len("remote static key rs", rs, DHLEN)
        self._e_fixed = None if e is None else _check_len("ephemeral key e", e, DHLEN)
        self._e: X25519PrivateKey | None = None
        self._re: bytes | None = None

        # psks=None defers them: add_psk() before the message holding the psk token
        # (a PAKE's key that only the handshake's own payloads can produce)
        self._n_psk = n_psk
        self._psks = [_check_len(f"psk {i}", p, PSKLEN) for i, p in enumerate(psks or ())]
        if psks is not None and len(self._psks) != n_psk:
            raise ValueError(f"pattern {pattern} needs {n_psk} psk(s), got {len(self._psks)}")
        self._psk_mode = n_psk > 0

        self._ss = _SymmetricState(self.protocol_name.encode("ascii"))
        self._ss.mix_hash(bytes(prologue))
        # Pre-messages (only "s" in the supported patterns): initiator's, then responder's.
        for _ in pre_i:
            self._ss.mix_hash(self._s_pub if initiator else self._require_rs())
        for _ in pre_r:
            self._ss.mix_hash(self._require_rs() if initiator else self._s_pub)

    def add_psk(self, psk: bytes) -> None:
        """Supply a deferred psk (constructed with ``psks=None``) before its token."""
        if len(self._psks) >= self._n_psk:
            raise ValueError(f"{self.protocol_name} takes {self._n_psk} psk(s); all given")
        self._psks.append(_check_len("psk", psk, PSKLEN))

    # -- public state --

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        return self._index >= len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """h after the last handshake message: use for channel binding."""
        if not self.complete:
            raise HandshakeError("handshake_hash is not final until the handshake completes")
        return self._ss.h

    @property
    def remote_static(self) -> bytes | None:
        return self._rs

    def split(self) -> tuple[bytes, bytes]:
        """Raw transport keys (initiator->responder, responder->initiator)."""
        if self._failed:
            raise HandshakeError("split() called on a failed handshake")
        if not self.complete:
            raise HandshakeError(
                f"split() called before the handshake completed "
                f"(at message {self._index + 1} of {len(self._messages)})"
            )
        return self._ss.split()

    def split_cipherstates(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self.split()
        return CipherState(k1), CipherState(k2)

    # -- messages --

    def write_message(self, payload: bytes = b"") -> bytes:
        self._check_turn("write_message", writing=True)
        payload = bytes(payload)
        num = self._index + 1
        tokens = self._messages[self._index]
        size = self._message_size(tokens, len(payload))
        if size > MAX_MESSAGE:
            raise HandshakeError(
                f"handshake message {num} would be {size} bytes, over the "
                f"{MAX_MESSAGE}-byte Noise limit (payload {len(payload)} bytes)"
            )
        out = bytearray()
        try:
            for token in tokens:
                if token == "e":
                    if self._e_fixed is not None:
                        self._e = X25519PrivateKey.from_private_bytes(self._e_fixed)
                    else:
                        self._e = X25519PrivateKey.generate()
                    e_pub = self._e.public_key().public_bytes_raw()
                    out += e_pub
                    self._ss.mix_hash(e_pub)
                    if self._psk_mode:
                        self._ss.mix_key(e_pub)
                elif token == "s":
                    out += self._ss.encrypt_and_hash(self._s_pub)
                elif token == "psk":
                    self._ss.mix_key_and_hash(self._take_psk(num))
                else:
                    self._ss.mix_key(self._dh_token(token, num))
            out += self._ss.encrypt_and_hash(payload)
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its payload."""
        self._check_turn("read_message", writing=False)
        num = self._index + 1
        try:
            return self._read(bytes(message), num)
        except DecryptError:
            self._failed = True
            raise HandshakeError(
                f"handshake message {num} failed authentication: "
                "wrong static key, wrong prologue, wrong psk or tampered message"
            ) from None
        except BaseException:
            self._failed = True
            raise

    def _read(self, message: bytes, num: int) -> bytes:
        tokens = self._messages[self._index]
        if len(message) > MAX_MESSAGE:
            raise HandshakeError(
                f"handshake message {num} is {len(message)} bytes, "
                f"over the {MAX_MESSAGE}-byte Noise limit"
            )
        need = self._message_size(tokens, 0)
        if len(message) < need:
            raise HandshakeError(
                f"handshake message {num} too short: {len(message)} bytes, need at least {need}"
            )
        pos = 0
        for token in tokens:
            if token == "e":
                self._re = message[pos : pos + DHLEN]
                pos += DHLEN
                self._ss.mix_hash(self._re)
                if self._psk_mode:
                    self._ss.mix_key(self._re)
            elif token == "s":
                n = DHLEN + (TAGLEN if self._ss.cs.has_key() else 0)
                self._rs = self._ss.decrypt_and_hash(message[pos : pos + n])
                pos += n
            elif token == "psk":
                self._ss.mix_key_and_hash(self._take_psk(num))
            else:
                self._ss.mix_key(self._dh_token(token, num))
        payload = self._ss.decrypt_and_hash(message[pos:])
        self._index += 1
        return payload

    # -- helpers --

    def _check_turn(self, call: str, writing: bool) -> None:
        if self._failed:
            raise HandshakeError(f"{call} called on a failed handshake; start a new one")
        if self.complete:
            raise HandshakeError(f"{call} called after the handshake completed; use split()")
        my_turn = (self._index % 2 == 0) == self._initiator
        if my_turn != writing:
            whose = "ours to write" if my_turn else "the peer's to send"
            raise HandshakeError(f"{call} called out of turn: message {self._index + 1} is {whose}")

    def _message_size(self, tokens: tuple[str, ...], payload_len: int) -> int:
        keyed = self._ss.cs.has_key()
        size = 0
        for token in tokens:
            if token == "e":
                size += DHLEN
                keyed = keyed or self._psk_mode
            elif token == "s":
                size += DHLEN + (TAGLEN if keyed else 0)
            else:  # ee es se ss psk all call MixKey
                keyed = True
        return size + payload_len + (TAGLEN if keyed else 0)

    def _take_psk(self, num: int) -> bytes:
        if not self._psks:
            raise HandshakeError(f"handshake message {num} needs a psk that was not supplied")
        return self._psks.pop(0)

    def _require_rs(self) -> bytes:
        if self._rs is None:  # pragma: no cover - excluded by the constructor checks
            raise ValueError("remote static key rs missing")
        return self._rs

    def _dh_token(self, token: str, num: int) -> bytes:
        # "es": initiator's e with responder's s; "se": initiator's s with responder's e.
        first, second = token[0], token[1]
        mine, theirs = (first, second) if self._initiator else (second, first)
        priv = self._e if mine == "e" else self._s
        pub = self._re if theirs == "e" else self._rs
        if priv is None or pub is None:  # pragma: no cover - patterns guarantee both
            raise HandshakeError(f"DH {token!r} in handshake message {num}: key not available")
        try:
            shared = priv.exchange(X25519PublicKey.from_public_bytes(pub))
        except ValueError:  # OpenSSL refuses an all-zero result
            shared = bytes(DHLEN)
        if shared == bytes(DHLEN):
            raise HandshakeError(
                f"DH {token!r} in handshake message {num} gave an all-zero result: "
                "the peer's public key is a low-order point"
            )
        return shared

    def __repr__(self) -> str:  # never show keys
        return (
            f"HandshakeState({self.protocol_name!r}, initiator={self._initiator}, "
            f"message={self._index + 1}/{len(self._messages)}, failed={self._failed})"
        )

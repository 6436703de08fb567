"""Host identities as text, sans-IO: public key lines, private key files, peers files.

A host's control-channel identity is an X25519 key pair.  Its public half travels as one
self-describing line, the way ``authorized_keys`` lines do::

    hpm-x25519 <43 characters: the 32-byte key in base64url without padding> [name]

A private key file holds two lines: ``hpm-x25519-private-key v1`` and the 32-byte
private key in the same base64url form.  A peers file holds one public key line per
peer; blank lines and lines starting with ``#`` are ignored.  Every parse error names the
source (file and line number) and what is wrong, never the key material of a private key.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from holepunch_mig.errors import CredentialError
from holepunch_mig.wire.noise import generate_keypair, public_key

__all__ = [
    "KEY_TYPE",
    "PRIVATE_HEADER",
    "Identity",
    "PeerKey",
    "PeerSet",
    "b64",
    "check_name",
    "format_private_key",
    "parse_peer_line",
    "parse_peers",
    "parse_private_key",
    "unb64",
]

KEY_TYPE = "hpm-x25519"
PRIVATE_HEADER = "hpm-x25519-private-key v1"
_NAME = re.compile(r"[A-Za-z0-9._@:+-]{1,64}")
_B64_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


def b64(data: bytes) -> str:
    """base64url without padding (what key lines and pairing transcripts use)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Inverse of :func:`b64` for a 32-byte key; CredentialError naming ``what``."""
    if not _B64_KEY.fullmatch(text):
        raise CredentialError(
            f"{what}: a key is 43 base64url characters (A-Z a-z 0-9 - _); "
            f"got {len(text)} characters that are not that"
        )
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex excludes it
        raise CredentialError(f"{what}: not base64url: {exc}") from None
    if b64(raw) != text:  # non-canonical trailing bits
        raise CredentialError(f"{what}: the key's last character is not canonical base64url")
    return raw


def check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise CredentialError(
            f"{what}: a peer name is 1-64 characters of A-Z a-z 0-9 . _ @ : + -, got {name[:80]!r}"
        )
    return name


@dataclass(frozen=True)
class PeerKey:
    """One pinned peer: its X25519 public key and the name reports and logs show."""

    key: bytes
    name: str

    def line(self) -> str:
        return f"{KEY_TYPE} {b64(self.key)} {self.name}"

    @property
    def short(self) -> str:
        """The key as people compare it: type and the first 12 characters."""
        return f"{KEY_TYPE} {b64(self.key)[:12]}..."


def parse_peer_line(text: str, what: str = "peer key") -> PeerKey:
    """``hpm-x25519 KEY [name]``; the name defaults to the key's first 12 characters."""
    parts = text.split()
    if not parts:
        raise CredentialError(f"{what}: empty (expected '{KEY_TYPE} KEY [name]')")
    if parts[0] != KEY_TYPE:
        raise CredentialError(
            f"{what}: expected '{KEY_TYPE} KEY [name]' (what `holepunch-mig keygen` prints), "
            f"got a line starting {parts[0][:40]!r}"
        )
    if len(parts) < 2:
        raise CredentialError(f"{what}: '{KEY_TYPE}' without a key")
    if len(parts) > 3:
        raise CredentialError(f"{what}: more than '{KEY_TYPE} KEY name' (a name has no spaces)")
    key = unb64(parts[1], what)
    name = check_name(parts[2], what) if len(parts) == 3 else parts[1][:12]
    return PeerKey(key, name)


class PeerSet(Mapping[bytes, PeerKey]):
    """The pinned peers, by public key; built from ``--peer`` lines and peers files."""

    def __init__(self, peers: Iterable[PeerKey] = ()) -> None:
        self._by_key: dict[bytes, PeerKey] = {}
        for peer in peers:
            self.add(peer, "peer key")

    def add(self, peer: PeerKey, what: str) -> None:
        if peer.key in self._by_key:
            raise CredentialError(
                f"{what}: key {peer.short} is pinned twice "
                f"(already as {self._by_key[peer.key].name!r})"
            )
        self._by_key[peer.key] = peer

    def __getitem__(self, key: bytes) -> PeerKey:
        return self._by_key[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def names(self) -> list[str]:
        return [p.name for p in self._by_key.values()]


def parse_peers(text: str, source: str, into: PeerSet | None = None) -> PeerSet:
    """A peers file: one ``hpm-x25519 KEY [name]`` per line, ``#`` comments; a bad or
    duplicate line is an error naming ``source`` and its line number."""
    peers = into if into is not None else PeerSet()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        what = f"{source} line {number}"
        peers.add(parse_peer_line(line, what), what)
    return peers


@dataclass(frozen=True)
class Identity:
    """This host's control-channel key pair (the private half never appears in a repr)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> Identity:
        private, public = generate_keypair()
        return cls(private, public)

    @classmethod
    def from_private(cls, private: bytes) -> Identity:
        return cls(private, public_key(private))

    def public_line(self, name: str | None = None) -> str:
        line = f"{KEY_TYPE} {b64(self.public)}"
        if name:
            line += " " + check_name(name, "key name")
        return line

    def __repr__(self) -> str:
        return f"Identity(public={b64(self.public)[:12]}...)"


def format_private_key(identity: Identity) -> str:
    return f"{PRIVATE_HEADER}\n{b64(identity.private)}\n"


def parse_private_key(text: str, source: str) -> Identity:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != PRIVATE_HEADER:
        hint = ""
        if lines and lines[0].startswith(KEY_TYPE + " "):
            hint = " (this is a public key line: --identity takes the private key file)"
        raise CredentialError(
            f"{source}: not a private key file (its first line must be {PRIVATE_HEADER!r})" + hint
        )
    if len(lines) != 2:
        raise CredentialError(f"{source}: expected 2 lines, found {len(lines)}")
    try:
        private = unb64(lines[1], f"{source} line 2")
    except CredentialError:
        raise CredentialError(
            f"{source} line 2: not a 43-character base64url private key"
        ) from None
    return Identity.from_private(private)

"""Key and secret files on disk: written private (0600, created exclusively, never through
a symlink, never over an existing file) and refused when others can read them."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from holepunch_mig.errors import CredentialError
from holepunch_mig.wire.control_auth import MIN_PSK_BYTES, ControlAuth, derive_psk
from holepunch_mig.wire.identity import (
    Identity,
    PeerSet,
    format_private_key,
    parse_peer_line,
    parse_peers,
    parse_private_key,
)

__all__ = [
    "PinnedPair",
    "load_auth",
    "pinned_pair",
    "read_identity",
    "read_peers",
    "read_secret",
    "write_private_key",
]

MAX_FILE = 1 << 20


def write_private_key(path: Path, identity: Identity) -> None:
    """Create ``path`` holding ``identity``'s private key, mode 0600; CredentialError if
    it exists (also as a dangling symlink) or cannot be created."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CredentialError(f"{path} exists: keygen never overwrites a key file") from None
    except OSError as exc:
        raise CredentialError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        data = format_private_key(identity).encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise CredentialError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)


def _read_private_file(path: Path, what: str) -> bytes:
    """Read a secret file: not a symlink's target, owned by us or root, not readable or
    writable by group or others."""
    return _read_checked(path, what, 0o077, f"lets others read or change it; chmod 600 {path}")


def _read_checked(path: Path, what: str, forbidden: int, advice: str) -> bytes:
    """A credential file's bytes, refused when its mode has any ``forbidden`` bit or
    someone other than us (or root) owns it (checked on the open descriptor)."""
    with _open_regular(path, what) as fh:
        info = os.fstat(fh.fileno())
        if info.st_mode & forbidden:
            raise CredentialError(f"{what} {path}: mode {stat.S_IMODE(info.st_mode):04o} {advice}")
        if info.st_uid not in (os.geteuid(), 0):
            raise CredentialError(f"{what} {path}: owned by uid {info.st_uid}, not by us")
        data = fh.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise CredentialError(f"{what} {path}: larger than {MAX_FILE} bytes")
    return data


def read_identity(path: Path) -> Identity:
    data = _read_private_file(path, "identity file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"identity file {path}: not a key file (not ASCII)") from None
    return parse_private_key(text, str(path))


def read_secret(path: Path) -> bytes:
    """A psk file's bytes (at least 32, used as they are; a trailing newline counts)."""
    data = _read_private_file(path, "psk file")
    if len(data) < MIN_PSK_BYTES:
        raise CredentialError(
            f"psk file {path}: holds {len(data)} bytes, needs at least {MIN_PSK_BYTES} random "
            f"bytes (head -c 32 /dev/urandom > {path})"
        )
    return data


def _open_regular(path: Path, what: str) -> BinaryIO:
    """Open a credential file without following a symlink and without blocking on a FIFO
    (O_NONBLOCK until it is known to be a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CredentialError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise CredentialError(f"{what} {path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CredentialError(f"{what} {path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_peers(path: Path, into: PeerSet | None = None) -> PeerSet:
    """Who may be the peer: like ssh's authorized_keys, refused when someone other than
    us (or root) owns it or group/others may change it."""
    data = _read_checked(
        path, "peers file", 0o022, f"lets others change who may connect; chmod go-w {path}"
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"peers file {path}: not UTF-8 text") from None
    return parse_peers(text, f"peers file {path}", into)


def load_auth(
    identity: Path | None = None,
    peers: list[str] | None = None,
    peers_file: Path | None = None,
    psk_file: Path | None = None,
    code: str | None = None,
) -> ControlAuth | None:
    """The CLI's options as a :class:`ControlAuth` (None when none is given); a pairing
    destination's code is made by the caller, not here."""
    if identity is None and not peers and peers_file is None and psk_file is None and not code:
        return None
    pinned: PeerSet | None = None
    if peers or peers_file is not None:
        pinned = PeerSet()
        for i, line in enumerate(peers or [], 1):
            what = f"--peer #{i}"
            pinned.add(parse_peer_line(line, what), what)
        if peers_file is not None:
            read_peers(peers_file, pinned)
        if not pinned:
            raise CredentialError(f"peers file {peers_file}: no peer key in it")
    ident = read_identity(identity) if identity is not None else None
    if ident is not None and pinned is None and psk_file is None:
        raise CredentialError(
            "--identity needs the peer's key too: --peer 'hpm-x25519 KEY [name]' or --peers FILE"
        )
    if pinned is not None and ident is None:
        raise CredentialError("--peer/--peers need this host's key too: --identity PATH")
    psk = derive_psk(read_secret(psk_file)) if psk_file is not None else None
    return ControlAuth(identity=ident, peers=pinned, psk=psk, code=code)


@dataclass(frozen=True)
class PinnedPair:
    """CLI arguments that pin a fresh key pair for each side of one session (labs,
    benchmarks, demos, tests): ``source`` for send / migrate-proxy source, ``destination``
    for recv / migrate-proxy destination."""

    source: list[str]
    destination: list[str]


def pinned_pair(directory: Path, names: tuple[str, str] = ("source", "destination")) -> PinnedPair:
    """Generate both identities under ``directory`` (key files 0600, public lines in
    ``NAME.pub``) and return the arguments that make each side pin the other."""
    args: list[list[str]] = []
    for mine, theirs in ((names[0], names[1]), (names[1], names[0])):
        key = directory / f"{mine}.key"
        if not key.exists():
            identity = Identity.generate()
            write_private_key(key, identity)
            (directory / f"{mine}.pub").write_text(identity.public_line(mine) + "\n")
        args.append(["--identity", str(key), "--peers", str(directory / f"{theirs}.pub")])
    return PinnedPair(source=args[0], destination=args[1])

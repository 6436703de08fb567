"""Credential files as an attacker on the same host would leave them: a peers file others
may change, a FIFO where a secret should be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from holepunch_mig.errors import CredentialError
from holepunch_mig.net.keyfiles import read_peers, read_secret
from holepunch_mig.wire.identity import Identity


def _peers_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "peers"
    path.write_text(Identity.generate().public_line("good") + "\n")
    path.chmod(mode)
    return path


def test_peers_file_that_others_may_change_is_refused(tmp_path: Path) -> None:
    assert len(read_peers(_peers_file(tmp_path, 0o644))) == 1
    for mode in (0o666, 0o664):
        path = _peers_file(tmp_path, mode)
        with pytest.raises(CredentialError, match=r"lets others change who may connect"):
            read_peers(path)


def test_peers_file_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    target = _peers_file(tmp_path, 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(CredentialError, match="cannot open"):
        read_peers(link)


async def test_a_fifo_where_a_secret_should_be_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "psk"
    os.mkfifo(fifo, 0o600)
    with trio.fail_after(5):  # opening a FIFO for reading used to block for a writer
        with pytest.raises(CredentialError, match="not a regular file"):
            await trio.to_thread.run_sync(read_secret, fifo, abandon_on_cancel=True)

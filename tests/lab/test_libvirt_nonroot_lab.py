"""libvirt migrations with QEMU not running as root: both lab hosts' qemu.conf set
``user``/``group`` to Debian's ``libvirt-qemu`` (libvirt hands the domain's files to
it), so QEMU reaches the proxies' sockets only through ``--socket-group``.

Under CI=true these must run (libvirtd, QEMU and the binding are in the test set).
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from testsupport.libvirt import LibvirtLab, libvirt_lab, read_json, sha256

pytestmark = [pytest.mark.netns, pytest.mark.qemu, pytest.mark.libvirt]

QEMU_USER = "libvirt-qemu"  # user and group, made by libvirt-daemon-system


@pytest.fixture(scope="module")
def vlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtLab]:
    pwd.getpwnam(QEMU_USER)  # KeyError: libvirt-daemon-system is not installed right
    with libvirt_lab("fw-fw", tmp_path_factory.mktemp("libvirt"), qemu_user=QEMU_USER) as lab:
        yield lab


def _qemu_user(vlab: LibvirtLab, name: str) -> str:
    """The user the domain's QEMU runs as on the left host (from its pid file)."""
    pid = vlab.left.path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    uid = Path(f"/proc/{pid}").stat().st_uid
    return pwd.getpwuid(uid).pw_name


def test_socket_group_lets_a_non_root_qemu_in(vlab: LibvirtLab, tmp_path: Path) -> None:
    name = "group"
    digest = vlab.make_domain(name, disk_mib=16)
    try:
        assert _qemu_user(vlab, name) == QEMU_USER
        src, dst_code = vlab.migrate(name, tmp_path, "--copy-storage-all", socket_group=QEMU_USER)
        log = src.stderr.decode(errors="replace")
        assert src.returncode == 0, log + (tmp_path / "dst.log").read_text()
        assert dst_code == 0, (tmp_path / "dst.log").read_text()
        assert vlab.state(vlab.right, name) == "running"
        assert vlab.state(vlab.left, name) is None
        assert sha256(vlab.right.path(vlab.disk(name))) == digest
        rep = read_json(tmp_path / "src.json")
        assert sorted(s["channel"] for s in rep["proxy"]["streams"]) == ["migration", "nbd"]
    finally:
        vlab.destroy(name)


def test_without_socket_group_the_error_says_to_give_it(vlab: LibvirtLab, tmp_path: Path) -> None:
    name = "nogroup"
    vlab.make_domain(name, disk_mib=16)
    try:
        src, dst_code = vlab.migrate(name, tmp_path, "--copy-storage-all")
        log = src.stderr.decode(errors="replace")
        assert src.returncode == 1, log
        assert dst_code == 1, (tmp_path / "dst.log").read_text()
        assert "--socket-group" in log and "ermission denied" in log, log
        rep = read_json(tmp_path / "src.json")
        assert rep["ok"] is False and "--socket-group" in rep["libvirt_error"]
        assert vlab.state(vlab.left, name) == "running"  # nothing moved
        assert vlab.state(vlab.right, name) is None
    finally:
        vlab.destroy(name)

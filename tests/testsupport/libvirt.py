"""Two libvirt hosts in a lab, a small TCG domain with a random disk, and the
``holepunch-mig migrate`` / ``migrate-proxy destination --libvirt`` pair between them.

Under CI=true the libvirt tests must run: :func:`require_libvirt` fails instead of
skipping when libvirtd or the Python binding is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, presets
from holepunch_mig.lab.libvirt_hosts import (
    IMAGE_DIR,
    LIBVIRT_TCP_PORT,
    RAM_DIR,
    LibvirtHost,
    domain_xml,
    libvirt_hosts,
)
from holepunch_mig.net.keyfiles import pinned_pair
from testsupport.lab import cli_env, require_netns
from testsupport.qemu import require_qemu

MEM_MIB = 128
DISK_MIB = 256
#: Where :meth:`LibvirtLab.ram_check` reads guest RAM (inside the random part).
RAM_CHECK_OFFSET, RAM_CHECK_SIZE = 16 << 20, 1 << 20


def require_libvirt() -> None:
    require_netns()
    require_qemu()
    missing = [tool for tool in ("libvirtd", "virtlogd", "virsh", "nsenter", "unshare", "qemu-img")
               if shutil.which(tool) is None]  # fmt: skip
    try:
        import libvirt  # noqa: F401
    except ModuleNotFoundError:
        missing.append("the libvirt Python binding (pip install 'holepunch_mig[libvirt]')")
    if missing:
        reason = "libvirt tests need " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


def libvirt_spec(preset: str) -> LabSpec:
    """A preset whose right side also lets libvirtd's TCP port in (forwarded through a
    NAT): with the control port, the destination's only inbound ports."""
    spec = presets()[preset]
    right = dataclasses.replace(spec.right, allow_inbound_tcp=(CONTROL_PORT, LIBVIRT_TCP_PORT))
    return dataclasses.replace(spec, right=right, name=f"{preset}-libvirt")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LibvirtLab:
    lab: Lab
    left: LibvirtHost
    right: LibvirtHost
    work: Path
    next_id: int = 1
    """The id the left daemon gives its next domain (guessed; corrected when wrong)."""

    def disk(self, name: str) -> Path:
        return IMAGE_DIR / f"{name}.img"

    def make_domain(self, name: str, *, disk_mib: int = DISK_MIB, random_disk: bool = True) -> str:
        """Start a transient domain on the left host with a random raw disk; the right
        host gets an image of the same size (what --copy-storage-all needs).  Returns
        the disk's sha256."""
        import libvirt

        disk = self.disk(name)
        src = self.left.path(disk)
        with open(src, "wb") as fh:
            for _ in range(disk_mib):
                fh.write(os.urandom(1 << 20) if random_disk else bytes(1 << 20))
        with open(self.right.path(disk), "wb") as fh:
            fh.truncate(disk_mib << 20)
        conn = libvirt.open(self.left.local_uri)
        try:
            self.next_id = conn.createXML(domain_xml(name, MEM_MIB, disk), 0).ID() + 1
        finally:
            conn.close()
        return sha256(src)

    def qemu_img(self, host: LibvirtHost, *args: str) -> None:
        res = host.run(["qemu-img", *args], timeout=60)
        assert res.returncode == 0, f"qemu-img {' '.join(args)}: {res.stderr}"

    def raw_sha256(self, host: LibvirtHost, image: Path) -> str:
        """sha256 of what a guest sees in ``image`` and its backing chain (qemu-img
        convert to raw; -U: the image may be in use by a running domain)."""
        out = image.with_suffix(".check.raw")
        self.qemu_img(host, "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(out))
        try:
            return sha256(host.path(out))
        finally:
            host.path(out).unlink()

    def make_overlay_domain(
        self, name: str, *, base_mib: int = 64, writes: int = 16
    ) -> tuple[Path, str, str]:
        """Start a transient domain on the left host whose disk is a qcow2 overlay over a
        random raw backing image present on both hosts with the same content (what
        --copy-storage-inc needs); ``writes`` random 64 KiB writes went into the left
        overlay, the right one is empty over the same backing.  Returns the overlay's
        path, the backing image's sha256 and the left chain's (raw) sha256."""
        import libvirt

        base, overlay = IMAGE_DIR / f"{name}-base.img", IMAGE_DIR / f"{name}.qcow2"
        content = os.urandom(base_mib << 20)
        for host in (self.left, self.right):
            host.path(base).write_bytes(content)
            self.qemu_img(host, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                          str(overlay))  # fmt: skip
        rng = random.Random(name)
        script: list[str] = []
        for cluster in rng.sample(range(base_mib * 16), writes):  # distinct 64 KiB clusters
            script += ["-c", f"write -q -P {rng.randrange(1, 256)} {cluster << 16} 64k"]
        res = self.left.run(["qemu-io", "-f", "qcow2", *script, str(overlay)], timeout=60)
        assert res.returncode == 0, res.stderr
        chain = self.raw_sha256(self.left, overlay)
        conn = libvirt.open(self.left.local_uri)
        try:
            dom = conn.createXML(domain_xml(name, MEM_MIB, overlay, disk_format="qcow2"), 0)
            self.next_id = dom.ID() + 1
        finally:
            conn.close()
        return overlay, hashlib.sha256(content).hexdigest(), chain

    def make_random_ram_domain(self, name: str, mem_mib: int = MEM_MIB) -> bytes:
        """Start a transient domain on the left host whose RAM is random (a file mapped
        privately; zero pages would migrate as nothing), with a 1 MiB empty disk on both
        hosts (memory only: migrate it with --unsafe).  Returns the RAM's bytes at
        :data:`RAM_CHECK_OFFSET` (for :meth:`ram_check` on the destination)."""
        import libvirt

        disk = self.disk(name)
        for host in (self.left, self.right):
            with open(host.path(disk), "wb") as fh:
                fh.truncate(1 << 20)
        conn = libvirt.open(self.left.local_uri)
        try:
            for _ in range(3):  # libvirt names the RAM file after the domain's id
                ram = self.left.path(RAM_DIR / f"{self.next_id}-{name}")
                ram.mkdir(parents=True)
                with open(ram / "pc.ram", "wb") as fh:
                    for i in range(mem_mib):
                        chunk = os.urandom(1 << 20)
                        if i << 20 == RAM_CHECK_OFFSET:
                            check = chunk[:RAM_CHECK_SIZE]
                        fh.write(chunk)
                dom = conn.createXML(domain_xml(name, mem_mib, disk, file_ram=True), 0)
                got, wanted = dom.ID(), self.next_id
                self.next_id = got + 1
                if got == wanted:
                    return check
                dom.destroy()
                shutil.rmtree(ram)
            raise AssertionError(f"the left daemon's domain ids are not predictable: {got}")
        finally:
            conn.close()

    def ram_check(self, host: LibvirtHost, name: str, work: Path) -> bytes:
        """The running domain's RAM at :data:`RAM_CHECK_OFFSET` (QEMU's pmemsave)."""
        out = work / f"{name}.mem"
        cmd = (
            '{"execute": "pmemsave", "arguments": '
            f'{{"val": {RAM_CHECK_OFFSET}, "size": {RAM_CHECK_SIZE}, "filename": "{out}"}}}}'
        )
        res = host.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name, cmd])
        assert res.returncode == 0, res.stderr
        return out.read_bytes()

    def state(self, host: LibvirtHost, name: str) -> str | None:
        """ "running", "paused", ... or None when the host has no such domain."""
        import libvirt

        conn = libvirt.open(host.local_uri)
        try:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                return None
            state, _ = dom.state()
            names = {
                libvirt.VIR_DOMAIN_RUNNING: "running",
                libvirt.VIR_DOMAIN_PAUSED: "paused",
                libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            }
            return names.get(state, f"state-{state}")
        finally:
            conn.close()

    def destroy(self, name: str) -> None:
        for host in (self.left, self.right):
            host.run(["virsh", "-c", "qemu:///system", "destroy", name], timeout=30)
            with_path = host.path(self.disk(name))
            with_path.unlink(missing_ok=True)
            for image in (IMAGE_DIR / f"{name}-base.img", IMAGE_DIR / f"{name}.qcow2"):
                host.path(image).unlink(missing_ok=True)
            for ram in host.path(RAM_DIR).glob(f"*-{name}"):
                shutil.rmtree(ram, ignore_errors=True)

    def destination_proxy(
        self, work: Path, *extra: str, socket_group: str | None = None
    ) -> subprocess.Popen[bytes]:
        return self.right.popen(
            [sys.executable, "-m", "holepunch_mig.cli", "migrate-proxy", "destination",
             "--libvirt", "--control-listen", f"0.0.0.0:{CONTROL_PORT}",
             "--report", str(work / "dst.json"), "--link-timeout", "3",
             *pinned_pair(self.work).destination, *extra,
             *(["--socket-group", socket_group] if socket_group else [])],
            env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(work / "dst.log", "wb"),
        )  # fmt: skip

    def migrate_argv(self, name: str, work: Path, *extra: str) -> list[str]:
        host, port = self.lab.control_endpoint("right", CONTROL_PORT)
        stun = self.lab.stun_endpoint()
        return [
            sys.executable, "-m", "holepunch_mig.cli", "migrate", name, self.right.tcp_uri(),
            "--control", f"{host}:{port}", "--report", str(work / "src.json"),
            "--link-timeout", "3", *pinned_pair(self.work).source,
            *(["--stun", f"{stun[0]}:{stun[1]}"] if stun else []),
            *extra,
        ]  # fmt: skip

    def migrate(
        self,
        name: str,
        work: Path,
        *extra: str,
        timeout: float = 180.0,
        socket_group: str | None = None,
    ) -> tuple[subprocess.CompletedProcess[bytes], int | None]:
        """Run both proxies to the end (``socket_group``: given to both); (source's
        completed process, destination's exit)."""
        dst = self.destination_proxy(work, socket_group=socket_group)
        group = ["--socket-group", socket_group] if socket_group else []
        try:
            src = subprocess.run(
                self.left.argv(self.migrate_argv(name, work, *extra, *group)),
                env=cli_env(), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            code = dst.wait(timeout=30)
        finally:
            if dst.poll() is None:
                dst.kill()
                dst.wait()
        return src, code


@contextmanager
def libvirt_lab(
    preset: str,
    work: Path,
    hosts: Sequence[str] = ("left", "right"),
    qemu_user: str | None = None,
) -> Iterator[LibvirtLab]:
    require_libvirt()
    spec = libvirt_spec(preset)
    require_netns(need=("turnserver",) if spec.stun else ())
    with Lab(spec) as lab, libvirt_hosts(lab, hosts, qemu_user=qemu_user) as started:
        yield LibvirtLab(lab, started["left"], started["right"], work)


def read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text()) if path.exists() else None

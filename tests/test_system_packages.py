"""`.ci/system-packages.sh` (called by `make demo`, `make test` and CI), run for real with a
fake PATH: dpkg-query, apt-get, id, systemctl, service and pkill are stubs that log their
calls, so missing packages, root and non-root are simulated without touching the
machine's packages or daemons.  The PATH holds nothing else but the few real tools the
script uses, so a call to anything unstubbed fails the test instead of running."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / ".ci" / "system-packages.sh"

DEMO = ["python3-venv", "iproute2", "nftables", "procps"]
TEST = [*DEMO, "conntrack", "coturn", "iptables", "qemu-system-x86", "libvirt-daemon-system",
        "libvirt-clients", "libvirt-dev", "pkg-config", "gcc", "python3-dev",
        "miniupnpd-nftables", "qemu-utils"]  # fmt: skip
REAL_TOOLS = ("sh", "grep", "mkdir", "touch", "dirname", "cat")

# every stub first logs its call as one line of $FAKE/calls: "NAME ARGS..."
_LOG = 'printf "%s\\n" "${0##*/} $*" >> "$FAKE/calls"\n'
_STUBS = {
    # installed packages are the lines of $FAKE/installed
    "dpkg-query": """
for last; do :; done
if grep -qx -- "$last" "$FAKE/installed"; then echo "install ok installed"; exit 0; fi
echo "dpkg-query: no packages found matching $last" >&2
exit 1
""",
    # `install` records its packages as installed unless $FAKE/broken-apt exists
    "apt-get": """
[ "$1" = install ] || exit 0
[ -e "$FAKE/broken-apt" ] && exit 0
for arg; do
    case "$arg" in -*|install) ;; *) echo "$arg" >> "$FAKE/installed" ;; esac
done
""",
    "id": 'cat "$FAKE/uid"',
    # a machine without systemd as PID 1 makes systemctl fail: $FAKE/no-systemd
    "systemctl": '[ ! -e "$FAKE/no-systemd" ]',
    "service": "exit 0",
    "pkill": "exit 1",
}


@dataclass
class FakeMachine:
    root: Path
    path: str

    def run(
        self, *args: str, uid: int, installed: list[str], via: tuple[str, ...] = (), path: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """The script with ``args``, or the command ``via`` (make) that runs it."""
        (self.root / "uid").write_text(f"{uid}\n")
        (self.root / "installed").write_text("".join(f"{p}\n" for p in installed))
        (self.root / "calls").write_text("")
        return subprocess.run(
            [*via, *args] if via else ["/bin/sh", str(SCRIPT), *args],
            env={"PATH": self.path + path, "FAKE": str(self.root)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def calls(self, tool: str) -> list[str]:
        lines = (self.root / "calls").read_text().splitlines()
        return [line for line in lines if line.split()[0] == tool]

    def installed(self) -> list[str]:
        return (self.root / "installed").read_text().split()


def _fake_bin(where: Path, stubs: dict[str, str]) -> Path:
    where.mkdir()
    for tool in REAL_TOOLS:
        real = shutil.which(tool)
        assert real is not None, tool
        (where / tool).symlink_to(real)
    for name, body in stubs.items():
        stub = where / name
        stub.write_text("#!/bin/sh\n" + _LOG + body.lstrip())
        stub.chmod(0o755)
    return where


@pytest.fixture
def fake(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path, str(_fake_bin(tmp_path / "bin", _STUBS)))


def test_non_root_names_exactly_the_missing_packages_and_exits_0(fake: FakeMachine) -> None:
    stamp = fake.root / "venv" / ".system-test"
    have = [p for p in TEST if p not in ("coturn", "qemu-system-x86")]
    proc = fake.run("test", str(stamp), uid=1000, installed=have)
    assert proc.returncode == 0, proc.stderr
    assert "system packages missing for make test: coturn qemu-system-x86\n" in proc.stdout
    assert (
        "install them with: sudo apt-get install --no-install-recommends coturn qemu-system-x86"
        in proc.stdout
    )
    assert fake.calls("apt-get") == []
    assert fake.calls("systemctl") == fake.calls("service") == fake.calls("pkill") == []
    assert not stamp.exists()  # so the next make run checks again


def test_non_root_with_everything_present_is_silent_and_writes_the_stamp(
    fake: FakeMachine,
) -> None:
    stamp = fake.root / "venv" / ".system-test"
    proc = fake.run("test", str(stamp), uid=1000, installed=TEST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert stamp.exists()
    assert fake.calls("apt-get") == []
    assert len(fake.calls("dpkg-query")) == len(TEST)


def test_root_installs_only_the_missing_ones_after_one_update(fake: FakeMachine) -> None:
    stamp = fake.root / ".system-test"
    proc = fake.run("test", str(stamp), uid=0, installed=["procps", "coturn", "conntrack"])
    assert proc.returncode == 0, proc.stderr
    missing = [p for p in TEST if p not in ("procps", "coturn", "conntrack")]
    assert fake.calls("apt-get") == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends " + " ".join(missing),
    ]
    assert sorted(fake.installed()) == sorted(TEST)
    assert proc.stdout == "system packages: installing " + " ".join(missing) + "\n"
    assert stamp.exists()
    # the packaged coturn daemon (its configuration file), not the suite's servers
    assert fake.calls("systemctl") == ["systemctl stop coturn"]
    assert fake.calls("pkill") == ["pkill -f turnserver -c /etc/turnserver\\.conf"]


def test_root_with_everything_present_does_not_call_apt(fake: FakeMachine) -> None:
    proc = fake.run("test", uid=0, installed=TEST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert fake.calls("apt-get") == []
    assert fake.calls("systemctl") == ["systemctl stop coturn"]


def test_without_systemd_the_init_script_stops_coturn(fake: FakeMachine) -> None:
    (fake.root / "no-systemd").touch()
    proc = fake.run("test", uid=0, installed=TEST)
    assert proc.returncode == 0, proc.stderr
    assert fake.calls("service") == ["service coturn stop"]
    assert len(fake.calls("pkill")) == 1


def test_demo_needs_only_the_demo_packages(fake: FakeMachine) -> None:
    proc = fake.run("demo", uid=0, installed=["python3-venv", "iproute2", "procps"])
    assert proc.returncode == 0, proc.stderr
    assert fake.calls("apt-get")[-1] == "apt-get install -y -qq --no-install-recommends nftables"
    checked = {call.split()[-1] for call in fake.calls("dpkg-query")}
    assert checked == set(DEMO)
    # no coturn in the demo, so nothing to stop
    assert fake.calls("systemctl") == fake.calls("pkill") == []


def test_ci_also_needs_make(fake: FakeMachine) -> None:
    proc = fake.run("ci", uid=0, installed=TEST)
    assert proc.returncode == 0, proc.stderr
    assert fake.calls("apt-get")[-1] == "apt-get install -y -qq --no-install-recommends make"


def test_root_fails_when_apt_leaves_a_package_missing(fake: FakeMachine) -> None:
    (fake.root / "broken-apt").touch()
    stamp = fake.root / ".system-demo"
    proc = fake.run("demo", str(stamp), uid=0, installed=DEMO[:-1])
    assert proc.returncode == 1
    assert "still missing after apt-get install: procps" in proc.stderr
    assert not stamp.exists()


def test_without_dpkg_query_it_lists_the_packages_and_exits_0(tmp_path: Path) -> None:
    stubs = {k: v for k, v in _STUBS.items() if k != "dpkg-query"}
    machine = FakeMachine(tmp_path, str(_fake_bin(tmp_path / "bin", stubs)))
    proc = machine.run("demo", uid=1000, installed=[])
    assert proc.returncode == 0, proc.stderr
    assert "not a Debian system" in proc.stdout
    assert " ".join(DEMO) in proc.stdout
    assert machine.calls("apt-get") == []


def test_unknown_profile_is_a_usage_error(fake: FakeMachine) -> None:
    proc = fake.run("bench", uid=0, installed=TEST)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert fake.calls("dpkg-query") == []


@pytest.mark.skipif(
    shutil.which("make") is None and os.environ.get("CI") != "true", reason="make not installed"
)
def test_make_reruns_the_script_only_when_dpkg_changed_or_something_is_missing(
    fake: FakeMachine,
) -> None:
    make = shutil.which("make")
    assert make is not None
    (fake.root / "make-bin").mkdir()
    (fake.root / "make-bin" / "make").symlink_to(make)
    status = fake.root / "dpkg-status"
    status.write_text("")
    venv = fake.root / "venv"
    stamp = venv / ".system-test"

    def make_stamp(installed: list[str]) -> subprocess.CompletedProcess[str]:
        via = ("make", "-s", "-C", str(REPO), f"VENV={venv}", f"DPKG_STATUS={status}")
        path = ":" + str(fake.root / "make-bin")
        return fake.run(str(stamp), uid=1000, installed=installed, via=via, path=path)

    os.utime(status, (1_000_000, 1_000_000))
    proc = make_stamp(TEST[:-1])
    assert proc.returncode == 0, proc.stderr
    assert f"missing for make test: {TEST[-1]}" in proc.stdout
    assert not stamp.exists()
    proc = make_stamp(TEST[:-1])
    assert f"missing for make test: {TEST[-1]}" in proc.stdout  # checked again

    proc = make_stamp(TEST)
    assert proc.returncode == 0, proc.stderr
    assert stamp.exists()
    assert len(fake.calls("dpkg-query")) == len(TEST)
    make_stamp(TEST)
    assert fake.calls("dpkg-query") == []  # up to date: not even dpkg-query

    later = stamp.stat().st_mtime + 10
    os.utime(status, (later, later))  # a package was installed or removed
    proc = make_stamp(TEST[:-1])
    assert f"missing for make test: {TEST[-1]}" in proc.stdout

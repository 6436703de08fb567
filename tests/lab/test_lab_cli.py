"""``holepunch-mig lab up / exec / down / list`` through the real CLI: a detached lab
outlives the command that built it, exec runs inside its hosts with the exit code passed
through, down removes everything."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from testsupport.lab import CLI, cli_env, require_netns, run_cli

from holepunch_mig.cli import lab as lab_cli
from holepunch_mig.cli import main as cli
from holepunch_mig.lab import STATE_DIR, Lab, LabError
from holepunch_mig.lab.spec import spec_from_dict

SPEC = """\
# a double NAT on the left, a firewall that rejects on the right, 20 ms between them
name = "cli-test"
stun = true
rtt_ms = 20

[left]
nat = "double"

[right]
firewall = "reject"
allow_inbound_tcp = [7070, 8022]
"""


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture
def up_lab(tmp_path: Path) -> Iterator[dict[str, object]]:
    require_netns(need=("turnserver", "iptables"))
    spec = tmp_path / "cli-test.toml"
    spec.write_text(SPEC)
    proc = run_cli("lab", "up", "--spec", str(spec), "--json")
    assert proc.returncode == 0, proc.stderr
    info: dict[str, object] = json.loads(proc.stdout)
    try:
        yield info
    finally:
        run_cli("lab", "down", "cli-test")
        # whatever happened, nothing of it may remain
        leftover = set(info["namespaces"]) & netns_list()  # type: ignore[arg-type]
        for ns in leftover:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
        assert not leftover


@pytest.mark.netns
def test_up_exec_list_down(up_lab: dict[str, object]) -> None:
    info = up_lab
    hosts = {h["name"]: h for h in info["hosts"]}  # type: ignore[attr-defined]
    assert set(hosts) == {"public", "stun", "left", "left-router", "left-cgn", "right"}
    assert hosts["left"]["address"] == "10.1.0.2"
    assert hosts["left"]["public_address"] == "198.51.100.10"
    assert info["stun"] == ["198.51.100.3:3478", "198.51.100.4:3478"]
    assert info["right_control"] == "198.51.100.20:7070"
    # every port the spec opens gets its "reachable at" line, not only the control port
    assert info["reachable"] == [
        {"side": "right", "port": 7070, "at": "198.51.100.20:7070"},
        {"side": "right", "port": 8022, "at": "198.51.100.20:8022"},
    ]
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        lab_cli._print_info(info)
    assert "right's port 8022 is reachable at 198.51.100.20:8022" in shown.getvalue()
    namespaces = set(info["namespaces"])  # type: ignore[arg-type]
    assert namespaces <= netns_list(), "the lab must outlive `lab up`"

    listed = run_cli("lab", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = [st for st in json.loads(listed.stdout) if st["name"] == "cli-test"]
    assert len(mine) == 1 and mine[0]["status"] == "detached"
    human = run_cli("lab", "list").stdout
    assert "cli-test" in human and "detached" in human

    # exec: runs inside the host, exit code passed through
    ex = run_cli("lab", "exec", "--lab", "cli-test", "left", "--", "ip", "-o", "-4", "addr")
    assert ex.returncode == 0, ex.stderr
    assert "10.1.0.2/24" in ex.stdout and "198.51.100" not in ex.stdout
    assert (
        run_cli("lab", "exec", "--lab", "cli-test", "left", "--", "sh", "-c", "exit 42").returncode
        == 42
    )

    # the delay is real: a connect from left to the public host's closed port is refused
    # after one RTT/2 of delay on the way back into the left side (10 ms)
    code = (
        "import socket,time\n"
        "s=socket.socket(); t=time.monotonic()\n"
        "try: s.connect(('198.51.100.2', 9))\n"
        "except OSError: pass\n"
        "print(round((time.monotonic()-t)*1000, 1))\n"
    )
    py = run_cli("lab", "exec", "--lab", "cli-test", "left", "--", "python3", "-c", code)
    assert py.returncode == 0, py.stderr
    assert 9.0 <= float(py.stdout) < 200.0

    again = run_cli("lab", "up", "--preset", "fw-fw", "--name", "cli-test")
    assert again.returncode == 1 and "already up" in again.stderr

    down = run_cli("lab", "down", "cli-test")
    assert down.returncode == 0, down.stderr
    assert "removed" in down.stdout
    assert not namespaces & netns_list()
    assert not (STATE_DIR / f"{info['run_id']}.json").exists()
    gone = run_cli("lab", "down", "cli-test")
    assert gone.returncode == 1 and "no detached lab" in gone.stderr


@pytest.mark.netns
def test_down_without_a_name_never_guesses() -> None:
    require_netns()
    a = run_cli("lab", "up", "--preset", "open-open", "--name", "cli-a", "--json")
    b = run_cli("lab", "up", "--preset", "fw-fw", "--name", "cli-b", "--json")
    try:
        assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
        # no --lab with two labs up: refused, naming both, rather than the newest
        guess = run_cli("lab", "exec", "right", "--", "true")
        assert guess.returncode == 2, guess.stdout + guess.stderr
        assert "several labs are up" in guess.stderr and "cli-a" in guess.stderr
        assert "--lab NAME" in guess.stderr
        ex = run_cli("lab", "exec", "--lab", "cli-b", "right", "--", "nft", "list", "ruleset")
        assert ex.returncode == 0 and "drop" in ex.stdout
        # a program that does not exist: 127, as a shell says, not ip's 1
        missing = run_cli("lab", "exec", "--lab", "cli-b", "left", "--", "no-such-program-x")
        assert missing.returncode == 127, missing.stderr
        assert "no-such-program-x: command not found" in missing.stderr
        # several labs up (another test's or user's may be newer): name one
        first = run_cli("lab", "down")
        assert first.returncode == 2, first.stdout + first.stderr
        assert "several labs are up" in first.stderr and "cli-a" in first.stderr
        names = {st["name"] for st in Lab.list_labs() if st.get("detached")}
        assert {"cli-a", "cli-b"} <= names
    finally:
        for name in ("cli-a", "cli-b"):
            run_cli("lab", "down", name)
    assert not {st["name"] for st in Lab.list_labs()} & {"cli-a", "cli-b"}


def test_lab_needs_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (["lab", "up", "--preset", "fw-fw"], ["lab", "down"]):
        assert cli.main(argv) == 1
        assert "needs root" in capsys.readouterr().err


def test_lab_list_reads_without_root() -> None:
    """`lab list` only reads the state files: a plain user runs the real command."""
    require_netns()
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, "lab", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs root" not in proc.stderr
    assert proc.stdout.startswith(("name ", "no labs"))


def test_spec_errors_come_all_at_once() -> None:
    with pytest.raises(LabError) as err:
        spec_from_dict(
            {"left": {"nat": "cone", "colour": 1}, "right": {"firewall": "maybe"}, "rtt_ms": "x"}
        )
    text = str(err.value)
    for part in (
        "left.nat must be one of",
        "unknown key(s) ['colour'] in left",
        "right.firewall must be one of",
        "rtt_ms must be an integer",
    ):
        assert part in text, text


def test_up_rejects_bad_spec(tmp_path: Path) -> None:
    require_netns()
    bad = tmp_path / "bad.json"
    bad.write_text('{"left": {"nat": "cone"}}')
    proc = run_cli("lab", "up", "--spec", str(bad))
    assert proc.returncode == 1
    assert "left.nat must be one of" in proc.stderr
    unknown = run_cli("lab", "up", "--preset", "nope")
    assert unknown.returncode == 2 and "no preset" in unknown.stderr
    noargs = run_cli("lab", "exec", "left")
    assert noargs.returncode in (1, 2)

"""The command as a person meets it: checks before connecting, deadlines that hold, one
line per failure in words (the peer's reason included), honest exit codes and progress,
on a pseudo-terminal where the terminal matters."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from holepunch_mig.cli.common import colour

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _psk() -> list[str]:
    """A TCP control channel must be authenticated: one secret for every test here."""
    path = Path(tempfile.mkdtemp(prefix="hpm-ux-")) / "psk"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return ["--psk-file", str(path)]


AUTH = _psk()
CLASS_NAME = re.compile(rb"\b[A-Z][a-z]+(Error|Closed|Abort|Timeout|Refused|Stream|Group)\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _black_hole() -> Iterator[int]:
    """A local port whose SYNs go unanswered: a listener with a full accept queue drops
    new SYNs (Linux, tcp_abort_on_overflow=0), like a firewall's DROP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.2)  # let the handshakes that can complete fill the queue
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


class Pty:
    """A command on a pseudo-terminal (its controlling terminal: Ctrl-C is a real one)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.execvpe(argv[0], list(argv), {**os.environ, **(env or {})})
        self.out = b""
        self.status: int | None = None

    def read_until(self, pattern: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen in {self.out!r}")
            if not self._read(left):
                raise AssertionError(f"ended before {pattern!r}: {self.out!r}")
        return self.out

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.out += chunk
        return bool(chunk)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05) and select.select([self.fd], [], [], 0)[0]:
                    pass
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"still running after {timeout} s: {self.out!r}")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")


def _visible(raw: bytes) -> list[str]:
    """The lines a terminal ends up showing: a carriage return redraws its line (our
    progress line is erased with spaces before anything else is written on it)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode(errors="replace"))
    lines = [line.split("\r")[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return [line for line in lines if line]


def _payload(tmp_path: Path, size: int = 1 << 20) -> Path:
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(size))
    return path


# ----------------------------------------------------------------- 1: deadlines hold


def test_control_wait_holds_when_syns_are_dropped(tmp_path: Path) -> None:
    with _black_hole() as port:
        started = time.monotonic()
        run = subprocess.run(
            [
                *CLI,
                "send",
                *AUTH,
                "--control",
                f"127.0.0.1:{port}",
                "--control-wait",
                "2",
                "--input",
                str(_payload(tmp_path)),
            ],
            capture_output=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert elapsed < 15, f"took {elapsed:.1f} s for --control-wait 2"  # not the kernel's 2 min
    lines = err.splitlines()
    assert lines[0] == f"connecting to the control port 127.0.0.1:{port} (up to 2 s)"
    assert f"cannot reach the control port 127.0.0.1:{port}: no answer within" in lines[-1]
    assert "is holepunch-mig running there" in lines[-1]
    assert len(lines) == 2, err


def test_peer_not_started_gets_a_hint(tmp_path: Path) -> None:
    port = _free_port()
    run = subprocess.run(
        [
            *CLI,
            "send",
            *AUTH,
            "--control",
            f"127.0.0.1:{port}",
            "--control-wait",
            "0.5",
            "--input",
            str(_payload(tmp_path)),
        ],
        capture_output=True,
        timeout=30,
    )
    err = run.stderr.decode()
    assert run.returncode == 1
    assert "connection refused; is holepunch-mig running there" in err
    assert not CLASS_NAME.search(run.stderr), err


# ------------------------------------------------------- 2: paths checked beforehand


def test_report_in_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    port = _free_port()
    bad = tmp_path / "no" / "such" / "r.json"
    for argv in (
        ["send", *AUTH, "--control", f"127.0.0.1:{port}", "--input", str(_payload(tmp_path))],
        ["recv", *AUTH, "--control-listen", f"127.0.0.1:{port}", "--output", str(tmp_path / "o")],
    ):
        run = subprocess.run([*CLI, *argv, "--report", str(bad)], capture_output=True, timeout=30)
        err = run.stderr.decode()
        assert run.returncode == 2, err
        assert f"--report {bad}: directory {bad.parent} does not exist" in err
        assert "connecting" not in err and "waiting" not in err  # nothing was started
        assert "Traceback" not in err


def test_output_in_missing_directory_fails_before_waiting(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out.bin"
    run = subprocess.run(
        [
            *CLI,
            "recv",
            *AUTH,
            "--control-listen",
            f"127.0.0.1:{_free_port()}",
            "--output",
            str(out),
        ],
        capture_output=True,
        timeout=30,
    )
    err = run.stderr.decode()
    assert run.returncode == 2, err
    assert f"--output {out}: directory {out.parent} does not exist" in err
    assert ".part" not in err and "waiting" not in err


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    run = subprocess.run(
        [*CLI, "send", *AUTH, "--control", f"127.0.0.1:{_free_port()}", "--input", str(missing)],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert f"--input {missing} does not exist" in run.stderr.decode()
    assert not CLASS_NAME.search(run.stderr)


# --------------------------------------------------- 3: Ctrl-C while still connecting


def test_ctrl_c_while_connecting(tmp_path: Path) -> None:
    report = tmp_path / "s.json"
    with _black_hole() as port:
        term = Pty(
            [
                *CLI,
                "send",
                *AUTH,
                "--control",
                f"127.0.0.1:{port}",
                "--control-wait",
                "30",
                "--input",
                str(_payload(tmp_path)),
                "--report",
                str(report),
            ]
        )
        term.read_until(b"connecting to the control port")
        time.sleep(0.3)  # into the connect itself, not the start-up
        term.ctrl_c()
        code = term.wait()
    out = term.out.decode(errors="replace")
    assert code == 130, out
    assert "holepunch-mig: interrupted" in out
    assert "Traceback" not in out and "ExceptionGroup" not in out
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["verdict"] == "interrupted"


# ------------------------------------------------ 4: the survivor is told the reason


def _start_recv(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *CLI,
            "recv",
            *AUTH,
            "--control-listen",
            f"127.0.0.1:{port}",
            "--output",
            str(tmp_path / "out.bin"),
            *extra,
        ],
        stderr=subprocess.PIPE,
    )


def test_receiver_hears_why_the_sender_stopped(tmp_path: Path) -> None:
    port = _free_port()
    recv = _start_recv(tmp_path, port, "-q")
    term = Pty(
        [
            *CLI,
            "send",
            *AUTH,
            "--control",
            f"127.0.0.1:{port}",
            "--rate-limit",
            "2000000",
            "--input",
            str(_payload(tmp_path, 64 << 20)),
        ]
    )
    try:
        term.read_until(b"sent: ", timeout=30)  # the transfer is under way
        term.ctrl_c()
        assert term.wait() == 130
        _, err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert recv.returncode == 1
    assert b"the sender was interrupted (Ctrl-C)" in err, err.decode()
    assert not (tmp_path / "out.bin").exists()
    # the interrupted progress line is erased: "interrupted" starts a clean line
    assert "holepunch-mig: interrupted" in _visible(term.out)


def test_sender_hears_why_the_receiver_stopped(tmp_path: Path) -> None:
    port = _free_port()
    recv = subprocess.Popen(
        [
            *CLI,
            "recv",
            *AUTH,
            "--control-listen",
            f"127.0.0.1:{port}",
            "-q",
            "--output",
            str(tmp_path / "out.bin"),
        ],
        stderr=subprocess.PIPE,
    )
    send = subprocess.Popen(
        [
            *CLI,
            "send",
            *AUTH,
            "--control",
            f"127.0.0.1:{port}",
            "--rate-limit",
            "2000000",
            "-q",
            "--input",
            str(_payload(tmp_path, 64 << 20)),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".out.bin.*.part")):  # the receive has started
            assert time.monotonic() < deadline and send.poll() is None
            time.sleep(0.05)  # polling for the receiver's file, bounded
        recv.send_signal(signal.SIGINT)
        _, recv_err = recv.communicate(timeout=30)
        _, send_err = send.communicate(timeout=30)
    finally:
        for proc in (recv, send):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert recv.returncode == 130, recv_err.decode()
    assert send.returncode == 1
    assert b"the receiver was interrupted (Ctrl-C)" in send_err, send_err.decode()
    assert b"closed by the peer" not in send_err


# --------------------------------------------------- 9: a control command that fails


@pytest.mark.parametrize("auth", [[], AUTH], ids=["ssh-only", "ssh-and-psk"])
def test_control_cmd_not_found_says_status_127(tmp_path: Path, auth: list[str]) -> None:
    run = subprocess.run(
        [
            *CLI,
            "send",
            *auth,
            "--control-cmd",
            "sh -c 'exec no-such-holepunch-mig recv'",
            "--input",
            str(_payload(tmp_path)),
        ],
        capture_output=True,
        timeout=60,
    )
    err = run.stderr.decode()
    assert run.returncode == 1
    assert "control command exited with status 127" in err, err
    assert "full path" in err
    assert "closed by the peer" not in err


@pytest.mark.parametrize("auth", [[], AUTH], ids=["ssh-only", "ssh-and-psk"])
def test_migrate_proxy_source_control_cmd_not_found_says_status_127(
    tmp_path: Path, auth: list[str]
) -> None:
    """The migration source opens its control channel like ``send``: same explanation."""
    run = subprocess.run(
        [
            *CLI,
            "migrate-proxy",
            "source",
            *auth,
            "--listen-unix",
            str(tmp_path / "out.sock"),
            "--control-cmd",
            "sh -c 'exec no-such-holepunch-mig migrate-proxy destination'",
        ],
        capture_output=True,
        timeout=60,
    )
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert "control command exited with status 127" in err, err
    assert "closed by the peer" not in err


def test_migrate_proxy_has_control_cmd_and_plain_help() -> None:
    run = subprocess.run(
        [*CLI, "migrate-proxy", "--help"], capture_output=True, timeout=30, text=True
    )
    assert run.returncode == 0
    assert "``" not in run.stdout and "::" not in run.stdout
    src = subprocess.run(
        [*CLI, "migrate-proxy", "source", "--help"], capture_output=True, timeout=30, text=True
    )
    assert "--control-cmd" in src.stdout
    dst = subprocess.run(
        [*CLI, "migrate-proxy", "destination", "--help"],
        capture_output=True,
        timeout=30,
        text=True,
    )
    assert "--control-stdio" in dst.stdout


# ----------------------------------------------------- 10: no binary onto a terminal


def test_recv_refuses_to_write_to_a_terminal() -> None:
    term = Pty([*CLI, "recv", *AUTH, "--control-listen", f"127.0.0.1:{_free_port()}"])
    code = term.wait()
    out = term.out.decode(errors="replace")
    assert code == 2, out
    assert "refusing to write the payload (binary data) to a terminal" in out
    assert "waiting" not in out


# ---------------------------------------------------------- 11: progress on a TTY


def test_progress_on_a_terminal_ends_in_one_final_line(tmp_path: Path) -> None:
    port = _free_port()
    recv = _start_recv(tmp_path, port, "-q")
    term = Pty(
        [
            *CLI,
            "send",
            *AUTH,
            "--control",
            f"127.0.0.1:{port}",
            "--rate-limit",
            "20000000",
            "--input",
            str(_payload(tmp_path, 24 << 20)),
        ]
    )
    try:
        code = term.wait(60)
        recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert code == 0, term.out
    assert b"\r" in term.out and b"ETA" in term.out  # it did redraw a progress line
    shown = _visible(term.out)
    assert not any("ETA" in line for line in shown), shown  # no stale progress left
    final = shown[-1]
    assert re.fullmatch(
        r"sent 25\.2 MB in [\d.]+ s, [\d.,]+ MB/s, CPU [\d.]+ s \([\d.]+ s/GiB\), "
        r"blake3 [0-9a-f]{64}, verified by the "
        r"receiver",
        final,
    ), final


def test_warning_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty_stream, open(os.devnull, "w") as plain:
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert colour("WARNING:", "1;33", tty_stream) == "\x1b[1;33mWARNING:\x1b[0m"
        assert colour("WARNING:", "1;33", plain) == "WARNING:"
        monkeypatch.setenv("NO_COLOR", "1")
        assert colour("WARNING:", "1;33", tty_stream) == "WARNING:"
    os.close(master)


# ----------------------------------------------- 12: words, not Python class names


def test_second_receiver_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        run = subprocess.run(
            [
                *CLI,
                "recv",
                *AUTH,
                "--control-listen",
                f"127.0.0.1:{port}",
                "--output",
                str(tmp_path / "o"),
            ],
            capture_output=True,
            timeout=30,
        )
    err = run.stderr.decode()
    assert run.returncode == 1
    assert err.startswith(f"holepunch-mig recv: cannot listen on 127.0.0.1:{port}: ")
    assert "Address already in use" in err and "another holepunch-mig recv" in err
    assert "waiting" not in err and "Errno" not in err and "OSError" not in err
    assert len(err.splitlines()) == 1


def test_version() -> None:
    run = subprocess.run([*CLI, "--version"], capture_output=True, timeout=30, text=True)
    assert run.returncode == 0
    assert re.fullmatch(r"holepunch-mig \d+\.\d+\.\d+\S*\n", run.stdout)


def test_success_shows_only_the_nominated_pair(tmp_path: Path) -> None:
    port = _free_port()
    recv = _start_recv(tmp_path, port, "-q", "--report", str(tmp_path / "r.json"))
    send = subprocess.run(
        [
            *CLI,
            "send",
            *AUTH,
            "--control",
            f"127.0.0.1:{port}",
            "--input",
            str(_payload(tmp_path)),
            "--report",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        timeout=60,
        text=True,
    )
    recv.communicate(timeout=30)
    assert send.returncode == 0, send.stderr
    assert " -> " not in send.stderr  # no pair lines on success
    assert "0.0.0.0" not in send.stderr
    assert re.search(r"rounds? \d|\d rounds?\b", send.stderr)
    assert "1 rounds" not in send.stderr
    for name in ("s.json", "r.json"):
        rep = json.loads((tmp_path / name).read_text())
        # the nominated remote is among the remote candidates the report lists
        remote_host, _, remote_port = rep["remote"].rpartition(":")
        assert any(
            f" {remote_host.strip('[]')} {remote_port} " in line
            for line in rep["remote_candidates"]
        ) or rep["remote"] in json.dumps(rep["remote_candidates"]), rep["remote_candidates"]


def test_listen_on_every_address_with_a_bare_port() -> None:
    """``--control-listen :7070`` (as the example manager's docstring writes it)."""
    from holepunch_mig.cli.common import listen_endpoint

    assert listen_endpoint(":7070") == ("0.0.0.0", 7070)
    assert listen_endpoint("0.0.0.0:7070") == ("0.0.0.0", 7070)


def test_time_to_link_leaves_out_the_remote_start(tmp_path: Path) -> None:
    """Under --control-cmd the remote side starts late (ssh, a slow login): the time to
    link counts the negotiation, not the wait for the peer to come up."""
    out = tmp_path / "out.bin"
    remote = (
        f"sh -c 'sleep 3; exec {sys.executable} -m holepunch_mig.cli recv --control-stdio "
        f"--output {out} -q'"
    )
    run = subprocess.run(
        [
            *CLI,
            "send",
            "--control-cmd",
            remote,
            "--peer-host",
            "127.0.0.1",
            "-q",
            "--input",
            str(_payload(tmp_path)),
            "--report",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode()
    rep = json.loads((tmp_path / "s.json").read_text())
    assert 0 < rep["time_to_link"] < 3, rep["time_to_link"]


def test_a_pair_that_never_connected_shows_the_routed_local_address() -> None:
    from holepunch_mig.net.punch import _route_local

    assert _route_local(socket.AF_INET, ("127.0.0.1", 9), 4000, "0.0.0.0:4000") == (
        "127.0.0.1:4000"
    )
    assert _route_local(socket.AF_INET, ("127.0.0.1", 9), 4000, "10.0.0.1:4000") == (
        "10.0.0.1:4000"
    )


def test_migrate_source_hears_why_the_destination_stopped(tmp_path: Path) -> None:
    """No QEMU listening on the destination: the source proxy says so, not "control
    channel closed"."""
    port = _free_port()
    dst = subprocess.Popen(
        [
            *CLI,
            "migrate-proxy",
            "destination",
            "--connect-unix",
            str(tmp_path / "none.sock"),
            "--control-listen",
            f"127.0.0.1:{port}",
            "--ready-timeout",
            "2",
            *AUTH,
        ],
        stderr=subprocess.PIPE,
    )
    try:
        src = subprocess.run(
            [
                *CLI,
                "migrate-proxy",
                "source",
                "--listen-unix",
                str(tmp_path / "out.sock"),
                "--control",
                f"127.0.0.1:{port}",
                "--ready-timeout",
                "10",
                *AUTH,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        _, dst_err = dst.communicate(timeout=30)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    assert dst.returncode == 1 and src.returncode == 1, src.stderr
    assert "is not a listening QEMU socket" in dst_err.decode()
    assert "peer aborted" in src.stderr and "is not a listening QEMU socket" in src.stderr
    assert "closed by the peer" not in src.stderr
    assert not CLASS_NAME.search(src.stderr.encode()), src.stderr


def test_warning_is_coloured_and_peer_text_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    from holepunch_mig.cli import common

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty_stream:
        monkeypatch.delenv("NO_COLOR", raising=False)
        monkeypatch.setattr(sys, "stderr", tty_stream)
        common.warn("peer said \x1b[2Jgotcha")
        tty_stream.flush()
        shown = os.read(master, 4096).decode()
    os.close(master)
    assert shown.startswith("holepunch-mig: \x1b[1;33mWARNING:\x1b[0m peer said ")
    assert "\x1b[2J" not in shown  # the peer's escape sequence is escaped, ours is kept

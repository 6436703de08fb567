"""Which lab processes count as alive: a zombie (exited, not yet reaped) does not, and
a recycled pid with another start time does not either.  No root needed."""

from __future__ import annotations

import os
import subprocess

from holepunch_mig.lab.netns import pid_alive, proc_start_time


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["sh", "-c", "exec cat"], stdin=subprocess.PIPE)
    try:
        start = proc_start_time(child.pid)
        assert start is not None
        assert pid_alive(child.pid) and pid_alive(child.pid, start)
        assert not pid_alive(child.pid, start + 1)  # same pid, another process
        assert child.stdin is not None
        child.stdin.close()  # cat exits ...
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ... and stays a zombie
        with open(f"/proc/{child.pid}/stat") as fh:
            assert fh.read().rpartition(")")[2].split()[0] == "Z"
        assert not pid_alive(child.pid)
        assert not pid_alive(child.pid, start)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert not pid_alive(child.pid, start)

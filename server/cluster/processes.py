"""The Ray processes ``switchboard serve --cluster`` starts, and their end.

``ray.init`` on a machine with no cluster starts the GCS, the raylet and their helpers
as children of this command, and the raylet starts the workers (the ingress, the
replicas, the admin board). A SIGTERM to the whole process group (``kill -- -PGID``,
systemd's ``KillMode=control-group``) reaches all of them at once: the raylet exits
within seconds without stopping its workers, which run on re-parented, the GCS lives
until this command exits, and every call through Ray hangs. So the command

- becomes the "child subreaper" of what it starts (Linux ``prctl``): an orphaned worker
  is re-parented to it rather than to init, and so stays its descendant;
- watches the raylet and the GCS (:class:`LocalRuntime`), to stop waiting on a drain
  that can no longer happen;
- kills every descendant still running on its way out (:func:`kill_descendants`).

Only /proc is read; elsewhere than Linux these find nothing and change nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
RUNTIME = ("raylet", "gcs_server")
"""The processes (their ``comm`` names) without which no call reaches a replica."""


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int
    name: str
    """The kernel's short name (``comm``): Ray's binaries keep theirs."""
    state: str
    """``Z`` for a zombie: exited, not yet reaped."""

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants; False where it cannot be."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def read_process(pid: int) -> Process | None:
    """Process ``pid`` from /proc; None when it is gone (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return Process(pid, int(fields[1]), name, fields[0])


def descendants(root: int | None = None) -> list[Process]:
    """Every process below ``root`` (this one by default), zombies included."""
    root = os.getpid() if root is None else root
    children: dict[int, list[Process]] = {}
    try:
        entries = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        process = read_process(int(name))
        if process is not None:
            children.setdefault(process.parent, []).append(process)
    found: list[Process] = []
    below = [root]
    while below:
        for child in children.get(below.pop(), []):
            found.append(child)
            below.append(child.pid)
    return found


class LocalRuntime:
    """The raylet and GCS this command started (a local cluster), by pid."""

    def __init__(self, pids: dict[int, str]) -> None:
        self.pids = pids

    @classmethod
    def started_here(cls) -> LocalRuntime:
        return cls({p.pid: p.name for p in descendants() if p.name in RUNTIME and p.running})

    def alive(self) -> bool:
        """Whether every one of them still runs (True when none was found: no local
        runtime to watch, as on a joined cluster)."""
        for pid, name in self.pids.items():
            process = read_process(pid)
            if process is None or process.name != name or not process.running:
                return False
        return True


def kill_descendants(timeout: float = 5.0) -> list[str]:
    """SIGKILL every descendant still running and wait (up to ``timeout``) until none
    runs; the names of those it killed."""
    killed = []
    for process in descendants():
        if process.running:
            try:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.name)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(p.running for p in descendants()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed

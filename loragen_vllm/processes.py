"""Which process is which on this host: the host's name and whether a process still runs.

The store names the process behind a pin or an unfinished publish by (pid, start time, host),
so that a pid the kernel has reused for another process does not keep an adapter pinned, and
pins of processes that ended are ignored. Start times come from ``/proc/<pid>/stat`` (Linux);
without ``/proc`` a running pid is taken as the same process.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"  # safe in file names


def _pid_space() -> str:
    """Where a pid names one process: this host's name, its boot (two machines of one name
    sharing a store) and its PID namespace (two containers of one name on one machine), as far
    as /proc tells them."""
    boot = ns = "0"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        pass
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pass
    return f"{HOST}-{boot}-{ns}"


PID_SPACE = _pid_space()  # a name for file names: only a process of the same PID_SPACE checks our pids


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])  # state (field 3), starttime (field 22)


def start_ticks(pid: int) -> int:
    """When process ``pid`` of this host started, in clock ticks since boot; 0 if unknown."""
    stat = _proc_stat(pid)
    return stat[1] if stat else 0


def pid_alive(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` on this host runs (and, if ``start`` is known, is the same one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, started = stat
    if state in ("Z", "X"):
        return False  # exited, not yet reaped
    return not start or started == start

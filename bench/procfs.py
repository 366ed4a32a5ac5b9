"""Read what the bench needs about a forwarder from /proc: its listening ports, RSS, CPU, fds.

Every contender is a process tree (socat forks one child per connection), so the readers
take a root pid and walk its descendants.  Nothing here writes to /proc.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_LISTEN = "0A"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _fd_links(pids: Iterable[int]) -> Iterator[str]:
    """What each open fd of `pids` points to (`socket:[123]`, `pipe:[45]`, a path)."""
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                yield os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue


def _socket_inodes(pids: Iterable[int]) -> set[str]:
    return {link[8:-1] for link in _fd_links(pids) if link.startswith("socket:[")}


def listening_ports(pids: Iterable[int]) -> set[int]:
    """TCP ports (IPv4 or IPv6) that sockets held by `pids` listen on."""
    inodes = _socket_inodes(pids)
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == _LISTEN and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) over `pids`; processes that vanished count zero."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


def cpu_seconds(root: int) -> float:
    """User+system CPU of `root`, its reaped children and its live descendants."""
    total = 0
    for pid in descendants(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime(11) stime(12) cutime(13) cstime(14).
        total += int(fields[11]) + int(fields[12])
        if pid == root:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def fd_kinds(pids: Iterable[int]) -> Counter[str]:
    """Count the open fds of `pids` by kind: socket, pipe, anon_inode, file."""
    kinds: Counter[str] = Counter()
    for link in _fd_links(pids):
        kinds[link.split(":", 1)[0] if ":[" in link else "file"] += 1
    return kinds


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE towards `wanted` (the hard limit too when root).

    Children inherit it, so forwarders holding 2 fds per idle connection can keep 10,000.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # not privileged: settle for the hard limit
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's `cpu` line.

    Busy is everything but idle and iowait.  Two readings around a test give the
    share of the whole machine in use during it, whoever used it.
    """
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    total = sum(fields[:8])                 # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Percent of all CPUs' time busy between two `machine_cpu` readings."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else None


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def pin(pids: Iterable[int], cpus: set[int]) -> dict[int, set[int]]:
    """Restrict every thread of `pids` to `cpus`; return the old masks for `unpin`."""
    old: dict[int, set[int]] = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                old[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except OSError:
                continue  # the thread ended meanwhile
    return old


def unpin(old: dict[int, set[int]]) -> None:
    """Give threads pinned by `pin` their previous CPU masks back."""
    for tid, cpus in old.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue

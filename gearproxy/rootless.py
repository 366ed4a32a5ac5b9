"""Rootless engine preflight: what the proxies will need, checked before anything is created.

On a rootless engine, container addresses and network namespaces exist only
inside RootlessKit's user and network namespaces.  Every proxy therefore
joins the namespaces of the engine's dockerd (`--join-ns-of PID`, see
`gearproxy.netns.join_namespaces`).  A deploy that could not do that would
create containers whose links never come up, so the daemon checks, at
start-up and before each deploy, and refuses with one line saying what is
missing and how to fix it:

1. `/dev/net/tun` opens read-write (RootlessKit's slirp4netns network needs a
   TAP device from it);
2. the engine's `docker.pid` (beside its socket or in `$XDG_RUNTIME_DIR`)
   reads as the pid of a running dockerd.  Container pids must be host pids
   (RootlessKit without `--pidns`, the default): the proxies open
   `/proc/<container pid>/ns/net` from the host's /proc;
3. a short-lived, single-threaded child process can join that pid's user and
   network namespaces, exactly as a proxy will (the `nsenter -U
   --preserve-credentials -n -t PID` equivalent).  The daemon itself never
   joins: it has threads, and it must stay in the host's namespaces.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

from gearproxy.engine import EngineInfo
from gearproxy.errors import DaemonError, EngineError

TUN_DEVICE = Path("/dev/net/tun")
PROBE_TIMEOUT = 10.0

# Run by `python -I -S -c`: a fresh process with no thread and no site imports.  It joins the
# user namespace (unless it is already in it: the kernel refuses re-joining) and then the network
# namespace of argv[1], and exits 0, or exits 1 printing one line on stderr.
_PROBE = r"""
import ctypes, os, sys
pid = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def join(kind, flag):
    path = "/proc/%s/ns/%s" % (pid, kind)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        sys.exit("cannot open %s (%s)" % (path, err.strerror))
    if kind == "user":
        mine = os.stat("/proc/self/ns/user")
        theirs = os.fstat(fd)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            return
    if libc.setns(fd, flag) != 0:
        sys.exit("setns %s refused (%s)" % (path, os.strerror(ctypes.get_errno())))
    os.close(fd)
join("user", 0x10000000)
join("net", 0x40000000)
"""

# Messages stay short (well under 300 characters with long paths): the CLI relays a failed
# daemon start-up by the last line of its log.
_HOW = "run gearproxy as the user that runs the rootless engine"


def check_tun(path: Path = TUN_DEVICE) -> None:
    """`path` is a character device this user can open read-write, or EngineError says how."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise EngineError(
            f"rootless engine: {path} is missing (RootlessKit's slirp4netns network needs it); "
            f"as root: modprobe tun, or mkdir -p {path.parent} && mknod -m 0666 {path} c 10 200"
        ) from None
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            fix = f"as root: chmod 0666 {path}"
        else:
            fix = f"as root: modprobe tun, and check {path} is the tun device (c 10 200)"
        raise EngineError(f"rootless engine: cannot open {path} ({err.strerror}); {fix}") from None
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise EngineError(f"rootless engine: {path} is not a character device; as root: "
                              f"rm {path} && mknod -m 0666 {path} c 10 200")
    finally:
        os.close(fd)


def read_pid(info: EngineInfo) -> int:
    """The pid in the engine's docker.pid, which must name a running dockerd (a host pid)."""
    pid_file = info.pid_file
    if not pid_file:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or "unset"
        raise EngineError(
            f"rootless engine: no docker.pid in XDG_RUNTIME_DIR={runtime} nor beside the "
            "engine's socket; export the XDG_RUNTIME_DIR of the user running the engine")
    try:
        text = Path(pid_file).read_text().strip()
    except OSError as err:
        raise EngineError(f"rootless engine: cannot read {pid_file} ({err.strerror}); "
                          f"{_HOW}") from None
    if not text.isdigit() or int(text) <= 0:
        raise EngineError(f"rootless engine: {pid_file} holds {text[:20]!r}, not a pid; "
                          "restart the engine")
    pid = int(text)
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        raise EngineError(f"rootless engine: {pid_file} names pid {pid}, which is not "
                          "running; restart the engine, or fix XDG_RUNTIME_DIR") from None
    if not comm.startswith("dockerd"):
        raise EngineError(f"rootless engine: {pid_file} names pid {pid} ({comm[:15]}), not "
                          "dockerd: a stale file, or RootlessKit --pidns (unsupported); "
                          "restart the engine")
    return pid


def check_join(pid: int) -> None:
    """A fresh single-threaded process can join `pid`'s user and network namespaces."""
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(pid)],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DaemonError(f"rootless engine: cannot run the namespace probe ({err})") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1][-100:] if lines else f"exit {proc.returncode}"
        raise DaemonError(f"rootless engine: cannot join the user and network namespaces of "
                          f"dockerd (pid {pid}): {why}; {_HOW}")


def preflight(info: EngineInfo, *, tun: Path = TUN_DEVICE) -> int:
    """Check a rootless engine is usable by this user; returns the pid whose namespaces the
    proxies join.  Blocking (a probe process): run it off the event loop."""
    check_tun(tun)
    pid = read_pid(info)
    check_join(pid)
    return pid

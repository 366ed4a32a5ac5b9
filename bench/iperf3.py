"""iperf3 as a second opinion on throughput: a load client nobody on this project wrote.

`iperf3 -s` cannot bind port 0, so the server gets a port the kernel just handed us
(bind to 0, read it, close) and we retry with a fresh one if it lost the race.  The
client runs `iperf3 -c … -J` through each contender's own iperf3-facing instance.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procfs

Addr = tuple[str, int]


def available() -> bool:
    return shutil.which("iperf3") is not None


def version() -> str:
    try:
        done = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout.splitlines() or ["unknown"])[0]


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """`iperf3 -s` on loopback, stopped by `close`."""

    def __init__(self, logdir: Path, host: str = "127.0.0.1", attempts: int = 5) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(attempts):
            port = _kernel_port(host)
            log = logdir / "iperf3-server.log"
            with log.open("wb") as out:
                self.proc = subprocess.Popen(["iperf3", "-s", "-B", host, "-p", str(port)],
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                             start_new_session=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port in procfs.listening_ports([self.proc.pid]):
                    self.addr: Addr = (host, port)
                    return
                time.sleep(0.02)
            last = log.read_text(errors="replace")[-300:]
            self.close()
        raise RuntimeError(f"iperf3 server did not start: {last}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_client(addr: Addr, seconds: int, streams: int = 1) -> dict[str, Any]:
    """One `iperf3 -c` run; returns Gbit/s received by the server, or an error string."""
    argv = ["iperf3", "-c", addr[0], "-p", str(addr[1]), "-t", str(max(1, seconds)),
            "-P", str(streams), "-J", "--connect-timeout", "5000"]
    for attempt in range(3):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"gbit_s": None, "error": "iperf3 client timed out"}
        try:
            data = json.loads(done.stdout)
        except json.JSONDecodeError:
            return {"gbit_s": None, "error": (done.stderr or done.stdout)[-300:]}
        error = data.get("error")
        if error and "busy" in error and attempt < 2:
            time.sleep(0.5)  # the server is still tearing down the previous test
            continue
        if error:
            return {"gbit_s": None, "error": str(error)}
        received = data["end"]["sum_received"]
        return {"gbit_s": received["bits_per_second"] / 1e9, "error": "",
                "bytes": received["bytes"], "seconds": received["seconds"],
                "retransmits": data["end"].get("sum_sent", {}).get("retransmits")}
    return {"gbit_s": None, "error": "iperf3 server stayed busy"}

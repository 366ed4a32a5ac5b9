"""The bench's load generator, sink, report and CLI produce sane, well-formed results.

The load functions run against a tiny threaded server written here (same first-byte
protocol as the bench sink: ``D`` count-and-answer, ``E`` echo), in a thread pool, for
well under a second each.  The CLI runs once as a subprocess (`--quick --only direct`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench import load, report

ROOT = Path(__file__).resolve().parent.parent


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode, count = 0, 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            mode = mode or data[0]
            count += len(data)
            if mode == load.MODE_ECHO:
                conn.sendall(data)
        if mode == load.MODE_DISCARD:
            conn.sendall(count.to_bytes(8, "big"))


@pytest.fixture
def tiny_server() -> Iterator[tuple[str, int]]:
    """A threaded discard/echo server on 127.0.0.1 with a kernel-chosen port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield listener.getsockname()
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def test_throughput_sink_counts_every_byte_the_streams_sent(tiny_server, pool) -> None:
    """Bulk streams: bytes the server counted equal bytes sent; the rate is positive."""
    got = load.measure_throughput(pool, tiny_server, streams=3, max_bytes=64 << 20,
                                  max_seconds=0.5)
    assert got.errors == ()
    assert got.streams == 3
    assert got.bytes_sent == got.bytes_acked > 0
    assert got.gbit_s > 0
    assert 0 < got.seconds < 15


def test_throughput_stops_at_the_byte_bound(tiny_server, pool) -> None:
    """With a byte bound far below what the time allows, each stream sends exactly it."""
    bound = 3 * load.CHUNK + 5
    got = load.measure_throughput(pool, tiny_server, streams=2, max_bytes=bound, max_seconds=10)
    assert got.errors == ()
    assert got.bytes_sent == got.bytes_acked == 2 * bound


def test_connrate_counts_request_response_round_trips(tiny_server, pool) -> None:
    """Short connections: all succeed, the count respects the bound, the rate is positive."""
    got = load.measure_connrate(pool, tiny_server, max_conns=200, max_seconds=1.0,
                                workers=2, threads=2)
    assert got.errors == 0, got.first_error
    assert 0 < got.connections <= 200
    assert got.per_s > 0


def test_latency_percentiles_are_ordered(tiny_server, pool) -> None:
    """Ping-pong: samples were taken and min <= p50 <= p90 <= p99 <= max."""
    got = load.measure_latency(pool, tiny_server, max_count=2000, max_seconds=0.3)
    assert 0 < got.samples <= 2000
    assert 0 < got.min_us <= got.p50_us <= got.p90_us <= got.p99_us <= got.max_us


def test_percentile_is_nearest_rank() -> None:
    """Nearest-rank percentiles of a known list; NaN for an empty one."""
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 0.5) == 50
    assert load.percentile(values, 0.99) == 99
    assert load.percentile(values, 1.0) == 100
    assert math.isnan(load.percentile([], 0.5))


def test_load_refuses_non_loopback_targets(pool) -> None:
    """Bench traffic only goes to 127.0.0.1 or ::1."""
    with pytest.raises(ValueError, match="loopback"):
        load.measure_throughput(pool, ("10.1.2.3", 9), 1, 1, 0.1)


def test_sink_counts_discards_and_echoes() -> None:
    """The bench sink answers a discard stream with its byte count and echoes 'E' data."""
    with load.Sink() as sink:
        with socket.create_connection(sink.addr, timeout=10) as sock:
            sock.sendall(b"D" + b"x" * 99_999)
            sock.shutdown(socket.SHUT_WR)
            assert int.from_bytes(load._recv_exact(sock, 8), "big") == 100_000
        with socket.create_connection(sink.addr, timeout=10) as sock:
            sock.sendall(b"E" * 64)
            assert load._recv_exact(sock, 64) == b"E" * 64
            assert sink.counts()[0] == 1
        assert sink.wait_active(at_most=0, timeout=10) == 0
        assert sink.counts()[1] == 2


def test_idle_measurement_holds_the_connections_it_reports() -> None:
    """Idle test against the sink itself: every connection opened, RSS read, all closed."""
    with load.Sink() as sink:
        got = load.measure_idle(sink.addr, 200, sink, lambda: [sink.pid], timeout=30)
        assert got.error == ""
        assert got.opened == 200
        assert got.rss_kib > 0 and math.isfinite(got.per_conn_kib)
        assert got.fds_per_conn == pytest.approx(1.0)
        assert sink.counts()[0] == 0


def _fake_run(gp: dict[str, float]) -> dict[str, object]:
    med = {
        "direct": {"tput1_gbit": 20.0, "tput8_gbit": 20.0, "conn_per_s": 10000.0,
                   "lat_p50_us": 20.0, "lat_p99_us": 60.0},
        "haproxy": {"tput1_gbit": 12.0, "cpu_s_per_gb": 0.25, "conn_per_s": 6000.0},
        "docker-proxy": {"conn_per_s": 5000.0},
        "gearproxy-splice": gp,
    }
    return {"meta": {"started": "now", "command": "python -m bench", "rounds": 1, "host": "h",
                     "cpus": 2, "kernel": "k", "python": "3.11", "load_before": "0 0 0",
                     "load_after": "0 0 0"},
            "contenders": {n: {"version": "v", "note": ""} for n in med},
            "skipped": {"socat": "not installed"}, "medians": med,
            "targets": report.check_targets(med), "errors": {}, "notes": ["a note"]}


def test_targets_pass_when_met_and_fail_when_missed() -> None:
    """Each issue-3 target gives PASS, FAIL, or n/a when a figure or reference is missing."""
    good = {"tput1_gbit": 18.0, "tput8_gbit": 18.0, "conn_per_s": 7000.0, "lat_p50_us": 30.0,
            "lat_p99_us": 100.0, "cpu_s_per_gb": 0.26, "idle_mib_10k": 100.0,
            "idle_kib_per_conn": 5.0, "idle_pipes_added": 0.0}
    status = {t["target"]: t["status"] for t in _fake_run(good)["targets"]}  # type: ignore[attr-defined]
    assert status["tput1-direct"] == status["tput1-haproxy"] == status["conn-docker"] == "PASS"
    assert status["p50"] == status["p99"] == status["cpu-haproxy"] == "PASS"
    assert status["idle-rss"] == status["idle-kib"] == status["idle-pipes"] == "PASS"
    assert status["p50-pin"] == "n/a"
    bad = {**good, "tput1_gbit": 11.0, "lat_p50_us": 40.0, "cpu_s_per_gb": 0.5,
           "idle_pipes_added": 2000.0}
    status = {t["target"]: t["status"] for t in _fake_run(bad)["targets"]}  # type: ignore[attr-defined]
    assert status["tput1-direct"] == status["tput1-haproxy"] == status["p50"] == "FAIL"
    assert status["cpu-haproxy"] == status["idle-pipes"] == "FAIL"


def test_markdown_has_figures_ratios_targets_and_skips() -> None:
    """The Markdown report names every contender, the skipped ones and the targets."""
    text = report.markdown(_fake_run({"tput1_gbit": 18.0}))
    assert "| gearproxy-splice | v |" in text
    assert "Skipped **socat**: not installed" in text
    assert "Ratio to direct" in text and "0.90x" in text
    assert "| gearproxy-splice | 1-stream >= 0.85 x direct | 0.90x | PASS |" in text
    assert "noisy" in text


def test_median_ignores_missing_values() -> None:
    """Medians skip failed rounds (None/NaN) and are None when nothing succeeded."""
    assert report.median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0
    assert report.median([None]) is None


def test_cli_quick_direct_writes_json_and_markdown(tmp_path: Path) -> None:
    """`python -m bench --quick --only direct` writes run.json and report.md with figures."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "direct",
                           "--metrics", "throughput,connrate,latency", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "run.json").read_text())
    direct = data["medians"]["direct"]
    assert direct["tput1_gbit"] > 0 and direct["conn_per_s"] > 0
    assert direct["lat_p50_us"] <= direct["lat_p99_us"]
    text = (out / "report.md").read_text()
    assert "| direct |" in text and "load average" in text
    assert "| direct |" in done.stdout

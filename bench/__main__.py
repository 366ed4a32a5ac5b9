"""`python -m bench`: load-test the forwarding hot path beside its peers, on loopback.

Theory of operation: one sink process serves every test; each contender (direct, the
gearproxy engines, socat, haproxy, docker-proxy, whichever are installed) runs one
forwarding instance to it (and one to the iperf3 server).  Each round runs every metric
for every contender in turn (A B C … A B C …), so slow drift of a shared machine spreads
over all of them; the report shows medians of the rounds.  Idle-connection RSS is taken
once, after the rounds.  Every load loop is bounded in bytes or count and in seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import contenders as cont
from bench import iperf3, load, procfs, report

METRIC_GROUPS = ("throughput", "streams8", "connrate", "latency", "pinned", "iperf3", "idle")


def _profile(quick: bool) -> dict[str, Any]:
    """Durations and bounds; --quick keeps the whole run well under a minute."""
    if quick:
        return {"rounds": 1, "tput_s": 0.4, "tput_bytes": 4 << 30, "conn_s": 0.4,
                "conn_max": 4000, "lat_s": 0.3, "lat_max": 5000, "iperf3_s": 1, "idle": 1000}
    return {"rounds": 3, "tput_s": 2.0, "tput_bytes": 32 << 30, "conn_s": 1.5,
            "conn_max": 20000, "lat_s": 1.0, "lat_max": 30000, "iperf3_s": 2, "idle": 10000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one short round (CI)")
    p.add_argument("--rounds", type=int, help="rounds to alternate (default 3, quick 1)")
    p.add_argument("--only", help="comma-separated contenders, e.g. direct,gearproxy-splice")
    p.add_argument("--metrics", default=",".join(METRIC_GROUPS),
                   help=f"comma-separated subset of: {','.join(METRIC_GROUPS)}")
    p.add_argument("--idle-conns", type=int, help="idle connections (default 10000, quick 1000)")
    p.add_argument("--out", type=Path, help="directory (default bench/results/<timestamp>/)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target FAILs")
    args = p.parse_args(argv)
    args.metric_set = {m.strip() for m in args.metrics.split(",") if m.strip()}
    unknown = args.metric_set - set(METRIC_GROUPS)
    if unknown:
        p.error(f"unknown --metrics {sorted(unknown)}; choose from {', '.join(METRIC_GROUPS)}")
    return args


def _select(only: str | None) -> list[cont.Contender]:
    every = cont.all_contenders()
    if not only:
        return every
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name: c for c in every}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown contender(s) {missing}; known: {', '.join(known)}")
    return [known[n] for n in wanted]


class Run:
    """The state of one bench run: instances, raw values, errors, notes."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.prof = _profile(args.quick)
        self.rounds = args.rounds or self.prof["rounds"]
        self.values: dict[str, dict[str, list[float | None]]] = {}
        self.details: list[dict[str, Any]] = []
        self.errors: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}
        self.info: dict[str, dict[str, str]] = {}
        self.instances: dict[str, cont.Instance] = {}
        self.iperf_instances: dict[str, cont.Instance | None] = {}

    def record(self, name: str, rnd: int, key: str, value: float | None, detail: Any) -> None:
        self.values.setdefault(name, {}).setdefault(key, []).append(value)
        self.details.append({"contender": name, "round": rnd, "metric": key,
                             "value": value, "detail": detail})

    def error(self, name: str, text: str) -> None:
        errs = self.errors.setdefault(name, [])
        if text not in errs:
            errs.append(text)
            print(f"  ! {name}: {text}", file=sys.stderr)


def _detail(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    return obj


def _cpu(inst: cont.Instance) -> float | None:
    return None if inst.root_pid is None else procfs.cpu_seconds(inst.root_pid)


def run_round(run: Run, rnd: int, pool: Any, sink: load.Sink,
              iperf_server: iperf3.Server | None, logdir: Path) -> None:
    """Every metric for every contender once, contenders alternating within each metric."""
    prof, metrics = run.prof, run.args.metric_set
    cpu: dict[str, list[float]] = {n: [0.0, 0.0] for n in run.instances}

    def throughput(name: str, inst: cont.Instance, streams: int, key: str) -> None:
        c0 = _cpu(inst)
        m0 = procfs.machine_cpu()
        per_stream = prof["tput_bytes"] // streams
        got = load.measure_throughput(pool, inst.addr, streams, per_stream, prof["tput_s"])
        c1 = _cpu(inst)
        if streams == 1:
            run.record(name, rnd, "busy1_pct", procfs.busy_pct(m0, procfs.machine_cpu()), None)
        for err in got.errors:
            run.error(name, f"{key}: {err}")
        ok = not got.errors and got.bytes_acked > 0
        run.record(name, rnd, key, got.gbit_s if ok else None, _detail(got))
        if ok and c0 is not None and c1 is not None:
            cpu[name][0] += c1 - c0
            cpu[name][1] += got.bytes_acked

    steps: list[tuple[str, Callable[[str, cont.Instance], None]]] = []
    if "throughput" in metrics:
        steps.append(("1-stream", lambda n, i: throughput(n, i, 1, "tput1_gbit")))
    if "streams8" in metrics:
        steps.append(("8-stream", lambda n, i: throughput(n, i, 8, "tput8_gbit")))
    if "connrate" in metrics:
        def connrate(name: str, inst: cont.Instance) -> None:
            m0 = procfs.machine_cpu()
            got = load.measure_connrate(pool, inst.addr, prof["conn_max"], prof["conn_s"])
            run.record(name, rnd, "busy_conn_pct", procfs.busy_pct(m0, procfs.machine_cpu()),
                       None)
            if got.errors:
                run.error(name, f"connrate: {got.errors} errors, first: {got.first_error}")
            run.record(name, rnd, "conn_per_s", got.per_s if got.connections else None,
                       _detail(got))
        steps.append(("conn/s", connrate))
    for group, prefix, pinned in (("latency", "lat", False), ("pinned", "pin", True)):
        if group in metrics:
            def latency(name: str, inst: cont.Instance, prefix: str = prefix,
                        pinned: bool = pinned) -> None:
                pins = [*inst.pids(), sink.pid] if pinned else None
                got = load.measure_latency(pool, inst.addr, prof["lat_max"], prof["lat_s"],
                                           pin_pids=pins)
                run.record(name, rnd, f"{prefix}_p50_us", got.p50_us, _detail(got))
                run.record(name, rnd, f"{prefix}_p99_us", got.p99_us, None)
            steps.append((group, latency))
    if "iperf3" in metrics and iperf_server is not None:
        def iperf(name: str, inst: cont.Instance) -> None:
            target = _iperf_instance(run, name, iperf_server, logdir)
            if target is None:
                return
            got = iperf3.run_client(target.addr, prof["iperf3_s"])
            if got["error"]:
                run.error(name, f"iperf3: {got['error']}")
            run.record(name, rnd, "iperf3_gbit", got["gbit_s"], got)
        steps.append(("iperf3", iperf))

    for label, step in steps:
        for name, inst in run.instances.items():
            t0 = time.monotonic()
            try:
                step(name, inst)
            except (OSError, RuntimeError, TimeoutError) as err:
                run.error(name, f"{label}: {type(err).__name__}: {err}")
            print(f"  round {rnd + 1} {label:9} {name:17} {time.monotonic() - t0:5.1f} s",
                  file=sys.stderr)
    for name, (secs, nbytes) in cpu.items():
        if nbytes and run.instances[name].proc is not None:
            run.record(name, rnd, "cpu_s_per_gb", secs / (nbytes / 1e9), None)


def _iperf_instance(run: Run, name: str, server: iperf3.Server,
                    logdir: Path) -> cont.Instance | None:
    if name not in run.iperf_instances:
        contender = next(c for c in cont.all_contenders() if c.name == name)
        try:
            run.iperf_instances[name] = contender.start(server.addr, logdir, tag="-iperf3",
                                                        probe=cont.connect_probe)
        except cont.StartError as err:
            run.error(name, f"iperf3 instance: {err}")
            run.iperf_instances[name] = None
    return run.iperf_instances[name]


def run_idle(run: Run, sink: load.Sink) -> None:
    """Idle connections through each forwarder; RSS growth scaled to 10,000 connections."""
    hard_cap = (procfs.raise_nofile(1 << 20) - 512) // 2
    wanted = run.args.idle_conns or run.prof["idle"]
    for name, inst in run.instances.items():
        if inst.proc is None:
            continue
        count = min(wanted, hard_cap // 3 if name == "docker-proxy" else hard_cap)
        if name == "socat":
            count = min(count, 100)  # a process per connection: 10,000 would swamp the host
        t0 = time.monotonic()
        got = load.measure_idle(inst.addr, count, sink, inst.pids)
        if got.error:
            run.error(name, f"idle: {got.error}")
        ok = got.opened > 0 and math.isfinite(got.per_conn_kib)
        mib_10k = (got.rss_base_kib + got.per_conn_kib * 10000) / 1024 if ok else None
        run.record(name, 0, "idle_mib_10k", mib_10k, _detail(got))
        run.record(name, 0, "idle_kib_per_conn", got.per_conn_kib if ok else None, None)
        run.record(name, 0, "idle_fds_per_conn", got.fds_per_conn if ok else None, None)
        run.record(name, 0, "idle_pipes_added",
                   float(got.pipes_idle - got.pipes_base) if ok else None, None)
        run.notes.append(f"idle {name}: {got.opened} connections held, RSS {got.rss_base_kib} "
                         f"-> {got.rss_kib} KiB, pipes {got.pipes_base} -> {got.pipes_idle}")
        print(f"  idle {name:17} {got.opened} conns {time.monotonic() - t0:5.1f} s",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now().astimezone()
    out = args.out or Path(__file__).parent / "results" / started.strftime("%Y%m%d-%H%M%S")
    logdir = out / "logs"
    run = Run(args, out)
    nofile = procfs.raise_nofile(1 << 20)
    load_before = procfs.loadavg()
    for contender in _select(args.only):
        why = contender.unavailable()
        if why:
            run.skipped[contender.name] = why
            print(f"skip {contender.name}: {why}", file=sys.stderr)
        else:
            run.info[contender.name] = {"version": contender.version(), "note": contender.note}
    iperf_server: iperf3.Server | None = None
    pool = load.make_pool(2)
    sink = load.Sink(nofile=nofile)
    try:
        for contender in _select(args.only):
            if contender.name in run.info:
                try:
                    run.instances[contender.name] = contender.start(sink.addr, logdir)
                except cont.StartError as err:
                    run.skipped[contender.name] = f"did not start: {err}"
                    del run.info[contender.name]
        if "iperf3" in args.metric_set:
            if iperf3.available():
                iperf_server = iperf3.Server(logdir)
                run.notes.append(f"iperf3 second opinion: {iperf3.version()}, "
                                 f"`iperf3 -c -t {run.prof['iperf3_s']} -J`, defaults otherwise")
            else:
                run.notes.append("iperf3 not installed: no second opinion on throughput")
        for rnd in range(run.rounds):
            run_round(run, rnd, pool, sink, iperf_server, logdir)
        if "idle" in args.metric_set:
            run_idle(run, sink)
    finally:
        for inst in [*run.instances.values(), *run.iperf_instances.values()]:
            if inst is not None:
                inst.stop()
        if iperf_server is not None:
            iperf_server.close()
        sink.close()
        pool.shutdown(cancel_futures=True)
    run.notes += [
        f"RLIMIT_NOFILE {nofile} (hard limit; raising it needs CAP_SYS_RESOURCE): a forwarder "
        "holds 2 fds per connection, so fewer than 10,000 idle connections may be opened; "
        "'RSS @10k' is base + measured per-connection growth x 10,000.",
        "docker-proxy idles with 2 pipes per connection (Go's io.Copy splices), so it gets a "
        "third of the fd budget; socat forks per connection and is measured with 100 (its RSS "
        "sums every child's, so shared pages count once per connection).",
        "1-CPU latency pins client, forwarder and sink to one CPU: the path's own cost without "
        "cross-CPU wake-ups, which on this VM dominate the unpinned figure.",
        "CPU s/GB: user+system CPU of the forwarder's processes over both throughput tests, "
        "per GB (1e9 bytes) forwarded one way.",
        "CPUs busy: the share of all CPUs' time in use during the 1-stream and the conns/s "
        "tests, by any process (/proc/stat).  Near 100% for direct means the load generator "
        "and sink alone fill the machine, so whatever a forwarder spends comes out of the "
        "same CPUs: on such a machine no forwarder can come near direct's figure.",
    ]
    values = {n: run.values.get(n, {}) for n in run.instances}
    med = report.medians(values)
    data: dict[str, Any] = {
        "meta": {"started": started.isoformat(timespec="seconds"),
                 "command": shlex.join(["python", "-m", "bench", *(argv or sys.argv[1:])]),
                 "rounds": run.rounds, "quick": args.quick, "host": socket.gethostname(),
                 "cpus": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(),
                 "load_before": " ".join(f"{x:.2f}" for x in load_before),
                 "load_after": " ".join(f"{x:.2f}" for x in procfs.loadavg()),
                 "profile": run.prof, "nofile": nofile},
        "contenders": run.info, "skipped": run.skipped, "values": values, "medians": med,
        "targets": report.check_targets(med), "details": run.details, "errors": run.errors,
        "notes": run.notes,
    }
    js, md, png = report.write_all(data, out)
    print(md.read_text())
    print(f"wrote {js}, {md}" + (f", {png}" if png else ""), file=sys.stderr)
    if args.strict and any(t["status"] == "FAIL" for t in data["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

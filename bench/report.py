"""Turn a run's raw figures into medians, ratios, target checks, Markdown and a PNG chart.

Pure functions over the run dictionary (the JSON file's content) except `write_*`.
Targets come from issue 3 ("Targets for the bench"); they are informational, never an
exit failure unless the caller asks for `--strict`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    fmt: str
    higher_is_better: bool


METRICS = (
    Metric("tput1_gbit", "1-stream Gbit/s", "{:.2f}", True),
    Metric("tput8_gbit", "8-stream Gbit/s", "{:.2f}", True),
    Metric("iperf3_gbit", "iperf3 1-stream Gbit/s", "{:.2f}", True),
    Metric("conn_per_s", "short conns/s", "{:,.0f}", True),
    Metric("lat_p50_us", "ping-pong p50 µs", "{:.1f}", False),
    Metric("lat_p99_us", "ping-pong p99 µs", "{:.1f}", False),
    Metric("pin_p50_us", "1-CPU p50 µs", "{:.1f}", False),
    Metric("pin_p99_us", "1-CPU p99 µs", "{:.1f}", False),
    Metric("cpu_s_per_gb", "CPU s/GB", "{:.2f}", False),
    Metric("busy1_pct", "CPUs busy 1-stream %", "{:.0f}", False),
    Metric("busy_conn_pct", "CPUs busy conns/s %", "{:.0f}", False),
    Metric("idle_mib_10k", "RSS @10k idle MiB", "{:.1f}", False),
    Metric("idle_kib_per_conn", "KiB/idle conn", "{:.2f}", False),
    Metric("idle_fds_per_conn", "fds/idle conn", "{:.1f}", False),
)
NONE = "-"
BY_KEY = {m.key: m for m in METRICS}
RATIOS = {  # reference contender -> figures worth comparing with it
    "direct": ("tput1_gbit", "tput8_gbit", "iperf3_gbit", "conn_per_s"),
    "haproxy": ("tput1_gbit", "tput8_gbit", "conn_per_s", "cpu_s_per_gb", "idle_kib_per_conn"),
    "docker-proxy": ("tput1_gbit", "tput8_gbit", "conn_per_s", "cpu_s_per_gb",
                     "idle_kib_per_conn"),
}
ADDED_KEYS = ("lat_p50_us", "lat_p99_us", "pin_p50_us", "pin_p99_us")


def median(values: list[float | None]) -> float | None:
    """Median of the finite values, or None when there are none."""
    good = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(good) if good else None


def medians(values: dict[str, dict[str, list[float | None]]]) -> dict[str, dict[str, float | None]]:
    return {name: {key: median(vals) for key, vals in per.items()} for name, per in values.items()}


# --------------------------------------------------------------------------- targets


Medians = dict[str, dict[str, float | None]]
Checked = tuple[float | None, bool | None]


@dataclass(frozen=True, slots=True)
class Target:
    ident: str
    text: str
    check: Callable[[dict[str, dict[str, float | None]], str], tuple[float | None, bool | None]]
    fmt: str


def _get(med: dict[str, dict[str, float | None]], name: str, key: str) -> float | None:
    return med.get(name, {}).get(key)


def _ratio(key: str, ref: str, bound: float, *, strict: bool = False,
           at_most: bool = False) -> Callable[..., Any]:
    """Check mine/ref against `bound`: >= (or > if strict), or <= with `at_most`."""
    def check(med: Medians, name: str) -> Checked:
        mine, theirs = _get(med, name, key), _get(med, ref, key)
        if mine is None or not theirs:
            return None, None
        ratio = mine / theirs
        if at_most:
            return ratio, ratio <= bound
        return ratio, ratio > bound if strict else ratio >= bound
    return check


def _added(key: str, limit: float) -> Callable[..., Any]:
    def check(med: Medians, name: str) -> Checked:
        mine, direct = _get(med, name, key), _get(med, "direct", key)
        if mine is None or direct is None:
            return None, None
        return mine - direct, mine - direct <= limit
    return check


def _at_most(key: str, limit: float) -> Callable[..., Any]:
    def check(med: Medians, name: str) -> Checked:
        mine = _get(med, name, key)
        return (None, None) if mine is None else (mine, mine <= limit)
    return check


TARGETS = (
    Target("tput1-direct", "1-stream >= 0.85 x direct", _ratio("tput1_gbit", "direct", 0.85),
           "{:.2f}x"),
    Target("tput1-haproxy", "1-stream > haproxy", _ratio("tput1_gbit", "haproxy", 1.0, strict=True),
           "{:.2f}x"),
    Target("tput8-direct", "8-stream >= 0.85 x direct", _ratio("tput8_gbit", "direct", 0.85),
           "{:.2f}x"),
    Target("conn-direct", "conns/s >= 0.6 x direct", _ratio("conn_per_s", "direct", 0.6),
           "{:.2f}x"),
    Target("conn-docker", "conns/s >= docker-proxy", _ratio("conn_per_s", "docker-proxy", 1.0),
           "{:.2f}x"),
    Target("p50", "added p50 <= 15 µs", _added("lat_p50_us", 15.0), "{:+.1f} µs"),
    Target("p99", "added p99 <= 50 µs", _added("lat_p99_us", 50.0), "{:+.1f} µs"),
    Target("p50-pin", "added p50 <= 15 µs (1 CPU)", _added("pin_p50_us", 15.0), "{:+.1f} µs"),
    Target("p99-pin", "added p99 <= 50 µs (1 CPU)", _added("pin_p99_us", 50.0), "{:+.1f} µs"),
    Target("cpu-haproxy", "CPU s/GB <= 1.1 x haproxy",
           _ratio("cpu_s_per_gb", "haproxy", 1.1, at_most=True), "{:.2f}x"),
    Target("idle-rss", "10,000 idle conns <= 150 MiB RSS", _at_most("idle_mib_10k", 150.0),
           "{:.1f} MiB"),
    Target("idle-kib", "<= 8 KiB per idle conn", _at_most("idle_kib_per_conn", 8.0),
           "{:.2f} KiB"),
    Target("idle-pipes", "idle conns hold no pipes", _at_most("idle_pipes_added", 0.0),
           "{:.0f} pipes"),
)


def check_targets(med: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    """Every target for every gearproxy contender present: value and PASS/FAIL/n/a."""
    rows = []
    for name in med:
        if not name.startswith("gearproxy"):
            continue
        for target in TARGETS:
            value, ok = target.check(med, name)
            rows.append({"contender": name, "target": target.ident, "text": target.text,
                         "value": value,
                         "shown": "n/a" if value is None else target.fmt.format(value),
                         "status": "n/a" if ok is None else ("PASS" if ok else "FAIL")})
    return rows


# --------------------------------------------------------------------------- markdown


def _fmt(key: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NONE
    return BY_KEY[key].fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def markdown(run: dict[str, Any]) -> str:
    """The human report: header, figures, ratios, targets, notes."""
    meta, med = run["meta"], run["medians"]
    names = list(med)
    keys = [m.key for m in METRICS if any(med[n].get(m.key) is not None for n in names)]
    lines = [f"# gearproxy forwarding bench — {meta['started']}", "",
             f"`{meta['command']}` — {meta['rounds']} round(s), contenders alternated in "
             f"each round, medians shown.  Host: {meta['host']}, {meta['cpus']} CPUs, "
             f"kernel {meta['kernel']}, Python {meta['python']}.",
             "",
             f"**Shared, noisy machine:** load average {meta['load_before']} before, "
             f"{meta['load_after']} after; other jobs may run beside the bench.  Load "
             "generator, sink and forwarder share the same CPUs.", ""]
    lines += _table(["contender", "version", "notes"],
                    [[n, run["contenders"][n]["version"], run["contenders"][n]["note"]]
                     for n in names])
    for name, why in run["skipped"].items():
        lines.append(f"\nSkipped **{name}**: {why}")
    lines += ["", "## Figures (median of rounds)", ""]
    lines += _table(["contender", *[BY_KEY[k].label for k in keys]],
                    [[n, *[_fmt(k, med[n].get(k)) for k in keys]] for n in names])
    lines += ["", "## Ratios"]
    for ref, ratio_keys in RATIOS.items():
        rkeys = [k for k in ratio_keys if k in keys and med.get(ref, {}).get(k)]
        if not rkeys:
            continue
        lines += ["", f"Ratio to {ref} (contender / {ref}):", ""]
        rows = []
        for n in names:
            cells = []
            for k in rkeys:
                mine, theirs = med[n].get(k), med[ref][k]
                cells.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else NONE)
            rows.append([n, *cells])
        lines += _table(["contender", *[BY_KEY[k].label for k in rkeys]], rows)
    added = [k for k in ADDED_KEYS if k in keys]
    if "direct" in med and added:
        lines += ["", "Added latency (contender minus direct):", ""]
        lines += _table(["contender", *[BY_KEY[k].label for k in added]],
                        [[n, *[f"{med[n][k] - med['direct'][k]:+.1f}"
                               if med[n].get(k) is not None and med["direct"].get(k) is not None
                               else NONE for k in added]] for n in names if n != "direct"])
    if run["targets"]:
        lines += ["", "## Targets (issue 3; informational)", ""]
        lines += _table(["contender", "target", "measured", "result"],
                        [[t["contender"], t["text"], t["shown"], t["status"]]
                         for t in run["targets"]])
    lines += ["", "## Notes", ""] + [f"- {note}" for note in run["notes"]]
    for name, errs in run["errors"].items():
        for err in errs[:5]:
            lines.append(f"- error, {name}: {err}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- chart


def chart(run: dict[str, Any], path: Path) -> str | None:
    """Write a PNG of throughput, connection rate and latency; None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install '.[bench]'): chart skipped"
    med = run["medians"]
    names = list(med)
    panels = [("Throughput (Gbit/s, higher is better)",
               ["tput1_gbit", "tput8_gbit", "iperf3_gbit"]),
              ("Short connections per second (higher is better)", ["conn_per_s"]),
              ("Ping-pong latency, 64 B (µs, log scale, lower is better)",
               ["lat_p50_us", "lat_p99_us", "pin_p50_us", "pin_p99_us"]),
              ("CPU seconds per GB forwarded (lower is better)", ["cpu_s_per_gb"])]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (title, wanted) in zip(axes.flat, panels, strict=True):
        keys = [k for k in wanted if any(med[n].get(k) is not None for n in names)]
        width = 0.8 / max(1, len(keys))
        for i, key in enumerate(keys):
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
            ys = [med[n].get(key) or 0.0 for n in names]
            bars = ax.bar(xs, ys, width, label=BY_KEY[key].label)
            ax.bar_label(bars, labels=[_fmt(key, med[n].get(key)) for n in names], fontsize=7,
                         rotation=90, padding=2)
        if "latency" in title:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.margins(y=0.25)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"gearproxy bench {run['meta']['started']} — median of "
                 f"{run['meta']['rounds']} round(s), load {run['meta']['load_before']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write_all(run: dict[str, Any], out: Path) -> tuple[Path, Path, Path | None]:
    """Write run.json, report.md and chart.png into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    png: Path | None = out / "chart.png"
    assert png is not None
    skipped = chart(run, png)
    if skipped:
        run["notes"].append(skipped)
        png = None
    js = out / "run.json"
    js.write_text(json.dumps(run, indent=2, default=str) + "\n")
    md = out / "report.md"
    md.write_text(markdown(run))
    return js, md, png

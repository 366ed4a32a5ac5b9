"""Summaries and the Markdown report of `bench.deploy_latency` (pure functions over its JSON).

Medians per size and contender, per-container cost (wall time / 2N containers), ratios
and differences to the baselines, and the marginal cost of each added container between
successive sizes.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

# --------------------------------------------------------------------------- report


def median(values: list[Any]) -> float | None:
    good = [v for v in values if isinstance(v, int | float)]
    return statistics.median(good) if good else None


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    med: dict[str, dict[str, dict[str, float | None]]] = {}
    derived: dict[str, dict[str, float | None]] = {}
    for size, per in raw.items():
        med[size] = {name: {key: median([r.get(key) for r in rows]) for key in rows[0]
                             if key != "round" and not isinstance(rows[0][key], list)}
                     for name, rows in per.items() if rows}
        n = int(size)
        gp = med[size].get("gearproxy", {})
        cli = med[size].get("docker-cli", {})
        sdk = med[size].get("docker-sdk", {})

        def ms_per(value: float | None, n: int = n) -> float | None:
            return None if value is None else value * 1000 / (2 * n)

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if a is None or not b else a / b

        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        derived[size] = {
            "containers": 2 * n, "links": n,
            "gp_ms_per_container": ms_per(gp.get("deploy_s")),
            "gp_verified_ms_per_container": ms_per(gp.get("verified_s")),
            "cli_ms_per_container": ms_per(cli.get("up_s")),
            "sdk_ms_per_container": ms_per(sdk.get("up_s")),
            "ratio_gp_cli": ratio(gp.get("deploy_s"), cli.get("up_s")),
            "ratio_gp_sdk": ratio(gp.get("deploy_s"), sdk.get("up_s")),
            "overhead_vs_cli_s": diff(gp.get("deploy_s"), cli.get("up_s")),
            "overhead_vs_sdk_s": diff(gp.get("deploy_s"), sdk.get("up_s")),
        }
    growth = []
    sizes = sorted(med, key=int)
    for a, b in itertools.pairwise(sizes):
        added = 2 * (int(b) - int(a))
        row: dict[str, Any] = {"from": int(a), "to": int(b), "added_containers": added}
        for name, key in (("gearproxy", "deploy_s"), ("docker-cli", "up_s"),
                          ("docker-sdk", "up_s"), ("gearproxy", "delete_s")):
            va, vb = med[a].get(name, {}).get(key), med[b].get(name, {}).get(key)
            row[f"{name}.{key}"] = None if va is None or vb is None else (vb - va) * 1000 / added
        growth.append(row)
    return {"medians": med, "derived": derived, "growth_ms_per_added_container": growth}


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(result: dict[str, Any]) -> str:
    meta, med, der = result["meta"], result["medians"], result["derived"]
    sizes = sorted(med, key=int)
    lines = [f"# gearproxy deploy latency — {meta['started']}", "",
             f"`{meta['command']}` — {meta['rounds']} round(s) per size, contenders alternated, "
             f"medians shown.  {meta['host']}, {meta['cpus']} CPUs, Docker {meta['docker']}, "
             f"Python {meta['python']}.  Load average {meta['load_before']} before, "
             f"{meta['load_after']} after (shared machine).", "",
             f"Shape: {meta['shape']}.", ""]

    def g(size: str, name: str, key: str) -> Any:
        return med[size].get(name, {}).get(key)

    lines += _table(
        ["N links", "containers", "gearproxy deploy s", "verified serving s",
         "docker run (CLI) s", "docker API s", "gp / CLI", "gp / API", "gp ms/ctr",
         "CLI ms/ctr", "API ms/ctr", "gp delete s", "docker rm s"],
        [[s, str(der[s]["containers"]), _f(g(s, "gearproxy", "deploy_s")),
          _f(g(s, "gearproxy", "verified_s")), _f(g(s, "docker-cli", "up_s")),
          _f(g(s, "docker-sdk", "up_s")), _f(der[s]["ratio_gp_cli"], "{:.2f}x"),
          _f(der[s]["ratio_gp_sdk"], "{:.2f}x"), _f(der[s]["gp_ms_per_container"], "{:.0f}"),
          _f(der[s]["cli_ms_per_container"], "{:.0f}"),
          _f(der[s]["sdk_ms_per_container"], "{:.0f}"), _f(g(s, "gearproxy", "delete_s")),
          _f(g(s, "docker-cli", "remove_s"))] for s in sizes])
    if result["growth_ms_per_added_container"]:
        lines += ["", "Growth: marginal ms per added container between sizes:", ""]
        lines += _table(["sizes", "gearproxy deploy", "docker CLI", "docker API",
                         "gearproxy delete"],
                        [[f"{r['from']} → {r['to']}", _f(r["gearproxy.deploy_s"], "{:.0f}"),
                          _f(r["docker-cli.up_s"], "{:.0f}"), _f(r["docker-sdk.up_s"], "{:.0f}"),
                          _f(r["gearproxy.delete_s"], "{:.0f}")]
                         for r in result["growth_ms_per_added_container"]])
    lines += ["", "Where gearproxy's deploy time goes (from progress-line arrival times; "
              "median):", ""]
    lines += _table(["N links", "CLI+plan s", "network+proxy spawns s", "containers s",
                     "daemon ms per container", "last start + ready s", "daemon CPU s",
                     "proxies' CPU s", "proxies", "verify retries"],
                    [[s, _f(g(s, "gearproxy", "plan_s")),
                      _f(g(s, "gearproxy", "before_containers_s")),
                      _f(g(s, "gearproxy", "containers_s")),
                      _f(g(s, "gearproxy", "per_container_ms"), "{:.0f}"),
                      _f(g(s, "gearproxy", "tail_s")),
                      _f(g(s, "gearproxy", "daemon_cpu_s")),
                      _f(g(s, "gearproxy", "proxy_cpu_s")),
                      _f(g(s, "gearproxy", "proxies"), "{:.0f}"),
                      _f(g(s, "gearproxy", "verify_retries"), "{:.0f}")] for s in sizes])
    lines += ["", "## Notes", "", *(f"- {n}" for n in result["notes"])]
    lines += [f"- error: {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"

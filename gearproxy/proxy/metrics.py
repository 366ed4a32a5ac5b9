"""Counters per listener and per backend, rendered as JSON and Prometheus text.

Directions are named from the client's side everywhere: `bytes_in` flowed
client -> target, `bytes_out` target -> client.  The hot path never touches
these objects: a relay counts into its own attributes and the totals are
folded in when it closes; a snapshot adds the live relays' counts, so stats
read mid-transfer are current.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, Protocol


class Relay(Protocol):
    """What the counters need to know about a live relay (both engines provide it)."""

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...


class ListenerStats:
    """Counters of one listener (they outlive the listener for the process' life)."""

    __slots__ = ("active", "bound", "bytes_in", "bytes_out", "listen", "netns", "refused",
                 "total")

    def __init__(self, listen: str, netns: str | None) -> None:
        self.listen = listen
        self.bound = listen
        self.netns = netns
        self.total = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.refused = 0


class BackendStats:
    """Counters of one target address (kept after it leaves the pool)."""

    __slots__ = ("active", "bytes_in", "bytes_out", "connect_failures", "connect_seconds",
                 "connect_seconds_max", "target", "total")

    def __init__(self, target: str) -> None:
        self.target = target
        self.total = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_failures = 0
        self.connect_seconds = 0.0
        self.connect_seconds_max = 0.0


class Totals:
    """Process-wide counters."""

    __slots__ = ("active", "bytes_in", "bytes_out", "connect_failures", "no_backend",
                 "refused_max_conns", "started", "total")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.total = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_failures = 0
        self.no_backend = 0
        self.refused_max_conns = 0


class LiveConn(Protocol):
    """A live connection as the snapshot sees it."""

    @property
    def listener_stats(self) -> ListenerStats: ...

    @property
    def backend_stats(self) -> BackendStats | None: ...

    def counts(self) -> tuple[int, int]: ...


def snapshot(totals: Totals, listeners: Iterable[tuple[ListenerStats, bool]],
             backends: Iterable[tuple[BackendStats, bool, bool]], live: Iterable[LiveConn],
             extra: dict[str, Any]) -> dict[str, Any]:
    """The `stats` object of the control protocol (see the proxy README section)."""
    live_l: dict[int, list[int]] = {}
    live_b: dict[int, list[int]] = {}
    live_in = live_out = 0
    for conn in live:
        up, down = conn.counts()
        live_in += up
        live_out += down
        acc = live_l.setdefault(id(conn.listener_stats), [0, 0])
        acc[0] += up
        acc[1] += down
        if conn.backend_stats is not None:
            acc = live_b.setdefault(id(conn.backend_stats), [0, 0])
            acc[0] += up
            acc[1] += down
    lis = []
    for ls, listening in listeners:
        add = live_l.get(id(ls), [0, 0])
        lis.append({"listen": ls.listen, "bound": ls.bound, "netns": ls.netns,
                    "listening": listening,
                    "connections_total": ls.total, "connections_active": ls.active,
                    "bytes_in": ls.bytes_in + add[0], "bytes_out": ls.bytes_out + add[1],
                    "refused": ls.refused})
    bks = []
    for bs, in_pool, up in backends:
        add = live_b.get(id(bs), [0, 0])
        ok = bs.total
        bks.append({"target": bs.target, "in_pool": in_pool, "up": up,
                    "connections_total": ok, "connections_active": bs.active,
                    "bytes_in": bs.bytes_in + add[0], "bytes_out": bs.bytes_out + add[1],
                    "connect_failures": bs.connect_failures,
                    "connect_latency_ms": {
                        "avg": round(bs.connect_seconds / ok * 1000, 3) if ok else None,
                        "max": round(bs.connect_seconds_max * 1000, 3) if ok else None}})
    return {
        **extra,
        "uptime_s": round(time.monotonic() - totals.started, 3),
        "totals": {"connections_total": totals.total, "connections_active": totals.active,
                   "bytes_in": totals.bytes_in + live_in, "bytes_out": totals.bytes_out + live_out,
                   "connect_failures": totals.connect_failures,
                   "no_backend": totals.no_backend,
                   "refused_max_conns": totals.refused_max_conns},
        "listeners": lis,
        "backends": bks,
    }


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(stats: dict[str, Any]) -> str:
    """Render a `snapshot` as Prometheus text exposition format 0.0.4."""
    out: list[str] = []

    def family(name: str, kind: str, helptext: str,
               samples: Iterable[tuple[str, float | int]]) -> None:
        out.append(f"# HELP {name} {helptext}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    t = stats["totals"]
    family("gearproxy_connections_total", "counter", "Connections relayed to a target.",
           [("", t["connections_total"])])
    family("gearproxy_connections_active", "gauge", "Connections open now.",
           [("", t["connections_active"])])
    family("gearproxy_bytes_total", "counter", "Bytes relayed (in: client to target).",
           [('{direction="in"}', t["bytes_in"]), ('{direction="out"}', t["bytes_out"])])
    family("gearproxy_refused_total", "counter", "Client connections closed unserved.",
           [('{reason="max_conns"}', t["refused_max_conns"]),
            ('{reason="no_backend"}', t["no_backend"])])
    lab = [(f'{{listen="{_esc(x["listen"])}",netns="{_esc(x["netns"] or "")}"}}', x)
           for x in stats["listeners"]]
    family("gearproxy_listener_connections_total", "counter", "Connections per listener.",
           [(k, x["connections_total"]) for k, x in lab])
    family("gearproxy_listener_connections_active", "gauge", "Open connections per listener.",
           [(k, x["connections_active"]) for k, x in lab])
    family("gearproxy_listener_bytes_total", "counter", "Bytes per listener.",
           [(k[:-1] + f',direction="{d}"}}', x[f"bytes_{d}"]) for k, x in lab
            for d in ("in", "out")])
    bab = [(f'{{target="{_esc(x["target"])}"}}', x) for x in stats["backends"]]
    family("gearproxy_backend_up", "gauge", "1 when the target is in the pool and not backed off.",
           [(k, int(x["up"] and x["in_pool"])) for k, x in bab])
    family("gearproxy_backend_connections_total", "counter", "Connections per target.",
           [(k, x["connections_total"]) for k, x in bab])
    family("gearproxy_backend_connections_active", "gauge", "Open connections per target.",
           [(k, x["connections_active"]) for k, x in bab])
    family("gearproxy_backend_bytes_total", "counter", "Bytes per target.",
           [(k[:-1] + f',direction="{d}"}}', x[f"bytes_{d}"]) for k, x in bab
            for d in ("in", "out")])
    family("gearproxy_backend_connect_failures_total", "counter", "Failed connects per target.",
           [(k, x["connect_failures"]) for k, x in bab])
    family("gearproxy_backend_connect_latency_avg_seconds", "gauge",
           "Mean connect latency per target.",
           [(k, (x["connect_latency_ms"]["avg"] or 0) / 1000) for k, x in bab])
    return "\n".join(out) + "\n"


async def serve_metrics_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               render: Any) -> None:
    """A tiny HTTP/1.0 responder: `GET /metrics` gets Prometheus text, anything else 404."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        parts = head.split(b" ", 2)
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
            body = render().encode()
            status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype
                     + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()

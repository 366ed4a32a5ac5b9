"""`gearproxy proxy`: parse options into a frozen ProxyConfig and run the proxy in the foreground.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for malformed options
(UsageError names the option), 1 for run-time failures (LinkError: address in
use, namespace missing or not permitted, control socket taken).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import click

from gearproxy.errors import UsageError
from gearproxy.proxy.config import (
    BALANCES,
    LOG_LEVELS,
    MODES,
    Balance,
    LogLevel,
    Mode,
    ProxyConfig,
    parse_address,
    parse_netns_listen,
)


def build_config(*, listen: tuple[str, ...], listen_netns: tuple[str, ...],
                 target: tuple[str, ...], balance: str, connect_timeout: float,
                 control: str | None, max_conns: int, idle_timeout: float,
                 drain_timeout: float, mode: str, metrics: str | None,
                 join_ns_of: int | None, log_level: str, busy_poll: int = 0) -> ProxyConfig:
    """Validate the raw option values; raises UsageError naming the option at fault."""
    return ProxyConfig(
        listen=tuple(parse_address(x, "--listen") for x in listen),
        listen_netns=tuple(parse_netns_listen(x) for x in listen_netns),
        targets=tuple(parse_address(x, "--target", allow_port_zero=False) for x in target),
        balance=cast(Balance, balance),
        connect_timeout=connect_timeout,
        control=Path(control) if control else None,
        max_conns=max_conns,
        idle_timeout=idle_timeout,
        drain_timeout=drain_timeout,
        mode=cast(Mode, mode),
        metrics=parse_address(metrics, "--metrics") if metrics else None,
        join_ns_of=join_ns_of,
        log_level=cast(LogLevel, log_level),
        busy_poll=busy_poll / 1e6,
    )


@click.command("proxy")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Listen on the host (repeatable; IPv6 as [::1]:PORT).")
@click.option("--listen-netns", multiple=True, metavar="NSPATH=HOST:PORT",
              help="Listen inside the network namespace at NSPATH, e.g. /proc/PID/ns/net.")
@click.option("--target", multiple=True, metavar="HOST:PORT",
              help="A backend of the pool (repeatable). May be empty and set over --control.")
@click.option("--balance", type=click.Choice(BALANCES), default="roundrobin", show_default=True)
@click.option("--connect-timeout", type=float, default=3.0, show_default=True, metavar="SECS",
              help="Per-backend connect timeout; the next backend is tried after it.")
@click.option("--control", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Unix socket (0600) for NDJSON control: set_targets, add/remove_listener, "
                   "stats, ping. Opened last: it answering means ready.")
@click.option("--max-conns", type=int, default=0, show_default=True, metavar="N",
              help="Close accepted connections beyond N open ones (0 = no limit but "
                   "the open-files limit, which is raised to its hard maximum).")
@click.option("--idle-timeout", type=float, default=0.0, show_default=True, metavar="SECS",
              help="Close connections that move no byte for SECS (0 = never).")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True, metavar="SECS",
              help="On SIGTERM, let open connections finish for up to SECS.")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="Forwarding engine: splice (zero-copy), copy (Protocols), auto = splice "
                   "when the kernel supports it.")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus text on GET /metrics.")
@click.option("--join-ns-of", type=int, default=None, metavar="PID",
              help="Rootless: after binding host listeners, join PID's user and network "
                   "namespaces (before any thread starts).")
@click.option("--busy-poll", type=int, default=0, show_default=True, metavar="USEC",
              help="After each read, keep polling without sleeping for USEC: lower latency "
                   "(no wake-up per message) for a CPU kept busy while traffic flows. "
                   "Needs a CPU to spare; 0 = off.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def proxy_command(listen: tuple[str, ...], listen_netns: tuple[str, ...], target: tuple[str, ...],
                  balance: str, connect_timeout: float, control: str | None, max_conns: int,
                  idle_timeout: float, drain_timeout: float, mode: str, metrics: str | None,
                  join_ns_of: int | None, busy_poll: int, log_level: str) -> None:
    """Run one link proxy in the foreground: listeners -> target pool."""
    config = build_config(listen=listen, listen_netns=listen_netns, target=target,
                          balance=balance, connect_timeout=connect_timeout, control=control,
                          max_conns=max_conns, idle_timeout=idle_timeout,
                          drain_timeout=drain_timeout, mode=mode, metrics=metrics,
                          join_ns_of=join_ns_of, log_level=log_level, busy_poll=busy_poll)
    from gearproxy import log
    from gearproxy.proxy.server import run

    log.configure(config.log_level)
    code = run(config)
    if code:
        raise click.exceptions.Exit(code)


__all__ = ["UsageError", "build_config", "proxy_command"]

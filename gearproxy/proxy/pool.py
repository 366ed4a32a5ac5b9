"""The target pool: which backend a new connection tries, in what order, and back-off.

A backend that refuses or times out is marked down for a period that doubles
with each consecutive failure (`backoff_base` .. `backoff_max`) and is not
offered until the period ends; one success clears it.  When every backend is
down the pool offers nothing and the client is closed at once: a prompt close
is kinder to a client than a connect timeout per dead target.

Replacing the pool (`set_targets`) never touches live connections: they hold
their own socket and counters.  Counters of a target are kept by address for
the process' life, so a target that leaves and comes back keeps its history;
its back-off state is cleared, since the orchestrator just declared it live.
"""

from __future__ import annotations

import time

from gearproxy.proxy.config import Address, Balance
from gearproxy.proxy.metrics import BackendStats


class Backend:
    """One target address with its counters and back-off state."""

    __slots__ = ("address", "down_until", "failures", "family", "label", "sockaddr", "stats")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.family = address.family
        self.sockaddr = address.sockaddr
        self.label = str(address)
        self.stats = BackendStats(self.label)
        self.failures = 0
        self.down_until = 0.0

    def is_up(self, now: float) -> bool:
        return self.down_until <= now


class Pool:
    """The current targets and the balancing rule."""

    def __init__(self, targets: tuple[Address, ...], balance: Balance, *,
                 backoff_base: float = 0.5, backoff_max: float = 15.0) -> None:
        self.balance = balance
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.known: dict[str, Backend] = {}
        self.members: list[Backend] = []
        self._next = 0
        self.set_targets(targets)

    def set_targets(self, targets: tuple[Address, ...]) -> None:
        """Replace the pool; repeated addresses count once."""
        members: list[Backend] = []
        seen: set[str] = set()
        for addr in targets:
            label = str(addr)
            if label in seen:
                continue
            seen.add(label)
            backend = self.known.get(label)
            if backend is None:
                backend = self.known[label] = Backend(addr)
            backend.failures = 0
            backend.down_until = 0.0
            members.append(backend)
        self.members = members
        self._next = 0

    def candidates(self, now: float | None = None) -> list[Backend]:
        """Backends to try, in order, for one new connection (empty: all down or no pool)."""
        members = self.members
        if not members:
            return []
        if now is None:
            now = time.monotonic()
        up = [b for b in members if b.down_until <= now]
        if len(up) <= 1:
            return up
        if self.balance == "roundrobin":
            start = self._next % len(up)
            self._next += 1
            return up[start:] + up[:start]
        if self.balance == "leastconn":
            return sorted(up, key=lambda b: b.stats.active)   # stable: ties keep pool order
        return up

    def failed(self, backend: Backend, now: float | None = None) -> None:
        """Count a failed connect and back the backend off."""
        backend.stats.connect_failures += 1
        backend.failures += 1
        period = min(self.backoff_base * (2 ** min(backend.failures - 1, 30)), self.backoff_max)
        backend.down_until = (time.monotonic() if now is None else now) + period

    def succeeded(self, backend: Backend, seconds: float) -> None:
        """Count a connect that worked, with its latency; clears back-off."""
        backend.failures = 0
        backend.down_until = 0.0
        st = backend.stats
        st.total += 1
        st.active += 1
        st.connect_seconds += seconds
        st.connect_seconds_max = max(st.connect_seconds_max, seconds)

    def describe(self, now: float | None = None) -> list[tuple[BackendStats, bool, bool]]:
        """(stats, in pool, up) for every backend ever known, pool members first."""
        t = time.monotonic() if now is None else now
        members = {id(b) for b in self.members}
        ordered = self.members + [b for b in self.known.values() if id(b) not in members]
        return [(b.stats, id(b) in members, b.is_up(t)) for b in ordered]

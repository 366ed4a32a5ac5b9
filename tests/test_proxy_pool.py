"""The target pool and address parsing: pure logic, no sockets."""

from __future__ import annotations

import pytest

from gearproxy.errors import UsageError
from gearproxy.proxy.config import Address, parse_address, parse_netns_listen
from gearproxy.proxy.metrics import prometheus
from gearproxy.proxy.pool import Pool


def addrs(*ports: int) -> tuple[Address, ...]:
    return tuple(Address("10.0.0.1", p) for p in ports)


def labels(pool: Pool, now: float = 0.0) -> list[int]:
    return [b.address.port for b in pool.candidates(now)]


def test_roundrobin_rotates_the_start() -> None:
    """roundrobin offers every backend, starting one further each time."""
    pool = Pool(addrs(1, 2, 3), "roundrobin")
    assert [labels(pool) for _ in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]


def test_first_keeps_pool_order() -> None:
    """first always offers the pool in its given order."""
    pool = Pool(addrs(1, 2), "first")
    assert labels(pool) == labels(pool) == [1, 2]


def test_leastconn_prefers_fewest_active() -> None:
    """leastconn orders by active connections, ties in pool order."""
    pool = Pool(addrs(1, 2, 3), "leastconn")
    pool.members[0].stats.active = 5
    pool.members[2].stats.active = 1
    assert labels(pool) == [2, 3, 1]


def test_failure_backs_off_exponentially_and_success_clears() -> None:
    """A failed backend is skipped for base*2^(n-1) seconds (capped); a success clears it."""
    pool = Pool(addrs(1, 2), "first", backoff_base=1.0, backoff_max=3.0)
    b1 = pool.members[0]
    pool.failed(b1, now=100.0)
    assert labels(pool, 100.5) == [2] and labels(pool, 101.0) == [1, 2]
    pool.failed(b1, now=101.0)
    assert labels(pool, 102.9) == [2] and labels(pool, 103.0) == [1, 2]
    pool.failed(b1, now=103.0)                  # 4 s capped to 3 s
    assert labels(pool, 106.0) == [1, 2]
    assert b1.stats.connect_failures == 3
    pool.succeeded(b1, 0.001)
    assert b1.failures == 0 and labels(pool, 0.0) == [1, 2]


def test_all_down_offers_nothing() -> None:
    """When every backend is backed off the pool is empty (client closed at once)."""
    pool = Pool(addrs(1), "roundrobin")
    pool.failed(pool.members[0], now=10.0)
    assert pool.candidates(10.1) == []
    assert Pool((), "first").candidates() == []


def test_set_targets_keeps_counters_and_clears_backoff() -> None:
    """Replacing the pool keeps each address' counters, clears its back-off, dedups."""
    pool = Pool(addrs(1, 2), "first")
    b1 = pool.members[0]
    pool.failed(b1, now=0.0)
    pool.set_targets(addrs(1, 1, 3))
    assert [b.address.port for b in pool.members] == [1, 3]
    assert pool.members[0] is b1 and b1.stats.connect_failures == 1 and b1.down_until == 0
    described = {s.target: (in_pool, up) for s, in_pool, up in pool.describe(0.0)}
    assert described == {"10.0.0.1:1": (True, True), "10.0.0.1:3": (True, True),
                         "10.0.0.1:2": (False, True)}


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:80", "127.0.0.1:80"),
    ("localhost:0", "127.0.0.1:0"),
    ("[::1]:5000", "[::1]:5000"),
    ("[0:0::1]:1", "[::1]:1"),
    ("0.0.0.0:4000", "0.0.0.0:4000"),
])
def test_parse_address_accepts_ip_literals(text: str, want: str) -> None:
    """HOST:PORT with IPv4, bracketed IPv6 or localhost parses to a canonical form."""
    assert str(parse_address(text, "--listen")) == want


@pytest.mark.parametrize("text", ["80", ":80", "host:80", "1.2.3.4:", "1.2.3.4:x", "[::1]80",
                                  "::1:80", "1.2.3.4:70000", "[zz]:1"])
def test_parse_address_rejects_malformed(text: str) -> None:
    """Malformed addresses raise UsageError naming the option."""
    with pytest.raises(UsageError, match=r"^--target: "):
        parse_address(text, "--target")


def test_parse_netns_listen_splits_at_last_equals() -> None:
    """NSPATH=HOST:PORT splits into the path and the address."""
    item = parse_netns_listen("/run/netns/a=b=127.0.0.1:27017")
    assert item.netns == "/run/netns/a=b" and str(item.address) == "127.0.0.1:27017"
    with pytest.raises(UsageError, match="--listen-netns"):
        parse_netns_listen("/proc/1/ns/net")


def test_prometheus_text_has_help_type_and_escaped_labels() -> None:
    """Prometheus rendering emits HELP/TYPE lines and escapes label values."""
    stats = {"totals": {"connections_total": 1, "connections_active": 0, "bytes_in": 2,
                        "bytes_out": 3, "connect_failures": 0, "no_backend": 0,
                        "refused_max_conns": 0},
             "listeners": [{"listen": "127.0.0.1:1", "netns": '/x"y', "connections_total": 1,
                            "connections_active": 0, "bytes_in": 2, "bytes_out": 3}],
             "backends": []}
    text = prometheus(stats)
    assert "# TYPE gearproxy_connections_total counter" in text
    assert 'netns="/x\\"y",direction="out"} 3' in text


def test_raise_nofile_lifts_soft_limit_to_hard() -> None:
    """The proxy raises its soft open-files limit to the hard limit at start-up."""
    import resource

    from gearproxy.proxy.server import raise_nofile

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("hard limit is unlimited or tiny")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_nofile() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

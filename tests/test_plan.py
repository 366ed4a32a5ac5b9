"""The planner: instances, placement, host ports, link endpoints and the diff (pure, no Docker)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gearproxy.errors import DescriptorError, StoreError, UsageError
from gearproxy.plan import (
    LIFECYCLE,
    PORT_RANGE_END,
    PORT_RANGE_START,
    CurrentInstance,
    CurrentState,
    Plan,
    PortMapping,
    config_hash,
    plan,
)
from gearproxy.planview import describe, to_json
from gearproxy.spec import (
    Container,
    Deployment,
    Healthcheck,
    InstancePort,
    InstanceRecord,
    Link,
    PortPair,
)


def rockmongo(mongo_count: int = 1) -> Deployment:
    """The issue's example: rockmongo (80 -> 6060) linking to mongodb (27017, allocated)."""
    return Deployment(
        (
            Container(
                "rockmongo",
                "derekwaynecarr/rockmongo",
                1,
                (PortPair(80, 6060),),
                (Link("mongodb"),),
            ),
            Container("mongodb", "ccoleman/ubuntu-mongodb", mongo_count, (PortPair(27017),)),
        )
    )


def web_db(db_count: int = 1, web_count: int = 1, **link: object) -> Deployment:
    """web (8080) links to db (27017) with the given Link options."""
    return Deployment(
        (
            Container("web", "web:1", web_count, (PortPair(8080),), (Link("db", **link),)),  # type: ignore[arg-type]
            Container("db", "db:1", db_count, (PortPair(27017),)),
        )
    )


def listens(p: Plan, source: str) -> list[tuple[str, int]]:
    return [(e.listen_host, e.listen_port) for e in p.instance(source).links]


# -- the example ---------------------------------------------------------------------------


def test_rockmongo_example_ports_links_and_lines() -> None:
    """rockmongo 80 -> 6060, mongodb 27017 -> 4000, link 127.0.0.1:27017 -> localhost:4000."""
    p = plan(rockmongo(), name="rockmongo_mongodb")
    assert p.instance("rockmongo-1").ports == (PortMapping(80, 6060, explicit=True),)
    mongo_port = p.instance("mongodb-1").port(27017)
    assert PORT_RANGE_START <= mongo_port <= PORT_RANGE_END
    assert mongo_port == 4000  # lowest free with nothing taken
    (link,) = p.links
    assert (link.source, link.listen_host, link.listen_port) == ("rockmongo-1", "127.0.0.1", 27017)
    assert (link.target, link.target_host, link.target_host_port) == ("mongodb-1", "local", 4000)
    lines = describe(p)
    assert "local PortMapping: 80 -> 6060" in lines
    assert "local PortMapping: 27017 -> 4000" in lines
    assert "linking rockmongo: 127.0.0.1:27017 -> localhost:4000" in lines
    assert "local Container rockmongo-1 will be created" in lines
    assert p.create == ("mongodb-1", "rockmongo-1")
    assert p.name == "rockmongo_mongodb"


def test_start_order_puts_link_targets_before_sources() -> None:
    """mongodb (the target) is listed and created before rockmongo (its consumer)."""
    p = plan(rockmongo(), name="x")
    assert [i.id for i in p.instances] == ["mongodb-1", "rockmongo-1"]


def test_mutual_links_are_allowed_and_ordered_by_descriptor() -> None:
    """A link cycle is broken deterministically: the first container in the file starts first."""
    d = Deployment(
        (
            Container("a", "a", 1, (PortPair(1000),), (Link("b"),)),
            Container("b", "b", 1, (PortPair(2000),), (Link("a"),)),
            Container("c", "c", 1, (), (Link("b"),)),
        )
    )
    p = plan(d, name="x")
    assert [i.id for i in p.instances] == ["a-1", "b-1", "c-1"]
    assert listens(p, "a-1") == [("127.0.0.1", 2000)]
    assert listens(p, "b-1") == [("127.0.0.1", 1000)]


def test_id_prefix_is_prepended_to_instance_ids() -> None:
    """Instance ids are IdPrefix + Name + "-" + n."""
    p = plan(replace(rockmongo(2), id_prefix="prod-"), name="x")
    assert [i.id for i in p.instances] == ["prod-mongodb-1", "prod-mongodb-2", "prod-rockmongo-1"]


# -- link endpoints ------------------------------------------------------------------------


def test_count_three_fans_out_over_consecutive_ports() -> None:
    """Three target instances are reached at 127.0.0.1:27017, :27018, :27019, one per host port."""
    p = plan(web_db(db_count=3), name="x")
    assert listens(p, "web-1") == [("127.0.0.1", 27017), ("127.0.0.1", 27018), ("127.0.0.1", 27019)]
    targets = [(e.target, e.target_host_port) for e in p.instance("web-1").links]
    assert targets == [(f"db-{n}", p.instance(f"db-{n}").port(27017)) for n in (1, 2, 3)]


def test_every_source_instance_gets_every_target_instance() -> None:
    """Links resolve per source instance x target instance x target port, same addresses each."""
    p = plan(web_db(db_count=2, web_count=2), name="x")
    assert (
        listens(p, "web-1") == listens(p, "web-2") == [("127.0.0.1", 27017), ("127.0.0.1", 27018)]
    )
    assert len(p.links) == 4


def test_fan_out_skips_the_sources_own_public_ports() -> None:
    """The next free port is not one the source itself publishes."""
    d = Deployment(
        (
            Container("web", "w", 1, (PortPair(27018),), (Link("db"),)),
            Container("db", "d", 3, (PortPair(27017),)),
        )
    )
    assert listens(plan(d, name="x"), "web-1") == [
        ("127.0.0.1", 27017),
        ("127.0.0.1", 27019),
        ("127.0.0.1", 27020),
    ]


def test_first_instances_keep_natural_ports_before_fan_out() -> None:
    """A fan-out never pushes another link's first instance off its natural port."""
    d = Deployment(
        (
            Container("web", "w", 1, (), (Link("db"), Link("cache"))),
            Container("db", "d", 2, (PortPair(6000),)),
            Container("cache", "c", 1, (PortPair(6001),)),
        )
    )
    p = plan(d, name="x")
    assert [(e.target, e.listen_port) for e in p.instance("web-1").links] == [
        ("db-1", 6000),
        ("db-2", 6002),
        ("cache-1", 6001),
    ]


def test_link_ports_limit_the_linked_ports() -> None:
    """`Ports` picks which target ports are linked; empty means all of them."""
    d = Deployment(
        (
            Container("web", "w", 1, (), (Link("db", ports=(28017,)),)),
            Container("db", "d", 1, (PortPair(27017), PortPair(28017))),
        )
    )
    assert listens(plan(d, name="x"), "web-1") == [("127.0.0.1", 28017)]


def test_alias_ports_override_the_listen_port() -> None:
    """AliasPorts {27017 -> 5000}: the source sees db at 127.0.0.1:5000 (then 5001, ...)."""
    p = plan(web_db(db_count=2, alias_ports=(PortPair(27017, 5000),)), name="x")
    assert listens(p, "web-1") == [("127.0.0.1", 5000), ("127.0.0.1", 5001)]
    assert [e.target_internal for e in p.links] == [27017, 27017]


def test_alias_port_taken_by_another_link_is_a_descriptor_error() -> None:
    """Two links pinned to one address inside the source cannot both be served."""
    d = Deployment(
        (
            Container(
                "web", "w", 1, (), (Link("db"), Link("cache", alias_ports=(PortPair(6379, 27017),)))
            ),
            Container("db", "d", 1, (PortPair(27017),)),
            Container("cache", "c", 1, (PortPair(6379),)),
        )
    )
    with pytest.raises(DescriptorError, match=r"containers\[0\]\.links\[1\]"):
        plan(d, name="x")


def test_match_port_spreads_instances_over_loopback_addresses() -> None:
    """MatchPort keeps 27017 and uses 127.0.0.1, .2, .3 for the three instances."""
    p = plan(web_db(db_count=3, match_port=True), name="x")
    assert listens(p, "web-1") == [("127.0.0.1", 27017), ("127.0.0.2", 27017), ("127.0.0.3", 27017)]


def test_match_port_on_a_port_the_source_publishes_is_a_descriptor_error() -> None:
    """A MatchPort link cannot listen on a port its own container serves."""
    d = Deployment(
        (
            Container("web", "w", 1, (PortPair(27017),), (Link("db", match_port=True),)),
            Container("db", "d", 2, (PortPair(27017),)),
        )
    )
    with pytest.raises(DescriptorError, match="publishes port 27017 itself"):
        plan(d, name="x")


def test_link_to_unknown_container_or_unpublished_port_is_a_descriptor_error() -> None:
    """The planner names the link field when a link cannot resolve."""
    with pytest.raises(DescriptorError, match=r"containers\[0\]\.links\[0\]\.to"):
        plan(Deployment((Container("web", "w", 1, (), (Link("nope"),)),)), name="x")
    with pytest.raises(DescriptorError, match=r"does not publish port 1234"):
        plan(web_db(ports=(1234,)), name="x")


def test_link_to_a_container_scaled_to_zero_has_no_endpoints() -> None:
    """Count 0 on the target: no instances, so nothing to link to."""
    p = plan(web_db(db_count=0), name="x")
    assert p.links == ()
    assert [i.id for i in p.instances] == ["web-1"]


# -- host ports ----------------------------------------------------------------------------


def test_taken_ports_are_skipped() -> None:
    """Allocation takes the lowest port not in taken[host]."""
    p = plan(rockmongo(), name="x", taken={"local": frozenset({4000, 4001, 4003})})
    assert p.instance("mongodb-1").port(27017) == 4002


def test_explicit_port_is_honoured_even_if_taken() -> None:
    """An explicit External is the user's; the store, not the planner, names its holder."""
    p = plan(rockmongo(), name="x", taken={"local": frozenset({6060})})
    assert p.instance("rockmongo-1").port(80) == 6060


def test_allocation_avoids_explicit_ports_of_the_same_plan() -> None:
    """An allocated port never lands on a port another instance asked for explicitly."""
    d = Deployment(
        (
            Container("a", "a", 1, (PortPair(80),)),
            Container("b", "b", 1, (PortPair(80, 4000),)),
        )
    )
    p = plan(d, name="x")
    assert p.instance("a-1").port(80) == 4001


def test_explicit_port_with_count_two_on_one_host_is_a_descriptor_error() -> None:
    """Two instances cannot share one host port on one host."""
    d = Deployment((Container("web", "w", 2, (PortPair(80, 8080),)),))
    with pytest.raises(DescriptorError, match=r"containers\[0\]\.publicports\[0\]\.external"):
        plan(d, name="x")


def test_explicit_port_with_count_two_on_two_hosts_is_fine() -> None:
    """Round-robin puts the two instances on different hosts, each with port 8080."""
    d = Deployment((Container("web", "w", 2, (PortPair(80, 8080),)),))
    p = plan(d, hosts=("h1", "h2"), name="x")
    assert [(i.host, i.port(80)) for i in p.instances] == [("h1", 8080), ("h2", 8080)]


def test_exhausted_port_range_is_a_store_error() -> None:
    """No free port in 4000..59999 on the host: a clear error, not a loop."""
    full = frozenset(range(PORT_RANGE_START, PORT_RANGE_END + 1))
    with pytest.raises(StoreError, match="no free host port"):
        plan(rockmongo(), name="x", taken={"local": full})


def test_ports_are_allocated_per_host() -> None:
    """Two hosts each start at 4000."""
    d = Deployment((Container("db", "d", 2, (PortPair(27017),)),))
    p = plan(d, hosts=("h1", "h2"), name="x")
    assert [(i.host, i.port(27017)) for i in p.instances] == [("h1", 4000), ("h2", 4000)]


def test_placement_is_round_robin_and_no_host_is_a_usage_error() -> None:
    """New instances go round-robin over hosts; with no hosts there is nowhere to go."""
    d = Deployment((Container("a", "a", 3), Container("b", "b", 1)))
    p = plan(d, hosts=("h1", "h2"), name="x")
    assert [i.host for i in p.instances] == ["h1", "h2", "h1", "h2"]
    with pytest.raises(UsageError):
        plan(d, hosts=(), name="x")


# -- diff against the current state --------------------------------------------------------


def test_redeploying_the_same_descriptor_is_an_empty_plan() -> None:
    """The same descriptor against the state it produced changes nothing."""
    d = rockmongo(3)
    first = plan(d, name="x")
    again = plan(d, first.as_current(), name="x")
    assert again.is_empty
    assert (again.create, again.recreate, again.remove) == ((), (), ())
    assert again.keep == first.create
    assert again.port_claims() == first.port_claims()
    assert again.links == first.links
    assert again.new_ports() == ()
    assert "local Container mongodb-1 is unchanged" in describe(again)


def test_changed_image_recreates_only_that_containers_instances() -> None:
    """A new mongodb image recreates mongodb-1..2, keeps rockmongo-1, and no port moves."""
    first = plan(rockmongo(2), name="x")
    d2 = rockmongo(2)
    d2 = replace(d2, containers=(d2.containers[0], replace(d2.containers[1], image="mongo:7")))
    second = plan(d2, first.as_current(), name="x")
    assert second.recreate == ("mongodb-1", "mongodb-2")
    assert second.keep == ("rockmongo-1",)
    assert second.create == () and second.remove == ()
    assert second.port_claims() == first.port_claims()
    assert second.links == first.links
    assert "local Container mongodb-1 will be recreated" in describe(second)


def test_scale_up_after_a_gap_fills_the_lowest_free_number() -> None:
    """Instances 1 and 3 exist: scaling to 3 creates 2; 1 and 3 keep their ports."""
    first = plan(web_db(db_count=3), name="x")
    gap = CurrentState(tuple(c for c in first.as_current().instances if c.id != "db-2"))
    p = plan(web_db(db_count=3), gap, name="x")
    assert p.create == ("db-2",)
    assert set(p.keep) == {"db-1", "db-3", "web-1"}
    for n in (1, 3):
        assert p.instance(f"db-{n}").ports == first.instance(f"db-{n}").ports
    assert len({i.port(27017) for i in p.instances if i.container == "db"}) == 3
    assert p.new_ports() == (("local", p.instance("db-2").port(27017)),)


def test_scale_down_removes_the_highest_numbers() -> None:
    """From 3 to 1: db-3 and db-2 are removed, db-1 kept with its port."""
    first = plan(web_db(db_count=3), name="x")
    p = plan(web_db(db_count=1), first.as_current(), name="x")
    assert [c.id for c in p.remove] == ["db-2", "db-3"]
    assert p.keep == ("db-1", "web-1")
    assert p.instance("db-1").ports == first.instance("db-1").ports
    assert "local Container db-3 will be removed" in describe(p)


def test_ports_of_removed_instances_are_not_reused_in_the_same_plan() -> None:
    """A new instance never takes a port an instance removed by the same plan still holds."""
    first = plan(Deployment((Container("a", "a", 1, (PortPair(80),)),)), name="x")
    d = Deployment((Container("b", "b", 1, (PortPair(80),)),))
    p = plan(d, first.as_current(), name="x")
    assert [c.id for c in p.remove] == ["a-1"]
    assert p.instance("b-1").port(80) == 4001


def test_container_dropped_from_descriptor_or_foreign_ids_are_removed() -> None:
    """Current instances with no container, or an id not of the form prefix+name-n, go."""
    cur = CurrentState(
        (
            CurrentInstance("old-1", "old", "local", "h", (PortMapping(1, 4100),)),
            CurrentInstance("mongodb-x", "mongodb", "local", "h", ()),
        )
    )
    p = plan(rockmongo(), cur, name="x")
    assert sorted(c.id for c in p.remove) == ["mongodb-x", "old-1"]
    assert p.create == ("mongodb-1", "rockmongo-1")


def test_kept_instances_keep_their_host_and_ports_even_if_now_taken() -> None:
    """Ports the current state holds are ours: `taken` does not move them."""
    first = plan(rockmongo(), name="x")
    p = plan(
        rockmongo(),
        first.as_current(),
        hosts=("elsewhere",),
        name="x",
        taken={"local": frozenset({4000})},
    )
    assert p.is_empty
    assert p.instance("mongodb-1").host == "local"


def test_new_public_port_on_a_kept_instance_repoints_without_recreate() -> None:
    """Ports are served by proxies: a new public port keeps the container but is not empty."""
    first = plan(rockmongo(), name="x")
    d = rockmongo()
    d = replace(
        d,
        containers=(
            d.containers[0],
            replace(d.containers[1], public_ports=(PortPair(27017), PortPair(28017))),
        ),
    )
    p = plan(d, first.as_current(), name="x")
    assert p.keep == ("mongodb-1", "rockmongo-1")
    assert p.repoint == ("mongodb-1",)
    assert not p.is_empty
    assert p.instance("mongodb-1").port(27017) == 4000
    assert p.new_ports() == (("local", 4001),)
    assert "local Container mongodb-1 is unchanged, its host ports change" in describe(p)


def test_changed_explicit_port_clashing_with_a_kept_port_is_a_descriptor_error() -> None:
    """A newly explicit External equal to another kept instance's port cannot be honoured."""
    first = plan(rockmongo(), name="x")
    d = rockmongo()
    d = replace(
        d,
        containers=(replace(d.containers[0], public_ports=(PortPair(80, 4000),)), d.containers[1]),
    )
    with pytest.raises(DescriptorError, match="needed by both mongodb-1 and rockmongo-1"):
        plan(d, first.as_current(), name="x")


def test_config_hash_covers_image_environment_command_healthcheck_only() -> None:
    """What Docker bakes into a container changes the hash; ports, links, count do not."""
    base = Container("a", "img", 1, environment=(("A", "1"), ("B", "2")))
    h = config_hash(base)
    assert len(h) == 64
    assert config_hash(replace(base, environment=(("B", "2"), ("A", "1")))) == h
    assert (
        config_hash(
            replace(base, count=5, public_ports=(PortPair(80),), links=(Link("b"),), restart="no")
        )
        == h
    )
    for changed in (
        replace(base, image="img2"),
        replace(base, environment=(("A", "2"),)),
        replace(base, command=("sh",)),
        replace(base, healthcheck=Healthcheck(("CMD", "true"))),
    ):
        assert config_hash(changed) != h


def test_lifecycle_table_matches_the_documented_transitions() -> None:
    """(in current, in desired, hash equal) -> action, as in the module docstring."""
    assert LIFECYCLE == {
        (False, True, False): "create",
        (True, True, True): "keep",
        (True, True, False): "recreate",
        (True, False, False): "remove",
    }


# -- a saved state file as input -----------------------------------------------------------


def test_state_file_instances_keep_their_recorded_ports_and_hosts() -> None:
    """With no current state, recorded Instances give back the same ids, hosts and ports."""
    d = replace(
        rockmongo(2),
        instances=(
            InstanceRecord(
                "mongodb-1",
                "ccoleman/ubuntu-mongodb",
                "mongodb",
                "local",
                (InstancePort(27017, 4711),),
            ),
            InstanceRecord(
                "mongodb-2",
                "ccoleman/ubuntu-mongodb",
                "mongodb",
                "local",
                (InstancePort(27017, 4712),),
            ),
            InstanceRecord("gone-1", "x", "gone", "local", (InstancePort(1, 4713),)),
        ),
    )
    p = plan(d, name="x")
    assert p.instance("mongodb-1").port(27017) == 4711
    assert p.instance("mongodb-2").port(27017) == 4712
    assert p.remove == ()  # records are not running containers
    assert p.create == ("mongodb-1", "mongodb-2", "rockmongo-1")


def test_state_file_port_now_taken_is_reallocated() -> None:
    """A recorded port someone else holds now is replaced by a free one."""
    d = replace(
        rockmongo(),
        instances=(
            InstanceRecord("mongodb-1", "i", "mongodb", "local", (InstancePort(27017, 4711),)),
        ),
    )
    p = plan(d, name="x", taken={"local": frozenset({4711})})
    assert p.instance("mongodb-1").port(27017) == 4000


# -- rendering -----------------------------------------------------------------------------


def test_to_json_is_one_serialisable_document_with_actions_ports_links() -> None:
    """`--json` output: instances with action, ports and links, plus removals."""
    first = plan(rockmongo(2), name="x")
    doc = to_json(plan(rockmongo(1), first.as_current(), name="x"))
    json.dumps(doc)
    assert doc["empty"] is False
    assert [r["id"] for r in doc["remove"]] == ["mongodb-2"]
    rock = next(i for i in doc["instances"] if i["id"] == "rockmongo-1")
    assert rock["action"] == "keep"
    assert rock["ports"] == [{"internal": 80, "external": 6060, "explicit": True}]
    assert rock["links"][0] == {
        "source": "rockmongo-1",
        "listen_host": "127.0.0.1",
        "listen_port": 27017,
        "target": "mongodb-1",
        "target_container": "mongodb",
        "target_internal": 27017,
        "target_host": "local",
        "target_host_port": 4000,
    }


# -- properties ----------------------------------------------------------------------------

INTERNAL = (80, 443, 5432, 6379, 27017)


@st.composite
def deployments(draw: st.DrawFn) -> Deployment:
    """Valid descriptors: up to 4 containers, links to other containers, some explicit ports."""
    n = draw(st.integers(1, 4))
    ports = [
        tuple(draw(st.lists(st.sampled_from(INTERNAL), max_size=3, unique=True))) for _ in range(n)
    ]
    counts = [draw(st.integers(0, 3)) for _ in range(n)]
    containers = []
    for i in range(n):
        explicit = counts[i] <= 1 and ports[i] and draw(st.booleans())
        pps = tuple(
            PortPair(p, 6000 + 10 * i + k if explicit and k == 0 else 0)
            for k, p in enumerate(ports[i])
        )
        links = []
        for j in draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True)):
            if j == i or not ports[j]:
                continue
            match = draw(st.booleans()) and not set(ports[j]) & set(ports[i])
            links.append(Link(f"c{j}", match_port=match))
        containers.append(
            Container(f"c{i}", draw(st.sampled_from(["x", "y"])), counts[i], pps, tuple(links))
        )
    return Deployment(tuple(containers), id_prefix=draw(st.sampled_from(["", "p-"])))


hosts_st = st.lists(st.sampled_from(["local", "h2", "h3"]), min_size=1, max_size=3, unique=True)
taken_st = st.frozensets(st.integers(PORT_RANGE_START, PORT_RANGE_START + 12), max_size=8)


def assert_consistent(p: Plan) -> None:
    ids = [i.id for i in p.instances]
    assert len(ids) == len(set(ids))
    claims = [(c.host, c.port) for c in p.port_claims()]
    assert len(claims) == len(set(claims)), "a host port is used twice on one host"
    for i in p.instances:
        own = {m.internal for m in i.ports}
        addrs = [(e.listen_host, e.listen_port) for e in i.links]
        assert len(addrs) == len(set(addrs)), "two links listen on one address"
        assert not {port for _, port in addrs} & own
        for e in i.links:
            assert p.instance(e.target).port(e.target_internal) == e.target_host_port


@settings(max_examples=150, deadline=None)
@given(deployments(), hosts_st, taken_st)
def test_property_plans_are_consistent_deterministic_and_idempotent(
    d: Deployment, hosts: list[str], taken: frozenset[int]
) -> None:
    """Unique ids, no host port twice per host, same plan twice, replanning its result is empty."""
    taken_map = {h: taken for h in hosts}
    p = plan(d, hosts=hosts, name="x", taken=taken_map)
    assert_consistent(p)
    assert plan(d, hosts=hosts, name="x", taken=taken_map) == p
    for c in p.port_claims():
        assert c.explicit or c.port not in taken_map[c.host]
    again = plan(d, p.as_current(), hosts=hosts, name="x", taken=taken_map)
    assert again.is_empty
    assert again.port_claims() == p.port_claims()


@settings(max_examples=100, deadline=None)
@given(deployments(), st.data())
def test_property_rescaling_never_moves_a_kept_port(d: Deployment, data: st.DataObject) -> None:
    """Changing counts keeps every surviving instance's host and host ports."""
    first = plan(d, name="x")

    def new_count(c: Container) -> int:
        explicit = any(pp.external for pp in c.public_ports)
        return data.draw(st.integers(0, 1 if explicit else 4))

    rescaled = replace(d, containers=tuple(replace(c, count=new_count(c)) for c in d.containers))
    p = plan(rescaled, first.as_current(), name="x")
    assert_consistent(p)
    for i in p.instances:
        if i.action != "create":
            assert i.ports == first.instance(i.id).ports
            assert i.host == first.instance(i.id).host


def test_start_levels_put_link_targets_in_earlier_waves_and_break_cycles_by_order() -> None:
    """Targets start in a wave before their consumers; independent instances share a wave;
    mutual links do not deadlock (the later one in start order does not hold back)."""
    from gearproxy.plan import start_levels

    waves = start_levels(plan(rockmongo(3), name="x"))
    assert [[i.id for i in w] for w in waves] == [
        ["mongodb-1", "mongodb-2", "mongodb-3"], ["rockmongo-1"]]
    mutual = Deployment((
        Container("a", "img", 1, (PortPair(1),), (Link("b"),)),
        Container("b", "img", 1, (PortPair(2),), (Link("a"),)),
        Container("c", "img", 2, (PortPair(3),)),
    ))
    p = plan(mutual, name="m")
    waves = start_levels(p)
    assert sorted(i.id for w in waves for i in w) == sorted(i.id for i in p.instances)
    assert len(waves) == 2 and {i.id for i in waves[0]} >= {"c-1", "c-2"}
    assert start_levels(plan(Deployment(()), name="e")) == []

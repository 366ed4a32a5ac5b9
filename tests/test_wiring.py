"""Which proxies a deployment needs: derived from the plan and the running containers."""

from __future__ import annotations

from pathlib import Path

from gearproxy.orchestrator.wiring import Running, proxy_specs
from gearproxy.plan import plan
from gearproxy.spec import Container, Deployment, Link, PortPair


def _example(count: int = 1) -> Deployment:
    return Deployment(containers=(
        Container(name="web", image="web", public_ports=(PortPair(80, 6060),),
                  links=(Link(to="db"),)),
        Container(name="db", image="db", count=count, public_ports=(PortPair(27017),)),
    ))


def test_public_port_listens_on_host_and_forwards_to_the_container() -> None:
    p = plan(_example(), name="app")
    specs = proxy_specs("app", p.instances, {"web-1": Running(100, "10.0.0.2"),
                                             "db-1": Running(200, "10.0.0.3")})
    web = specs["app.web-1.80"]
    assert web.listen == ("0.0.0.0:6060",)
    assert web.targets == ("10.0.0.2:80",)
    assert web.netns_listen == ()


def test_link_listens_inside_each_running_consumer_namespace() -> None:
    p = plan(_example(), name="app")
    specs = proxy_specs("app", p.instances, {"web-1": Running(100, "10.0.0.2"),
                                             "db-1": Running(200, "10.0.0.3")},
                        publish_address="127.0.0.1")
    db = specs["app.db-1.27017"]
    assert db.listen == ("127.0.0.1:4000",)
    assert db.targets == ("10.0.0.3:27017",)
    assert db.netns_listen == (("/proc/100/ns/net", "127.0.0.1:27017"),)


def test_fan_out_gives_each_target_instance_its_own_local_port() -> None:
    p = plan(_example(count=3), name="app")
    running = {"web-1": Running(100, "10.0.0.2"),
               **{f"db-{n}": Running(200 + n, f"10.0.0.{10 + n}") for n in (1, 2, 3)}}
    specs = proxy_specs("app", p.instances, running)
    listens = sorted(specs[f"app.db-{n}.27017"].netns_listen[0][1] for n in (1, 2, 3))
    assert listens == ["127.0.0.1:27017", "127.0.0.1:27018", "127.0.0.1:27019"]


def test_stopped_target_gets_an_empty_pool_and_stopped_consumer_no_listener() -> None:
    p = plan(_example(), name="app")
    specs = proxy_specs("app", p.instances, {"web-1": Running(100, "10.0.0.2")})
    assert specs["app.db-1.27017"].targets == ()
    assert specs["app.db-1.27017"].netns_listen == (("/proc/100/ns/net", "127.0.0.1:27017"),)
    specs = proxy_specs("app", p.instances, {"db-1": Running(200, "10.0.0.3")})
    assert specs["app.db-1.27017"].netns_listen == ()


def test_ipv6_publish_address_is_bracketed() -> None:
    p = plan(_example(), name="app")
    specs = proxy_specs("app", p.instances, {}, publish_address="::1")
    assert specs["app.web-1.80"].listen == ("[::1]:6060",)


def test_busy_poll_reaches_every_proxy_and_its_command_line() -> None:
    p = plan(_example(), name="app")
    running = {"web-1": Running(100, "10.0.0.2"), "db-1": Running(200, "10.0.0.3")}
    specs = proxy_specs("app", p.instances, running, busy_poll_us=150)
    assert {s.busy_poll_us for s in specs.values()} == {150}
    argv = specs["app.db-1.27017"].argv(Path("/run/x.sock"))
    assert argv[argv.index("--busy-poll") + 1] == "150"
    plain = proxy_specs("app", p.instances, running)["app.db-1.27017"]
    assert "--busy-poll" not in plain.argv(Path("/run/x.sock"))

"""The descriptor parser: what it accepts, what it rejects and how it says so."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gearproxy import spec
from gearproxy.errors import DescriptorError
from gearproxy.spec import (
    MAX_DESCRIPTOR_BYTES,
    Container,
    Deployment,
    Healthcheck,
    InstancePort,
    InstanceRecord,
    Link,
    PortPair,
    deployment_name,
    from_json,
    link_ports,
    load,
    parse,
    to_json,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def web_db() -> dict[str, Any]:
    """A small valid descriptor the error cases below break one field at a time."""
    return {
        "containers": [
            {
                "name": "web",
                "image": "gearproxy-example/web",
                "publicports": [{"internal": 8080, "external": 6060}],
                "links": [{"to": "db"}],
            },
            {"name": "db", "image": "gearproxy-example/db", "publicports": [{"internal": 5432}]},
        ]
    }


def with_web(**fields: Any) -> dict[str, Any]:
    """`web_db()` with the web container's fields replaced."""
    doc = web_db()
    doc["containers"][0].update(fields)
    return doc


def with_db(**fields: Any) -> dict[str, Any]:
    """`web_db()` with the db container's fields replaced."""
    doc = web_db()
    doc["containers"][1].update(fields)
    return doc


def rejected(doc: Any) -> DescriptorError:
    """Parse `doc` (a JSON text, or a value to dump) and return the error it must raise."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(DescriptorError) as info:
        parse(text)
    err = info.value
    assert "\n" not in str(err), "messages are one line"
    assert "Traceback" not in str(err)
    return err


# (case id, descriptor, expected JSON path, words the message must contain)
ERROR_CASES: list[tuple[str, Any, str, tuple[str, ...]]] = [
    # top level
    ("top-not-object", [], "", ("JSON object", "Containers", "not a list")),
    ("containers-missing", {}, "containers", ("required",)),
    ("containers-empty", {"containers": []}, "containers", ("must not be empty",)),
    ("containers-not-list", {"containers": {}}, "containers", ("must be a list", "an object")),
    (
        "top-unknown-key",
        {**web_db(), "IdPrefx": "a"},
        "idprefx",
        ("unknown key 'IdPrefx'", "did you mean 'IdPrefix'", "allowed: Containers, IdPrefix"),
    ),
    ("idprefix-type", {**web_db(), "idprefix": 5}, "idprefix", ("must be a string",)),
    ("idprefix-invalid", {**web_db(), "IdPrefix": "-x"}, "idprefix", ("not a valid id prefix",)),
    (
        "randomizeids-true",
        {**web_db(), "RandomizeIds": True},
        "randomizeids",
        ("not supported", "RandomizeIds: false"),
    ),
    # container shape
    ("container-not-object", {"containers": ["web"]}, "containers[0]", ("must be an object",)),
    (
        "container-unknown-key",
        with_web(imgae="x"),
        "containers[0].imgae",
        ("unknown key 'imgae'", "did you mean 'Image'", "allowed: Name, Image, Count"),
    ),
    ("container-notify-true", with_web(Notify=True), "containers[0].notify", ("not supported",)),
    ("name-missing", {"containers": [{"image": "a"}]}, "containers[0].name", ("required",)),
    ("name-type", with_web(name=5), "containers[0].name", ("must be a string", "an integer")),
    ("name-space", with_web(name="my app"), "containers[0].name", ("not a valid name",)),
    ("name-leading-dash", with_web(name="-web"), "containers[0].name", ("not a valid name",)),
    ("name-too-long", with_web(name="w" * 64), "containers[0].name", ("not a valid name", "63")),
    ("name-empty", with_web(name=""), "containers[0].name", ("not a valid name",)),
    (
        "name-duplicate",
        with_web(name="db"),
        "containers[1].name",
        ("duplicate container name 'db'", "containers[0]"),
    ),
    (
        "name-duplicate-case",
        with_db(name="WEB"),
        "containers[1].name",
        ("duplicate container name 'WEB'", "ignoring case"),
    ),
    ("image-missing", {"containers": [{"name": "a"}]}, "containers[0].image", ("required",)),
    ("image-empty", with_web(image=""), "containers[0].image", ("must not be empty",)),
    ("image-space", with_web(image="busy box"), "containers[0].image", ("whitespace",)),
    ("image-type", with_web(image=["a"]), "containers[0].image", ("must be a string", "a list")),
    # count
    ("count-negative", with_web(count=-1), "containers[0].count", ("must be 0..1000",)),
    ("count-absurd", with_web(count=1001), "containers[0].count", ("must be 0..1000", "1001")),
    ("count-bool", with_web(count=True), "containers[0].count", ("integer", "a boolean")),
    ("count-float", with_web(count=1.0), "containers[0].count", ("integer", "a decimal number")),
    ("count-string", with_web(count="2"), "containers[0].count", ("integer", "a string")),
    # public ports
    (
        "publicports-not-list",
        with_db(publicports={"internal": 1}),
        "containers[1].publicports",
        ("must be a list",),
    ),
    (
        "port-internal-zero",
        with_db(publicports=[{"internal": 0}]),
        "containers[1].publicports[0].internal",
        ("must be 1..65535",),
    ),
    (
        "port-internal-high",
        with_db(publicports=[{"internal": 5432}, {"internal": 65536}]),
        "containers[1].publicports[1].internal",
        ("must be 1..65535", "65536"),
    ),
    (
        "port-internal-string",
        with_db(publicports=[{"internal": "5432"}]),
        "containers[1].publicports[0].internal",
        ("must be an integer", "a string"),
    ),
    (
        "port-internal-bool",
        with_db(publicports=[{"internal": True}]),
        "containers[1].publicports[0].internal",
        ("must be an integer", "a boolean"),
    ),
    (
        "port-internal-missing",
        with_db(publicports=[{"external": 80}]),
        "containers[1].publicports[0].internal",
        ("required",),
    ),
    (
        "port-external-negative",
        with_db(publicports=[{"internal": 5432, "external": -1}]),
        "containers[1].publicports[0].external",
        ("must be 0..65535", "0 means allocate"),
    ),
    (
        "port-external-high",
        with_db(publicports=[{"internal": 5432, "external": 70000}]),
        "containers[1].publicports[0].external",
        ("must be 0..65535",),
    ),
    (
        "port-unknown-key",
        with_db(publicports=[{"internal": 5432, "extrenal": 1}]),
        "containers[1].publicports[0].extrenal",
        ("unknown key", "allowed: Internal, External"),
    ),
    (
        "port-internal-twice",
        with_db(publicports=[{"internal": 5432}, {"internal": 5432}]),
        "containers[1].publicports[1].internal",
        ("port 5432 is listed twice", "publicports[0]"),
    ),
    (
        "external-twice",
        with_db(publicports=[{"internal": 5432, "external": 6060}]),
        "containers[1].publicports[0].external",
        ("host port 6060", "already used by containers[0].publicports[0]"),
    ),
    (
        "external-twice-same-container",
        with_web(publicports=[{"internal": 80, "external": 81}, {"internal": 81, "external": 81}]),
        "containers[0].publicports[1].external",
        ("host port 81", "already used by containers[0].publicports[0]"),
    ),
    # links
    ("links-not-list", with_web(links={"to": "db"}), "containers[0].links", ("must be a list",)),
    ("link-to-missing", with_web(links=[{}]), "containers[0].links[0].to", ("required",)),
    (
        "link-unknown-target",
        with_web(links=[{"to": "mongo"}]),
        "containers[0].links[0].to",
        ("no container named 'mongo'", "containers: web, db"),
    ),
    (
        "link-target-case",
        with_web(links=[{"to": "DB"}]),
        "containers[0].links[0].to",
        ("no container named 'DB'", "did you mean 'db'"),
    ),
    (
        "link-self",
        with_web(links=[{"to": "web"}]),
        "containers[0].links[0].to",
        ("cannot link to itself",),
    ),
    (
        "link-target-no-ports",
        with_db(publicports=[]),
        "containers[0].links[0].to",
        ("'db' has no public ports",),
    ),
    (
        "link-port-not-published",
        with_web(links=[{"to": "db", "ports": [5433]}]),
        "containers[0].links[0].ports[0]",
        ("'db' does not publish port 5433", "it publishes 5432"),
    ),
    (
        "link-port-twice",
        with_web(links=[{"to": "db", "ports": [5432, 5432]}]),
        "containers[0].links[0].ports[1]",
        ("listed twice",),
    ),
    (
        "link-port-range",
        with_web(links=[{"to": "db", "ports": [0]}]),
        "containers[0].links[0].ports[0]",
        ("must be 1..65535",),
    ),
    (
        "alias-internal-not-published",
        with_web(links=[{"to": "db", "aliasports": [{"internal": 27017, "external": 9000}]}]),
        "containers[0].links[0].aliasports[0].internal",
        ("does not publish port 27017",),
    ),
    (
        "alias-external-twice",
        {
            "containers": [
                {
                    "name": "web",
                    "image": "w",
                    "links": [
                        {"to": "db", "aliasports": [{"internal": 5432, "external": 9000}]},
                        {"to": "cache", "aliasports": [{"internal": 6379, "external": 9000}]},
                    ],
                },
                {"name": "db", "image": "d", "publicports": [{"internal": 5432}]},
                {"name": "cache", "image": "c", "publicports": [{"internal": 6379}]},
            ]
        },
        "containers[0].links[1].aliasports[0].external",
        ("local port 9000 inside 'web'", "containers[0].links[0] (to 'db')"),
    ),
    (
        "alias-equals-own-port",
        with_web(links=[{"to": "db", "aliasports": [{"internal": 5432, "external": 8080}]}]),
        "containers[0].links[0].aliasports[0].external",
        ("local port 8080", "its own public port (containers[0].publicports[0])"),
    ),
    (
        "link-port-equals-own-port",
        with_web(publicports=[{"internal": 5432}]),
        "containers[0].links[0].to",
        ("local port 5432 inside 'web'", "its own public port"),
    ),
    (
        "link-same-target-twice",
        with_web(links=[{"to": "db"}, {"to": "db"}]),
        "containers[0].links[1].to",
        ("local port 5432", "containers[0].links[0] (to 'db')"),
    ),
    (
        "link-ports-collide-with-alias",
        with_web(
            links=[
                {"to": "db", "aliasports": [{"internal": 5432, "external": 9000}]},
                {"to": "db", "ports": [5432], "aliasports": [{"internal": 5432, "external": 9000}]},
            ]
        ),
        "containers[0].links[1].aliasports[0].external",
        ("local port 9000",),
    ),
    (
        "matchport-type",
        with_web(links=[{"to": "db", "matchport": "yes"}]),
        "containers[0].links[0].matchport",
        ("must be true or false", "a string"),
    ),
    (
        "link-nonlocal-true",
        with_web(links=[{"to": "db", "NonLocal": True}]),
        "containers[0].links[0].nonlocal",
        ("not supported",),
    ),
    (
        "link-unknown-key",
        with_web(links=[{"to": "db", "port": [5432]}]),
        "containers[0].links[0].port",
        ("unknown key 'port'", "did you mean 'Ports'"),
    ),
    # environment
    (
        "env-type",
        with_web(environment="A=B"),
        "containers[0].environment",
        ("list of {Name, Value}", "NAME: value", "a string"),
    ),
    (
        "env-list-bad-name",
        with_web(environment=[{"name": "1X", "value": "a"}]),
        "containers[0].environment[0].name",
        ("'1X' is not a valid variable name",),
    ),
    (
        "env-list-missing-value",
        with_web(environment=[{"name": "X"}]),
        "containers[0].environment[0].value",
        ("required",),
    ),
    (
        "env-list-number-value",
        with_web(environment=[{"name": "X", "value": 5}]),
        "containers[0].environment[0].value",
        ("must be a string", "an integer"),
    ),
    (
        "env-list-twice",
        with_web(environment=[{"name": "X", "value": "1"}, {"Name": "X", "Value": "2"}]),
        "containers[0].environment[1].name",
        ("variable 'X' is set twice",),
    ),
    (
        "env-map-number",
        with_web(environment={"PORT": 5432}),
        "containers[0].environment.PORT",
        ("must be a string", 'write "5432"'),
    ),
    (
        "env-map-null",
        with_web(environment={"PORT": None}),
        "containers[0].environment.PORT",
        ("must be a string", "null"),
    ),
    (
        "env-map-bad-name",
        with_web(environment={"A-B": "x"}),
        "containers[0].environment.A-B",
        ("not a valid variable name",),
    ),
    (
        "env-nul",
        with_web(environment={"A": "x\0y"}),
        "containers[0].environment.A",
        ("NUL",),
    ),
    # command
    ("command-empty", with_web(command=""), "containers[0].command", ("must not be empty",)),
    ("command-blank", with_web(command="   "), "containers[0].command", ("must not be empty",)),
    (
        "command-unbalanced",
        with_web(command='echo "hi'),
        "containers[0].command",
        ("cannot split", "No closing quotation"),
    ),
    ("command-empty-list", with_web(command=[]), "containers[0].command", ("must not be empty",)),
    (
        "command-list-item",
        with_web(command=["echo", 1]),
        "containers[0].command[1]",
        ("must be a string", "an integer"),
    ),
    (
        "command-empty-program",
        with_web(command=["", "x"]),
        "containers[0].command[0]",
        ("program name must not be empty",),
    ),
    (
        "command-type",
        with_web(command={"run": "x"}),
        "containers[0].command",
        ("string or a list of strings",),
    ),
    # restart
    (
        "restart-unknown",
        with_web(restart="sometimes"),
        "containers[0].restart",
        ("must be one of no, on-failure, always", "'sometimes'"),
    ),
    ("restart-type", with_web(restart=False), "containers[0].restart", ("must be a string",)),
    # healthcheck
    (
        "health-type",
        with_web(healthcheck="wget -q localhost"),
        "containers[0].healthcheck",
        ("must be an object",),
    ),
    (
        "health-test-missing",
        with_web(healthcheck={"interval": 1}),
        "containers[0].healthcheck.test",
        ("required",),
    ),
    (
        "health-test-empty",
        with_web(healthcheck={"test": []}),
        "containers[0].healthcheck.test",
        ("must not be empty",),
    ),
    (
        "health-test-blank",
        with_web(healthcheck={"test": " "}),
        "containers[0].healthcheck.test",
        ("must not be empty",),
    ),
    (
        "health-test-none",
        with_web(healthcheck={"test": ["NONE"]}),
        "containers[0].healthcheck.test[0]",
        ("leave Healthcheck out",),
    ),
    (
        "health-test-shell-args",
        with_web(healthcheck={"test": ["CMD-SHELL", "a", "b"]}),
        "containers[0].healthcheck.test",
        ("exactly one",),
    ),
    (
        "health-test-cmd-alone",
        with_web(healthcheck={"test": ["CMD"]}),
        "containers[0].healthcheck.test",
        ("program name must not be empty",),
    ),
    (
        "health-interval-zero",
        with_web(healthcheck={"test": "true", "interval": 0}),
        "containers[0].healthcheck.interval",
        ("must be 0.001..86400 seconds", "not 0"),
    ),
    (
        "health-interval-too-small",
        with_web(healthcheck={"test": "true", "interval": 0.0001}),
        "containers[0].healthcheck.interval",
        ("must be 0.001..86400 seconds",),
    ),
    (
        "health-timeout-too-large",
        with_web(healthcheck={"test": "true", "timeout": 86401}),
        "containers[0].healthcheck.timeout",
        ("must be 0.001..86400 seconds",),
    ),
    (
        "health-timeout-negative",
        with_web(healthcheck={"test": "true", "timeout": -1.5}),
        "containers[0].healthcheck.timeout",
        ("must be 0.001..86400 seconds", "-1.5"),
    ),
    (
        "health-interval-string",
        with_web(healthcheck={"test": "true", "interval": "5s"}),
        "containers[0].healthcheck.interval",
        ("must be a number of seconds", "a string"),
    ),
    (
        "health-interval-bool",
        with_web(healthcheck={"test": "true", "interval": True}),
        "containers[0].healthcheck.interval",
        ("must be a number of seconds", "a boolean"),
    ),
    (
        "health-retries-zero",
        with_web(healthcheck={"test": "true", "retries": 0}),
        "containers[0].healthcheck.retries",
        ("must be 1..1000",),
    ),
    (
        "health-retries-float",
        with_web(healthcheck={"test": "true", "retries": 2.5}),
        "containers[0].healthcheck.retries",
        ("must be an integer",),
    ),
    (
        "health-unknown-key",
        with_web(healthcheck={"test": "true", "startperiod": 1}),
        "containers[0].healthcheck.startperiod",
        ("unknown key", "allowed: Test, Interval, Timeout, Retries"),
    ),
    # state-file instances
    ("instances-type", {**web_db(), "instances": {}}, "instances", ("must be a list",)),
    (
        "instance-id-missing",
        {**web_db(), "instances": [{"image": "i", "from": "db"}]},
        "instances[0].id",
        ("required",),
    ),
    (
        "instance-id-invalid",
        {**web_db(), "instances": [{"id": "db 1", "image": "i", "from": "db"}]},
        "instances[0].id",
        ("not a valid instance id",),
    ),
    (
        "instance-id-twice",
        {
            **web_db(),
            "instances": [
                {"id": "db-1", "image": "i", "from": "db"},
                {"id": "DB-1", "image": "i", "from": "db"},
            ],
        },
        "instances[1].id",
        ("duplicate instance id 'DB-1'", "instances[0]"),
    ),
    (
        "instance-image-empty",
        {**web_db(), "instances": [{"id": "db-1", "image": "", "from": "db"}]},
        "instances[0].image",
        ("must not be empty",),
    ),
    (
        "instance-from-invalid",
        {**web_db(), "instances": [{"id": "db-1", "image": "i", "from": "d b"}]},
        "instances[0].from",
        ("not a valid name",),
    ),
    (
        "instance-host-port-twice",
        {
            **web_db(),
            "instances": [
                {
                    "id": "db-1",
                    "image": "i",
                    "from": "db",
                    "ports": [{"internal": 1, "external": 4000}],
                },
                {
                    "id": "db-2",
                    "image": "i",
                    "from": "db",
                    "ports": [{"internal": 1, "external": 4000}],
                },
            ],
        },
        "instances[1].ports[0].external",
        ("host port 4000 on 'local'", "instances[0].ports[0] ('db-1')"),
    ),
    (
        "instance-target-port",
        {
            **web_db(),
            "instances": [
                {
                    "id": "db-1",
                    "image": "i",
                    "from": "db",
                    "ports": [{"internal": 1, "external": 4000, "target": {"port": 70000}}],
                }
            ],
        },
        "instances[0].ports[0].target.port",
        ("must be 0..65535",),
    ),
    (
        "instance-unknown-key",
        {**web_db(), "instances": [{"id": "db-1", "image": "i", "from": "db", "host": "x"}]},
        "instances[0].host",
        ("unknown key 'host'", "allowed: Id, Image, From, On, Ports"),
    ),
]


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [pytest.param(doc, path, words, id=case) for case, doc, path, words in ERROR_CASES],
)
def test_invalid_descriptor_names_the_path_and_the_problem(
    doc: Any, path: str, words: tuple[str, ...]
) -> None:
    """Each invalid descriptor fails with a one-line error naming the JSON path and the rule."""
    err = rejected(doc)
    assert err.path == path, str(err)
    for word in words:
        assert word in err.detail, f"{word!r} not in {err.detail!r}"
    assert str(err) == (f"{path}: {err.detail}" if path else err.detail)


def test_key_given_twice_in_different_case_is_an_error() -> None:
    """`Containers` and `containers` in one object are the same key given twice."""
    text = '{"Containers": [{"name": "a", "image": "i"}], "containers": []}'
    err = rejected(text)
    assert err.path == "containers"
    assert "given twice as 'Containers' and 'containers'" in err.detail


def test_exact_duplicate_key_is_an_error() -> None:
    """JSON allows a key twice (the last wins); a descriptor does not."""
    err = rejected('{"containers": [{"name": "a", "name": "b", "image": "i"}]}')
    assert err.path == "containers[0].name"
    assert "given more than once" in err.detail


def test_duplicate_environment_key_in_mapping_is_an_error() -> None:
    """In the mapping form the same variable twice is caught with its path."""
    err = rejected(
        '{"containers": [{"name": "a", "image": "i", "environment": {"A": "1", "A": "2"}}]}'
    )
    assert err.path == "containers[0].environment.A"
    assert "more than once" in err.detail


def test_json_syntax_error_gives_line_and_column() -> None:
    """A JSON syntax error names the source and the line and column of the problem."""
    text = '{\n  "containers": [\n    {"name": "a" "image": "i"}\n  ]\n}'
    with pytest.raises(DescriptorError) as info:
        parse(text, source="app.json")
    err = info.value
    assert err.path == ""
    assert str(err) == "app.json: not valid JSON: Expecting ',' delimiter at line 3 column 18"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("", ("empty",), id="empty"),
        pytest.param("  \n", ("empty",), id="blank"),
        pytest.param('{"containers": NaN}', ("not valid JSON", "NaN"), id="nan"),
        pytest.param('{"containers": -Infinity}', ("-Infinity",), id="infinity"),
        pytest.param("[" * 100_000 + "]" * 100_000, ("nested too deeply",), id="deep"),
        pytest.param('{"containers": [', ("not valid JSON", "line 1 column 17"), id="truncated"),
    ],
)
def test_text_that_is_not_a_json_document_is_rejected(text: str, words: tuple[str, ...]) -> None:
    """Empty text, JSON's non-standard constants and absurd nesting are one-line errors."""
    err = rejected(text)
    assert err.path == ""
    for word in words:
        assert word in err.detail


def test_huge_number_is_rejected_not_crashing() -> None:
    """1e400 decodes to infinity; as seconds it is out of range, as a port not an integer."""
    doc = json.dumps(with_web(healthcheck={"test": "true", "interval": 1}))
    err = rejected(doc.replace('"interval": 1', '"interval": 1e400'))
    assert err.path == "containers[0].healthcheck.interval"


# --- what is accepted ---------------------------------------------------------------------------


def test_rockmongo_example_parses_to_the_issue_s_deployment() -> None:
    """The seed example: rockmongo publishes 80 on 6060 and links to mongodb's 27017."""
    d = load(EXAMPLES / "rockmongo_mongodb.json")
    assert d == Deployment(
        containers=(
            Container(
                name="rockmongo",
                image="derekwaynecarr/rockmongo",
                public_ports=(PortPair(80, 6060),),
                links=(Link(to="mongodb"),),
            ),
            Container(
                name="mongodb", image="ccoleman/ubuntu-mongodb", public_ports=(PortPair(27017),)
            ),
        )
    )
    assert link_ports(d.containers[0].links[0], d.container("mongodb")) == (PortPair(27017, 27017),)


def test_web_db_example_parses_with_commands() -> None:
    """The locally buildable example: web (httpd 8080 on host port 6060) links to db
    (nc echo on 5432)."""
    d = load(EXAMPLES / "web_db.json")
    web, db = d.containers
    assert (web.name, web.image, web.public_ports) == (
        "web",
        "gearproxy-example/web",
        (PortPair(8080, 6060),),
    )
    assert web.links == (Link(to="db"),)
    assert web.command == ("httpd", "-f", "-p", "8080", "-h", "/www")
    assert (db.name, db.image, db.public_ports) == ("db", "gearproxy-example/db", (PortPair(5432),))
    assert db.command == ("nc", "-ll", "-p", "5432", "-e", "cat")
    build = (EXAMPLES / "build-images.sh").read_text()
    assert "gearproxy-example/web" in build
    assert "gearproxy-example/db" in build


def test_keys_are_case_insensitive() -> None:
    """geard's decoder ignored key case; lower, upper and mixed spellings give one result."""
    lower = web_db()
    upper = json.loads(json.dumps(lower).replace('"name"', '"NAME"').replace('"to"', '"To"'))
    pascal = {
        "Containers": [
            {
                "Name": "web",
                "Image": "gearproxy-example/web",
                "PublicPorts": [{"Internal": 8080, "External": 6060}],
                "Links": [{"To": "db"}],
            },
            {"Name": "db", "Image": "gearproxy-example/db", "PUBLICPORTS": [{"iNtErNaL": 5432}]},
        ]
    }
    assert parse(json.dumps(lower)) == parse(json.dumps(upper)) == parse(json.dumps(pascal))


def test_environment_list_and_mapping_are_equivalent() -> None:
    """geard's `[{Name, Value}]` list and a plain mapping give the same ordered pairs."""
    as_list = with_web(environment=[{"Name": "A", "Value": "1"}, {"name": "b_2", "value": ""}])
    as_map = with_web(environment={"A": "1", "b_2": ""})
    a, b = parse(json.dumps(as_list)), parse(json.dumps(as_map))
    assert a == b
    assert a.containers[0].environment == (("A", "1"), ("b_2", ""))


def test_defaults_and_null_members() -> None:
    """Count defaults to 1, External to 0, Restart to always; null is the same as absent."""
    d = parse(
        json.dumps(
            {
                "containers": [
                    {"name": "a", "image": "i", "count": None, "links": None, "command": None},
                    {"name": "b", "image": "i", "count": 0, "publicports": [{"internal": 1}]},
                ],
                "idprefix": None,
                "instances": None,
            }
        )
    )
    a, b = d.containers
    assert (a.count, a.links, a.command, a.restart, a.healthcheck) == (1, (), None, "always", None)
    assert b.count == 0, "count 0 is 'scaled to zero'"
    assert b.public_ports == (PortPair(1, 0),)
    assert (d.id_prefix, d.instances) == ("", ())


def test_explicit_external_with_count_above_one_is_left_to_the_planner() -> None:
    """Instances on different hosts may share a port number: only the planner can tell."""
    d = parse(json.dumps(with_web(count=2)))
    assert d.containers[0].count == 2
    assert d.containers[0].public_ports == (PortPair(8080, 6060),)


def test_command_string_is_split_like_a_shell() -> None:
    """A string Command is split with shell quoting rules, without running a shell."""
    d = parse(json.dumps(with_web(command="sh -c 'echo \"hi there\"; sleep 1'")))
    assert d.containers[0].command == ("sh", "-c", 'echo "hi there"; sleep 1')


def test_restart_and_healthcheck_extensions() -> None:
    """Restart takes Docker's policy names; a Healthcheck string is Docker's CMD-SHELL form."""
    d = parse(
        json.dumps(
            {
                "containers": [
                    {
                        "name": "a",
                        "image": "i",
                        "restart": "on-failure",
                        "healthcheck": {"test": "wget -q -O- localhost", "interval": 2},
                    },
                    {"name": "b", "image": "i", "healthcheck": {"Test": ["nc", "-z", "x", "1"]}},
                    {"name": "c", "image": "i", "healthcheck": {"test": ["CMD", "true"]}},
                    {
                        "name": "d",
                        "image": "i",
                        "restart": "no",
                        "healthcheck": {"test": ["CMD-SHELL", "x"], "retries": 1, "timeout": 0.5},
                    },
                ]
            }
        )
    )
    a, b, c, e = d.containers
    assert a.restart == "on-failure"
    assert a.healthcheck == Healthcheck(("CMD-SHELL", "wget -q -O- localhost"), interval=2.0)
    assert b.healthcheck == Healthcheck(("CMD", "nc", "-z", "x", "1"))
    assert c.healthcheck == Healthcheck(("CMD", "true"))
    assert e.restart == "no"
    assert e.healthcheck == Healthcheck(("CMD-SHELL", "x"), timeout=0.5, retries=1)


def test_link_ports_follow_geard_rules() -> None:
    """Aliases first, then un-aliased Ports; both empty means every target port."""
    target = Container("db", "i", public_ports=(PortPair(1), PortPair(2), PortPair(3)))
    assert link_ports(Link("db"), target) == (PortPair(1, 1), PortPair(2, 2), PortPair(3, 3))
    link = Link("db", ports=(3, 1), alias_ports=(PortPair(1, 9001), PortPair(2, 0)))
    assert link_ports(link, target) == (PortPair(1, 9001), PortPair(2, 2), PortPair(3, 3))


def test_links_with_aliases_and_match_port_are_accepted() -> None:
    """geard's link_alias fixture shape plus MatchPort and two links on disjoint ports."""
    d = parse(
        json.dumps(
            {
                "containers": [
                    {
                        "name": "web",
                        "image": "w",
                        "publicports": [{"internal": 80}],
                        "links": [
                            {"to": "db", "aliasports": [{"internal": 3000, "external": 8080}]},
                            {"to": "db", "ports": [3001], "matchport": True},
                        ],
                    },
                    {
                        "name": "db",
                        "image": "d",
                        "count": 2,
                        "publicports": [{"internal": 3000}, {"internal": 3001}],
                    },
                ]
            }
        )
    )
    assert d.containers[0].links == (
        Link("db", alias_ports=(PortPair(3000, 8080),)),
        Link("db", ports=(3001,), match_port=True),
    )


GEARD_STATE_FILE = """{
  "Containers": [
    {"Name": "web", "Image": "w", "PublicPorts": [{"Internal": 80, "External": 6060}],
     "Links": [{"To": "db", "NonLocal": false, "AliasPorts": [{"Internal": 27017, "External": 0}]}],
     "Notify": false, "Count": 1},
    {"Name": "db", "Image": "openshift/ubuntu-mongodb", "PublicPorts": [{"Internal": 27017}],
     "Notify": false, "Count": 2, "Affinity": ""}
  ],
  "Instances": [
    {"Id": "web-1", "Image": "w", "From": "web", "On": "localhost", "Notify": false,
     "Ports": [{"Internal": 80, "External": 6060, "Target": {"Host": "", "Port": 0}}]},
    {"Id": "db-1", "Image": "openshift/ubuntu-mongodb", "From": "db", "On": "localhost",
     "Ports": [{"Internal": 27017, "External": 4203,
                "Target": {"Host": "127.0.0.1", "Port": 27017}}]},
    {"Id": "db-2", "Image": "openshift/ubuntu-mongodb", "From": "db",
     "Ports": [{"Internal": 27017, "External": 4204}]},
    {"Id": "old-1", "Image": "x", "From": "removed"}
  ],
  "IdPrefix": "",
  "RandomizeIds": false
}"""


def test_geard_state_file_is_valid_input() -> None:
    """A state file as geard wrote it (with its unsupported keys at their neutral values)."""
    d = parse(GEARD_STATE_FILE)
    assert [c.name for c in d.containers] == ["web", "db"]
    assert d.containers[0].links == (Link("db", alias_ports=(PortPair(27017, 0),)),)
    assert d.instances == (
        InstanceRecord("web-1", "w", "web", "localhost", (InstancePort(80, 6060, "", 0),)),
        InstanceRecord(
            "db-1",
            "openshift/ubuntu-mongodb",
            "db",
            "localhost",
            (InstancePort(27017, 4203, "127.0.0.1", 27017),),
        ),
        InstanceRecord(
            "db-2", "openshift/ubuntu-mongodb", "db", "local", (InstancePort(27017, 4204),)
        ),
        InstanceRecord("old-1", "x", "removed", "local", ()),
    )


def test_from_json_validates_plain_dicts() -> None:
    """`from_json` applies the same rules to data decoded elsewhere (the daemon's requests)."""
    assert from_json(web_db()) == parse(json.dumps(web_db()))
    with pytest.raises(DescriptorError) as info:
        from_json(with_web(count=-1))
    assert info.value.path == "containers[0].count"
    with pytest.raises(DescriptorError) as info:
        from_json({"containers": [{"name": "a", "image": "i", "Name": "b"}]})
    assert info.value.path == "containers[0].name"


# --- writing back -------------------------------------------------------------------------------


def test_to_json_uses_geard_spelling() -> None:
    """`to_json` writes geard's keys; the extensions only when they differ from the default."""
    d = parse(GEARD_STATE_FILE)
    out = to_json(d)
    assert out["Containers"][0] == {
        "Name": "web",
        "Image": "w",
        "Count": 1,
        "PublicPorts": [{"Internal": 80, "External": 6060}],
        "Links": [{"To": "db", "AliasPorts": [{"Internal": 27017, "External": 0}]}],
    }
    assert out["IdPrefix"] == ""
    assert out["Instances"][1] == {
        "Id": "db-1",
        "Image": "openshift/ubuntu-mongodb",
        "From": "db",
        "On": "localhost",
        "Ports": [
            {"Internal": 27017, "External": 4203, "Target": {"Host": "127.0.0.1", "Port": 27017}}
        ],
    }
    rich = parse(
        json.dumps(
            with_web(
                environment={"A": "1"},
                command="httpd -f",
                restart="no",
                healthcheck={"test": "true"},
            )
        )
    )
    web = to_json(rich)["Containers"][0]
    assert web["Environment"] == [{"Name": "A", "Value": "1"}]
    assert web["Command"] == ["httpd", "-f"]
    assert web["Restart"] == "no"
    assert web["Healthcheck"] == {
        "Test": ["CMD-SHELL", "true"],
        "Interval": 5.0,
        "Timeout": 3.0,
        "Retries": 3,
    }
    assert "Instances" not in to_json(rich)


@pytest.mark.parametrize("source", ["rockmongo_mongodb.json", "web_db.json", "geard state file"])
def test_to_json_round_trips(source: str) -> None:
    """`parse(json.dumps(to_json(d))) == d` for the examples and a geard state file."""
    text = GEARD_STATE_FILE if source == "geard state file" else (EXAMPLES / source).read_text()
    d = parse(text)
    assert parse(json.dumps(to_json(d))) == d


_KEY_CASES = st.sampled_from([str.lower, str.upper, lambda k: k])
_TEXT = st.text(st.characters(blacklist_characters="\0"), max_size=8)


@st.composite
def descriptors(draw: st.DrawFn) -> dict[str, Any]:
    """Valid descriptors in random key case, built so that every rule holds by construction."""

    def key(name: str) -> str:
        return draw(_KEY_CASES)(name)

    n = draw(st.integers(1, 4))
    names = draw(
        st.lists(
            st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,8}", fullmatch=True),
            min_size=n,
            max_size=n,
            unique_by=str.lower,
        )
    )
    externals = iter(draw(st.lists(st.integers(1, 65535), min_size=12, max_size=12, unique=True)))
    ports = {}  # container index -> its internal ports, from a range of its own
    containers = []
    for i, name in enumerate(names):
        internal = draw(st.lists(st.integers(0, 9), max_size=3, unique=True))
        ports[i] = [1000 * (i + 1) + p for p in internal]
        count = draw(st.integers(0, 3))
        public = []
        for p in ports[i]:
            pair: dict[str, Any] = {key("Internal"): p}
            if draw(st.booleans()):
                pair[key("External")] = next(externals)
            public.append(pair)
        c: dict[str, Any] = {
            key("Name"): name,
            key("Image"): draw(st.sampled_from(["busybox", "a/b:1"])),
        }
        if count != 1 or draw(st.booleans()):
            c[key("Count")] = count
        if public or draw(st.booleans()):
            c[key("PublicPorts")] = public
        if draw(st.booleans()):
            env_names = draw(
                st.lists(
                    st.from_regex(r"[A-Z_][A-Z0-9_]{0,4}", fullmatch=True), max_size=3, unique=True
                )
            )
            values = [draw(_TEXT) for _ in env_names]
            if draw(st.booleans()):
                c[key("Environment")] = dict(zip(env_names, values, strict=True))
            else:
                c[key("Environment")] = [
                    {key("Name"): e, key("Value"): val}
                    for e, val in zip(env_names, values, strict=True)
                ]
        if draw(st.booleans()):
            c[key("Command")] = [draw(_TEXT.filter(bool)), *draw(st.lists(_TEXT, max_size=3))]
        if draw(st.booleans()):
            c[key("Restart")] = draw(st.sampled_from(spec.RESTART_POLICIES))
        if draw(st.booleans()):
            check: dict[str, Any] = {
                key("Test"): draw(
                    st.one_of(
                        _TEXT.filter(str.strip),
                        st.lists(_TEXT.filter(bool), min_size=1, max_size=3),
                    )
                )
            }
            if draw(st.booleans()):
                check[key("Interval")] = draw(st.floats(0.001, 3600))
            if draw(st.booleans()):
                check[key("Retries")] = draw(st.integers(1, 10))
            c[key("Healthcheck")] = check
        containers.append(c)
    for i, c in enumerate(containers):
        targets = [t for t in range(n) if t != i and ports[t]]
        links = []
        for t in (
            draw(st.lists(st.sampled_from(targets), unique=True, max_size=2)) if targets else []
        ):
            link: dict[str, Any] = {key("To"): names[t]}
            chosen = draw(st.lists(st.sampled_from(ports[t]), unique=True, max_size=2))
            if chosen and draw(st.booleans()):
                link[key("Ports")] = chosen
            elif chosen:
                link[key("AliasPorts")] = [
                    {key("Internal"): p, key("External"): draw(st.sampled_from([0, 60000 + p]))}
                    for p in chosen
                ]
            if draw(st.booleans()):
                link[key("MatchPort")] = draw(st.booleans())
            links.append(link)
        if links:
            c[key("Links")] = links
    doc: dict[str, Any] = {key("Containers"): containers}
    if draw(st.booleans()):
        doc[key("IdPrefix")] = draw(st.from_regex(r"([a-z][a-z0-9-]{0,5})?", fullmatch=True))
    if draw(st.booleans()):
        doc[key("Instances")] = [
            {
                key("Id"): f"{names[0]}-{k + 1}",
                key("Image"): "busybox",
                key("From"): names[0],
                key("Ports"): [{key("Internal"): 1, key("External"): 40000 + k}],
            }
            for k in range(draw(st.integers(0, 3)))
        ]
    return doc


@settings(max_examples=150, deadline=None)
@given(descriptors())
def test_any_valid_descriptor_round_trips_through_to_json(doc: dict[str, Any]) -> None:
    """Property: every valid descriptor parses, and to_json then parse gives it back equal."""
    d = parse(json.dumps(doc))
    written = to_json(d)
    assert parse(json.dumps(written)) == d
    assert to_json(parse(json.dumps(written))) == written
    assert from_json(copy.deepcopy(written)) == d


# --- names and files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("rockmongo_mongodb.json", "rockmongo_mongodb"),
        ("/srv/apps/rockmongo_mongodb.json.20140422-072112", "rockmongo_mongodb"),
        (Path("deploy/App.JSON"), "App"),
        ("web_db", "web_db"),
        ("v1.2.json", "v1.2"),
        ("app.json.bak", "app.json.bak"),
    ],
)
def test_deployment_name_from_file_name(path: str | Path, name: str) -> None:
    """The name is the file name without .json and without geard's state-file timestamp."""
    assert deployment_name(path) == name


@pytest.mark.parametrize(
    "path", ["my app.json", ".json", "-app.json", "x" * 64 + ".json", "é.json"]
)
def test_deployment_name_that_is_not_valid_asks_for_name_option(path: str) -> None:
    """A file name that makes no valid deployment name is an error that points at --name."""
    with pytest.raises(DescriptorError) as info:
        deployment_name(path)
    assert info.value.path == ""
    assert "--name" in str(info.value)
    assert repr(Path(path).name) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    """A missing file names the file and says it does not exist."""
    missing = tmp_path / "nope.json"
    with pytest.raises(DescriptorError) as info:
        load(missing)
    assert str(info.value) == f"{missing}: cannot read it: no such file"


def test_load_directory_and_unreadable_path(tmp_path: Path) -> None:
    """A directory, or a path through a regular file, is unreadable with the reason given."""
    with pytest.raises(DescriptorError, match="it is a directory"):
        load(tmp_path)
    (tmp_path / "f").write_text("{}")
    with pytest.raises(DescriptorError, match="cannot read it: Not a directory"):
        load(tmp_path / "f" / "x.json")


def test_load_accepts_exactly_1_mib_and_rejects_more(tmp_path: Path) -> None:
    """The 1 MiB limit: a file of exactly MAX_DESCRIPTOR_BYTES loads, one byte more does not."""
    body = json.dumps(web_db())
    exact = tmp_path / "exact.json"
    exact.write_bytes(body.encode() + b" " * (MAX_DESCRIPTOR_BYTES - len(body)))
    assert load(exact) == parse(body)
    over = tmp_path / "over.json"
    over.write_bytes(body.encode() + b" " * (MAX_DESCRIPTOR_BYTES - len(body) + 1))
    with pytest.raises(DescriptorError) as info:
        load(over)
    assert str(info.value).startswith(f"{over}: larger than 1 MiB")
    with pytest.raises(DescriptorError, match="larger than 1 MiB"):
        parse(body + " " * MAX_DESCRIPTOR_BYTES)


def test_load_rejects_non_utf8_and_accepts_a_bom(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are named by value and offset; a UTF-8 BOM is tolerated."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"containers": "\xff"}')
    with pytest.raises(DescriptorError) as info:
        load(bad)
    assert str(info.value) == f"{bad}: not UTF-8 text (byte 0xff at offset 16)"
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(web_db()).encode())
    assert load(bom) == parse(json.dumps(web_db()))


def test_load_reports_json_errors_with_the_file_name(tmp_path: Path) -> None:
    """A syntax error in a file names the file, the line and the column."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"containers": [\n  {"name": "a",}\n]}')
    with pytest.raises(DescriptorError) as info:
        load(broken)
    assert str(info.value).startswith(f"{broken}: not valid JSON: ")
    assert str(info.value).endswith("at line 2 column 16")

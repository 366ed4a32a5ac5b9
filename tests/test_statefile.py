"""The geard-format state file: its shape, atomic writes, and reading it back as input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gearproxy import spec, statefile
from gearproxy.errors import StoreError
from gearproxy.plan import CurrentState, plan

ROCKMONGO = """{"containers":[
 {"name":"rockmongo","count":1,"image":"derekwaynecarr/rockmongo",
  "publicports":[{"internal":80,"external":6060}],"links":[{"to":"mongodb"}]},
 {"name":"mongodb","count":2,"image":"ccoleman/ubuntu-mongodb",
  "publicports":[{"internal":27017}]}]}"""


def test_render_has_geards_state_file_shape() -> None:
    """Containers, IdPrefix and Instances {Id, Image, From, On, Ports [{Internal, External,
    Target {Host, Port}}]}; Target is where the port is reachable (host, host port)."""
    d = spec.parse(ROCKMONGO)
    p = plan(d, name="rockmongo_mongodb")
    doc = statefile.render(p, d)
    assert set(doc) == {"Containers", "IdPrefix", "Instances"}
    assert doc["Containers"] == spec.to_json(d)["Containers"]
    assert doc["IdPrefix"] == ""
    # descriptor order, then instance number (not start order)
    assert [i["Id"] for i in doc["Instances"]] == ["rockmongo-1", "mongodb-1", "mongodb-2"]
    assert doc["Instances"][0] == {
        "Id": "rockmongo-1",
        "Image": "derekwaynecarr/rockmongo",
        "From": "rockmongo",
        "On": "local",
        "Ports": [
            {"Internal": 80, "External": 6060, "Target": {"Host": "localhost", "Port": 6060}}
        ],
    }
    assert doc["Instances"][1]["Ports"] == [
        {"Internal": 27017, "External": 4000, "Target": {"Host": "localhost", "Port": 4000}}
    ]
    json.dumps(doc)


def test_state_file_round_trips_through_parse_and_plan(tmp_path: Path) -> None:
    """A written state file parses back; planned with no current state it gets the same ids,
    hosts and host ports; planned against the state that wrote it, it is empty."""
    d = spec.parse(ROCKMONGO)
    first = plan(d, name="x", taken={"local": frozenset({4000})})  # so ports are not the defaults
    path = statefile.write(tmp_path / "x.json", first, d)
    saved = spec.load(path)
    assert saved.containers == d.containers
    assert [r.id for r in saved.instances] == ["rockmongo-1", "mongodb-1", "mongodb-2"]

    fresh = plan(saved, CurrentState(), name="x")  # e.g. on a new machine: no current state
    assert fresh.port_claims() == first.port_claims()
    assert fresh.links == first.links
    assert fresh.create == first.create

    again = plan(saved, first.as_current(), name="x")
    assert again.is_empty
    assert again.port_claims() == first.port_claims()

    # and the document itself is stable: writing the re-planned state gives the same file
    assert statefile.render(again, saved) == statefile.render(first, d)


def test_state_file_with_id_prefix_and_fewer_instances_round_trips(tmp_path: Path) -> None:
    """Scaling down and an IdPrefix survive the trip; recorded ports of kept ids are reused."""
    d = spec.parse(ROCKMONGO.replace('{"containers"', '{"IdPrefix":"p-","containers"', 1))
    first = plan(d, name="x")
    text = json.dumps(statefile.render(first, d)).replace('"Count": 2', '"Count": 1')
    saved = spec.parse(text)
    p = plan(saved, name="x")
    assert [i.id for i in p.instances] == ["p-mongodb-1", "p-rockmongo-1"]
    assert p.instance("p-mongodb-1").ports == first.instance("p-mongodb-1").ports


def test_write_replaces_the_file_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    """An existing state file is replaced whole; only the state file remains in the directory."""
    target = tmp_path / "x.json"
    target.write_text("old")
    d = spec.parse(ROCKMONGO)
    statefile.write(target, plan(d, name="x"), d)
    assert json.loads(target.read_text())["Instances"][0]["Id"] == "rockmongo-1"
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails, the previous state file is untouched and the temporary is gone."""
    target = tmp_path / "x.json"
    target.write_text("old")

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    d = spec.parse(ROCKMONGO)
    with pytest.raises(StoreError, match="cannot write state file"):
        statefile.write(target, plan(d, name="x"), d)
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_write_into_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    """The error names the file instead of leaking a traceback."""
    d = spec.parse(ROCKMONGO)
    with pytest.raises(StoreError, match=r"missing/x\.json"):
        statefile.write(tmp_path / "missing" / "x.json", plan(d, name="x"), d)

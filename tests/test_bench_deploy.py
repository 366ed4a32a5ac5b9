"""`python -m bench.deploy_latency --quick` measures one link end to end and cleans up.

One subprocess run (1 link = 2 containers, one round, all three contenders, a few seconds):
it must exit 0, write a JSON file and a Markdown table of the agreed structure, and leave no
container, network, daemon or proxy process behind.  The figures are not judged (a shared
machine); only that they are present and plausible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import docker
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in argv:
                found.append(argv)
    return found


def test_quick_deploy_bench_writes_json_and_table_and_leaves_nothing(
        tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """--quick: 1 link, every contender measured once, medians/derived/markdown present,
    gearproxy verified serving after its deploy returned, and nothing left running."""
    out = tmp_path / "out"
    # Short on purpose: proxy control sockets live under it and AF_UNIX paths stop at 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="gpb-", dir="/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.deploy_latency", "--quick", "--out", str(out),
             "--state-dir", str(state)],
            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads((out / "deploy.json").read_text())
    assert result["errors"] == []
    meta = result["meta"]
    assert meta["sizes"] == [1] and meta["rounds"] == 1
    assert "2N containers" in meta["shape"]
    raw = result["raw"]["1"]
    assert {name: len(rows) for name, rows in raw.items()} == {
        "gearproxy": 1, "docker-cli": 1, "docker-sdk": 1}
    gp = result["medians"]["1"]["gearproxy"]
    assert 0 < gp["deploy_s"] <= gp["verified_s"] < 120
    assert gp["delete_s"] > 0 and gp["proxies"] == 1
    assert gp["plan_s"] is not None and gp["tail_s"] is not None
    assert raw["gearproxy"][0]["timeline"], "progress lines with arrival times"
    for baseline in ("docker-cli", "docker-sdk"):
        assert 0 < result["medians"]["1"][baseline]["up_s"] < 120
    derived = result["derived"]["1"]
    assert derived["containers"] == 2 and derived["links"] == 1
    assert derived["ratio_gp_cli"] > 0
    assert derived["gp_ms_per_container"] == pytest.approx(gp["deploy_s"] * 500)
    assert result["growth_ms_per_added_container"] == []  # one size: nothing to grow

    table = (out / "deploy.md").read_text()
    assert "| N links | containers | gearproxy deploy s |" in table
    assert "\n| 1 | 2 | " in table
    assert table in proc.stdout

    leftovers = docker_client.containers.list(
        all=True, filters={"label": f"io.gearproxy.bench.run={meta['run_id']}"})
    assert leftovers == []
    assert not [c for c in docker_client.containers.list(all=True)
                if c.name.startswith(f"gpb{meta['run_id']}")]
    assert not [n for n in docker_client.networks.list()
                if meta["run_id"] in (n.name or "")]
    assert _processes_mentioning(str(state)) == []  # daemon and proxies are gone

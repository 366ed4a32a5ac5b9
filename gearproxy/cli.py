"""The command line: parse options, call the domain code, render results.

This is the one place that maps `GearproxyError`s to exit codes (0 ok,
1 runtime failure, 2 usage or descriptor error) and prints them as one line
on stderr.  Subcommands defined in other modules (`gearproxy proxy`, …) are
added to the group here, so they get the same mapping.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from gearproxy import __version__
from gearproxy.config import state_dir
from gearproxy.errors import DaemonError, GearproxyError, UsageError

if TYPE_CHECKING:
    from gearproxy import plan, spec
    from gearproxy.orchestrator.api import ApiClient

# The domain modules are imported inside the commands that use them: every link proxy
# starts as `python -m gearproxy proxy`, and importing the planner, the descriptor
# parser and the API client there cost ~0.1 s of CPU per proxy start.


def fail(err: GearproxyError) -> NoReturn:
    """Print `err` as one line and exit with its code."""
    click.echo(f"gearproxy: error: {err.message}", err=True)
    sys.exit(err.exit_code)


# Subcommands that live beside their domain code, imported only when invoked so
# that `gearproxy proxy` (started once per link) does not pay for the docker SDK.
LAZY_COMMANDS: dict[str, str] = {
    "proxy": "gearproxy.proxy.command:proxy_command",
    "install-units": "gearproxy.units:install_units_command",
}


class GearproxyGroup(click.Group):
    """A click group that turns GearproxyError into a one-line message and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GearproxyError as err:
            fail(err)


@click.group(cls=GearproxyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gearproxy")
def main() -> None:
    """Deploy multi-container applications whose links are userspace TCP proxies."""


# -- shared helpers -----------------------------------------------------------------


def _client() -> ApiClient:
    from gearproxy.orchestrator.api import ApiClient, socket_path

    return ApiClient(socket_path(state_dir()))


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _ensure_daemon(client: ApiClient) -> None:
    """Start a daemon in the background when none answers, and say so."""
    if client.ping():
        return
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    logfile = directory / "daemon.log"
    with open(logfile, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "gearproxy", "daemon"], stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.ping():
            click.echo(f"started gearproxy daemon (pid {child.pid}), log: {logfile}", err=True)
            return
        if child.poll() is not None:
            break
        time.sleep(0.1)
    if child.poll() is None:  # alive but silent: do not leave it holding the state dir
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    reason = tail[0].removeprefix("gearproxy: error: ")[:300]
    raise DaemonError(f"gearproxy daemon did not start: {reason} (log: {logfile})")


# -- commands ------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--name", help="Deployment name (default: the file name without .json).")
@click.option("--dry-run", is_flag=True, help="Print the plan; touch neither Docker nor state.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait until every instance runs and every listener accepts.")
@click.option("--publish-address", default=None,
              help="Address public ports listen on (default: every address, 0.0.0.0).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def deploy(file: Path, name: str | None, dry_run: bool, timeout: float,
           publish_address: str | None, as_json: bool) -> None:
    """Deploy the containers and links described in FILE."""
    from gearproxy import planview, spec

    deployment = spec.load(file)
    if name is None:
        name = spec.deployment_name(file)
    if not re.fullmatch(spec.NAME_PATTERN, name):
        raise UsageError(f"--name: {name!r} must match {spec.NAME_PATTERN}")
    if dry_run:
        the_plan = _dry_plan(name, deployment)
        if as_json:
            _emit_json(planview.to_json(the_plan))
        else:
            for line in planview.describe(the_plan):
                click.echo(line)
        return
    client = _client()
    _ensure_daemon(client)
    result = client.request(
        "deploy", progress=_progress, wait=timeout + 60, descriptor=file.read_text(),
        name=name, publish_address=publish_address, timeout=timeout)
    if as_json:
        _emit_json(result)
    else:
        click.echo(f"deployment {name} is {result.get('status', 'deployed')}", err=True)


def _dry_plan(name: str, deployment: spec.Deployment) -> plan.Plan:
    """Plan against the recorded state when there is one, without writing anything."""
    from gearproxy import plan
    from gearproxy.store import FILENAME, Store

    current, taken = plan.CurrentState(), None
    directory = state_dir()
    if (directory / FILENAME).exists():
        with Store.open(directory) as store:
            current = store.current_state(name)
            taken = {"local": store.taken_ports("local", exclude=name)}
    return plan.plan(deployment, current, ("local",), name=name, taken=taken)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def status(name: str | None, as_json: bool) -> None:
    """Show instances, links and proxies of NAME (or of every deployment)."""
    result = _client().request("status", name=name)
    if as_json:
        _emit_json(result)
        return
    for dep in result:
        click.echo(f"deployment {dep['name']}: {dep['status']}")
        for inst in dep["instances"]:
            ports = ", ".join(f"{p['internal']} -> {p['external']}" for p in inst["ports"])
            health = f" ({inst['health']})" if inst.get("health") else ""
            click.echo(f"  instance {inst['id']}: {inst['state']}{health}"
                       f"{'  ports ' + ports if ports else ''}")
        stats = {p["key"]: p for p in dep["proxies"]}
        for link in dep["links"]:
            key = f"{dep['name']}.{link['target']}.{link['target_port']}"
            counters = (stats.get(key) or {}).get("stats") or {}
            totals = counters.get("totals", {}) if isinstance(counters, dict) else {}
            click.echo(f"  link {link['source']}: {link['listen']} -> {link['target']}:"
                       f"{link['target_port']} (localhost:{link['host_port']}) {link['state']}"
                       f"  active {totals.get('active', 0)}"
                       f"  bytes {totals.get('bytes_in', 0)}/{totals.get('bytes_out', 0)}")
        for proxy in dep["proxies"]:
            click.echo(f"  proxy {proxy['key']}: pid {proxy['pid']} {proxy['state']}"
                       f"  restarts {proxy['restarts']}")


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON on stdout.")
def list_(as_json: bool) -> None:
    """List deployments."""
    result = _client().request("list")
    if as_json:
        _emit_json(result)
        return
    for dep in result:
        click.echo(f"{dep['name']}\t{dep['status']}\t{dep['running']}/{dep['instances']} running")


def _verb(op: str, doc: str) -> None:
    @main.command(name=op, help=doc)
    @click.argument("target")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
    def command(target: str, as_json: bool) -> None:
        ids = _client().request(op, target=target, wait=300)
        if as_json:
            _emit_json({"op": op, "instances": ids})
        else:
            for iid in ids:
                click.echo(f"local Container {iid} {op}{'ped' if op == 'stop' else 'ed'}")


_verb("stop", "Stop a deployment's instances (NAME) or one INSTANCE; they stay stopped.")
_verb("start", "Start a deployment's instances (NAME) or one INSTANCE.")
_verb("restart", "Restart a deployment's instances (NAME) or one INSTANCE.")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def delete(name: str, as_json: bool) -> None:
    """Delete deployment NAME: containers, network, proxies, port reservations and state."""
    client = _client()
    _ensure_daemon(client)  # the daemon owns clean-up, so delete works without one running
    result = client.request("delete", name=name, wait=300)
    if as_json:
        _emit_json({"name": name, **result})
    else:
        click.echo(f"deployment {name} {'deleted' if result['deleted'] else 'did not exist'}")


@main.command()
@click.argument("instance")
@click.option("--name", help="The deployment, when two deployments have INSTANCE.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@click.option("--tail", default="all", show_default=True, help="Lines from the end to show.")
def logs(instance: str, name: str | None, follow: bool, tail: str) -> None:
    """Print the output of INSTANCE's container."""
    from gearproxy.engine import Engine

    engine = Engine.connect()
    matches = [c for c in engine.owned_containers(name) if c.instance == instance]
    if not matches:
        raise UsageError(f"no container for instance {instance!r} (see `gearproxy status`)")
    if len(matches) > 1:
        names = ", ".join(sorted(c.deployment for c in matches))
        raise UsageError(f"instance {instance!r} exists in several deployments ({names}): "
                         "say which with --name")
    out = click.get_binary_stream("stdout")
    for chunk in engine.logs(matches[0].id, follow=follow,
                             tail=int(tail) if tail.isdigit() else "all"):
        out.write(chunk)
        out.flush()


@main.command()
@click.option("--publish-address", default="0.0.0.0", show_default=True,
              help="Default address public ports listen on.")
@click.option("--proxy-busy-poll", type=click.IntRange(0, 1_000_000), default=0,
              show_default=True, metavar="USEC",
              help="Run every link proxy with --busy-poll USEC: lower latency for a CPU kept "
                   "busy while traffic flows (0 = off). Running proxies are restarted to apply.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def daemon(publish_address: str, proxy_busy_poll: int, log_level: str) -> None:
    """Run the orchestrator in the foreground (systemd runs this)."""
    import uvloop

    from gearproxy.log import configure
    from gearproxy.orchestrator.daemon import Daemon, DaemonConfig

    configure(log_level)
    uvloop.run(Daemon(DaemonConfig(state_dir(), publish_address, proxy_busy_poll)).run())

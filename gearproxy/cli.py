"""The command line: parse options, call the domain code, render results.

This is the one place that maps `GearproxyError`s to exit codes (0 ok,
1 runtime failure, 2 usage or descriptor error) and prints them as one line
on stderr.  Subcommands defined in other modules (`gearproxy proxy`, …) are
added to the group here, so they get the same mapping.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click

from gearproxy import __version__
from gearproxy.errors import GearproxyError


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

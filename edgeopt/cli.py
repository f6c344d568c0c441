"""The ``edgeopt`` command line.

Subcommand groups are imported only when invoked, so ``edgeopt agent`` on a board never
imports the builder's torch stack.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from edgeopt import __version__


class InputError(click.ClickException):
    """Bad user input: printed as one ``Error:`` line, exit status 2."""

    exit_code = 2


class LazyGroup(click.Group):
    """A click group whose subcommands live in modules imported on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy_commands={
        "devices": "edgeopt.devices.cli:devices",
        "build": "edgeopt.builder.cli:build",
        "bundle": "edgeopt.agent.bundle_cli:bundle",
        "agent": "edgeopt.agent.cli:agent",
        "fleet": "edgeopt.fleet.cli:fleet",
    },
)
@click.version_option(__version__, prog_name="edgeopt")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Build per-device model bundles and serve them on edge boards."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    cli(prog_name="edgeopt")


if __name__ == "__main__":
    main()

"""The `memcompile` command line: inspect, convert, export, calibrate and plan models.

Exit codes: 0 success, 2 bad input or usage, 1 internal error.

One module per command, each registered on the group `main` through COMMANDS; what several
commands share (error handling, progress, loading, common options) is in `common`.
"""

from __future__ import annotations

import click

from . import calibrate, common, convert, export, inspect_cmd, plan

EPILOG_MAIN = inspect_cmd.EPILOG_INSPECT.replace(
    "Examples:", "Examples:\n  memcompile convert --help"
)


class OneLineUsageError(click.UsageError):
    """A usage error shown as the one `error:` line every other bad input gets."""

    def __init__(self, message: str, command_path: str) -> None:
        super().__init__(message)
        self.command_path = command_path

    def show(self, file=None) -> None:
        message = self.message.rstrip(".")
        click.echo(f"error: {message} (see '{self.command_path} --help')", file=file, err=True)


def _one_line(error: click.UsageError, command_path: str) -> click.UsageError:
    # A bare `memcompile` still prints the help: it is not a mistake worth an error line.
    if isinstance(error, click.exceptions.NoArgsIsHelpError):
        return error
    # click leaves `ctx` unset on some parse errors (an option missing its value)
    path = error.ctx.command_path if error.ctx is not None else command_path
    return OneLineUsageError(error.format_message(), path)


class MemcompileGroup(click.Group):
    """click's group, with its usage errors (and its commands') on one line."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _one_line(error, info_name or self.name) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            command = ctx.invoked_subcommand  # set once the command name resolved
            path = f"{ctx.command_path} {command}" if command else ctx.command_path
            raise _one_line(error, path) from None


@click.group(
    cls=MemcompileGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG_MAIN,
)
@click.version_option(package_name="memcompile")
def main() -> None:
    """Compile the FFN blocks of PyTorch models into product-key memory layers."""


def run() -> None:
    """The `memcompile` command: `main` as the process itself (see common.PROCESS_ENTRY)."""
    common.PROCESS_ENTRY = True
    main()


# A new command: a module here defining a click.command, imported above and listed here.
COMMANDS = [
    inspect_cmd.inspect,
    convert.convert,
    export.export,
    calibrate.calibrate,
    plan.plan,
]
for _command in COMMANDS:
    main.add_command(_command)

__all__ = ["COMMANDS", "main", "run"]

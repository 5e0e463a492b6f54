"""The `memcompile` command line: inspect, convert, export, calibrate and plan models.

Exit codes: 0 success, 2 bad input or usage, 1 internal error.

One module per command, each registered on the group `main` through COMMANDS; what several
commands share (error handling, progress, loading, common options) is in `common`.
"""

from __future__ import annotations

import click

from . import calibrate, convert, export, inspect_cmd, plan

EPILOG_MAIN = inspect_cmd.EPILOG_INSPECT.replace(
    "Examples:", "Examples:\n  memcompile convert --help"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG_MAIN)
@click.version_option(package_name="memcompile")
def main() -> None:
    """Compile the FFN blocks of PyTorch models into product-key memory layers."""


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

__all__ = ["COMMANDS", "main"]

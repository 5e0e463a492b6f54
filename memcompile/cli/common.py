"""What the commands of the `memcompile` command line share.

The error handling that maps exceptions to exit codes, the progress steps, model loading,
and the click options that more than one command takes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator

import click

from ..runtime import MemcompileError
from ..runtime.errors import first_line


def _dashed(match: re.Match) -> str:
    return "--" + match.group(0).replace("_", "-")


# The library's errors name its Python arguments; on the command line they name the flags.
_FLAG_SPELLINGS = [
    (r"trust_pickle=True \(--trust-pickle\)", "--trust-pickle"),
    (r"lazy_init=True \(--lazy-init\)", "--lazy-init"),
    (r"force=True \(--force\)", "--force"),
    (r"\bshare_values=False\b", "--no-share"),
    (r"\bdynamic=False\b", "--static"),
    (r"\bgating='swilu'", "--gating swilu"),
    (r"\bgating 'none'", "--gating none"),
    (r"\bmem_size\b", "--mem-size"),
    (r"\bk_dim\b", "--k-dim"),
    (r"\bv_dim\b", "--v-dim"),
    (r"\bknn\b", "--knn"),
    # Words as well as arguments ("4 heads", "at lr 0.1"): only where a check names them.
    (r"(?:^|(?<=: ))(?:heads|lr|seed)(?= must\b)", _dashed),
    (r"\bmesh gpus_per_node\b", "--gpus"),
    (r"\bmesh nodes\b", "--nodes"),
    (r"\bgpu_memory\b", "--gpu-mem"),
    (r"\btokens_per_step\b", "--tokens-per-step"),
    (r"\bbandwidth hbm\b", "--hbm"),
    (r"\bbandwidth intra_node\b", "--intra-node"),
    (r"\bbandwidth inter_node\b", "--inter-node"),
    (r"\bbandwidth host_link\b", "--host-link"),
]


def layer_labels(text: str) -> list[str]:
    """--layers: labels separated by commas, "a-b" for the blocks a to b (inclusive), also
    within a stack ("encoder.0-2")."""
    if not text.strip():
        raise MemcompileError("--layers is empty: name the blocks to convert, e.g. 4,12")
    labels = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise MemcompileError(
                f"--layers {text} has an empty entry: separate labels by single commas, e.g. 4,12"
            )
        span = re.fullmatch(r"(.+\.)?(\d+)-(\d+)", part)
        if span is None:
            labels.append(part)
            continue
        stack, first, last = span.group(1) or "", int(span.group(2)), int(span.group(3))
        if first > last:
            raise MemcompileError(f"--layers {part} runs backwards: write {stack}{last}-{first}")
        labels += [f"{stack}{i}" for i in range(first, last + 1)]
    return labels


def in_flags(message: str) -> str:
    """`message` with the Python argument names it uses spelled as the CLI's flags."""
    for pattern, flag in _FLAG_SPELLINGS:
        # (?<!-): a message may name the flag already ("--knn"), which stays as it is
        message = re.sub(f"(?<!-){pattern}", flag, message)
    return message


class Terminated(BaseException):
    """SIGTERM (`timeout`, `kill`, a cancelled CI job), raised where the command was, so that
    what it staged is removed as after Ctrl-C. A BaseException: no `except Exception` in
    the library may take it for a failure of its own."""


def _raise_terminated(signum, frame):
    raise Terminated


# True where the command is the process (`memcompile`, `python -m memcompile.cli`: cli.run),
# not a call inside another program (click's CliRunner).
PROCESS_ENTRY = False


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers: main only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        raise
    # The outputs are in place: a SIGTERM while the process exits must not end it with the
    # status that says nothing was written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if PROCESS_ENTRY else previous)


def fail_cleanly(command):
    """Bad input -> one line on stderr and exit 2; anything else -> exit 1; Ctrl-C and
    SIGTERM leave nothing written (exit 130 and 143, as the signals' own)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_raises():
                return command(*args, **kwargs)
        except Terminated:
            click.echo("terminated: nothing was written", err=True)
            sys.exit(143)
        except MemcompileError as error:
            # Only our line: torch.fx appends the graph node it was executing.
            click.echo(f"error: {in_flags(first_line(error))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # stdout's reader left (`| head -1`): nothing is wrong with the work. Quiet the
            # flush at exit, and end as a process stopped by SIGPIPE does (128 + 13).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except click.exceptions.Exit:
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            click.echo(f"internal error: {type(error).__name__}: {error}", err=True)
            sys.exit(1)

    return wrapper


class Steps:
    """A progress bar per step that may take more than a second, on a terminal's stderr;
    silent when quiet or when stderr is a file or a pipe (bars would litter a log)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()

    @contextlib.contextmanager
    def __call__(self, description: str):
        if self.quiet:
            yield
            return
        from tqdm import tqdm

        with tqdm(
            total=1,
            desc=description,
            file=sys.stderr,
            leave=True,
            bar_format="{desc}: {bar:20} {elapsed}",
        ) as bar:
            yield
            bar.update(1)


def _apply(command, options):
    """Apply click options so that they appear in --help in the order listed."""
    for option in reversed(options):
        command = option(command)
    return command


def model_options(command):
    """--trust-remote-code, --trust-pickle, --config: how to load a model."""
    return _apply(
        command,
        [
            click.option(
                "--trust-remote-code",
                is_flag=True,
                help="allow HF models that need code from their repository",
            ),
            click.option(
                "--trust-pickle",
                is_flag=True,
                help="allow loading a pickled module (runs code from the file)",
            ),
            click.option(
                "--config",
                "config_path",
                type=click.Path(exists=True),
                help="HF config.json giving the architecture of a bare state_dict",
            ),
        ],
    )


def memory_options(command):
    """The MemoryConfig fields besides mem_size and mode, passed on as keyword arguments."""
    return _apply(
        command,
        [
            click.option("--heads", type=int, default=4, show_default=True),
            click.option("--knn", type=int, default=32, show_default=True),
            click.option("--k-dim", type=int, help="key width (default: min(512, d_model))"),
            click.option("--v-dim", type=int, help="value width (default: d_model)"),
            click.option(
                "--gating",
                type=click.Choice(["swilu", "none"]),
                default="swilu",
                show_default=True,
            ),
            click.option(
                "--share/--no-share",
                "share_values",
                default=True,
                show_default=True,
                help="one value table for all converted layers",
            ),
            click.option("--qk-norm/--no-qk-norm", default=False, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--dtype",
                type=click.Choice(["float32", "float16", "bfloat16"]),
                help="dtype of the memory's parameters (default: the block's)",
            ),
        ],
    )


def json_option(help_text: str):
    return click.option("--json", "as_json", is_flag=True, help=help_text)


quiet_option = click.option("--quiet", "-q", is_flag=True, help="no progress bars")
force_option = click.option("--force", is_flag=True, help="overwrite an existing output")


def checkpoint_output_options(help_text: str = "checkpoint directory to write"):
    """-o/--output and --force: commands that write a checkpoint."""

    def decorate(command):
        output = click.option("-o", "--output", required=True, type=click.Path(), help=help_text)
        return _apply(command, [output, force_option])

    return decorate


def result_options(command):
    """--json and --quiet: commands that report what they wrote."""
    return _apply(command, [json_option("print the result as JSON"), quiet_option])


def steps_for(quiet: bool, as_json: bool) -> Steps:
    """Progress bars, unless asked for quiet or for JSON (which must be all of stdout)."""
    return Steps(quiet or as_json)


def echo_json(result: dict) -> None:
    click.echo(json.dumps(result, indent=2))


def memory_config(mem_size, **options):
    from ..runtime import MemoryConfig

    return MemoryConfig(mem_size=mem_size, **options)


def load(path, steps, trust_remote_code, trust_pickle, config_path, materialize=True):
    from ..model_io import load_model

    if steps.quiet:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    with steps(f"loading {path}"):
        return load_model(
            path, trust_remote_code=trust_remote_code, trust_pickle=trust_pickle,
            config=config_path, materialize=materialize,
        )  # fmt: skip

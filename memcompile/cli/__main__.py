"""`python -m memcompile.cli`: the same as the `memcompile` command."""

from . import run

if __name__ == "__main__":
    run()

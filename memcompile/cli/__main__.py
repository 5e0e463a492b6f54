"""`python -m memcompile.cli`: the same as the `memcompile` command."""

from . import main

if __name__ == "__main__":
    main()

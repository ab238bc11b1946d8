"""``python -m simulators``: the same as the ``simulate`` command."""

from simulators.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

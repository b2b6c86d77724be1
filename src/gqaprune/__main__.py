"""``python -m gqaprune ...``: the same entry point as the ``gqaprune`` command."""

from gqaprune.cli import main

raise SystemExit(main())

"""``python -m nmbridge``: the same as the ``nmbridge`` command."""

from nmbridge.cli import main

raise SystemExit(main())

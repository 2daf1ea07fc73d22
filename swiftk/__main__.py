"""``python -m swiftk`` is the ``swiftk`` command."""

from swiftk.kernel.cli import main

raise SystemExit(main())

"""``python -m forgeqmp``: the CLI."""

from forgeqmp.cli import main

raise SystemExit(main())

"""``python -m forgeqmp.testing setup|check``: see :mod:`forgeqmp.testing.setup`."""

from forgeqmp.testing.setup import main

raise SystemExit(main())

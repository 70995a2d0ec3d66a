"""``python -m qolora.cli``: the ``qolora`` command."""

from .commands import main

raise SystemExit(main())

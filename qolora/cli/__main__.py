"""``python -m qolora.cli``: the ``qolora`` command."""

from .main import main

raise SystemExit(main())

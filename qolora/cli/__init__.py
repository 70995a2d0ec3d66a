"""The ``qolora`` command: finetune, merge, export, info, chat and plan (:mod:`qolora.cli.commands`)."""

from ..moved_modules import forward_names

# qolora 0.5's qolora.cli module (``from qolora.cli import main, build_parser``): its names, for one release
__getattr__ = forward_names("qolora.cli", "qolora.cli.commands")

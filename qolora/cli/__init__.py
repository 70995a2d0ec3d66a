"""The ``qolora`` command: finetune, merge, export, info, chat and plan."""

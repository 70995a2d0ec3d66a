"""The error bad user input raises everywhere in qolora: one exception listing every problem found."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad user input to qolora; the message lists every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else "\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)

"""The error bad user input raises everywhere in qolora: one exception listing every problem found."""

from __future__ import annotations

__all__ = ["ConfigError", "Problems"]


class ConfigError(ValueError):
    """Bad user input to qolora; the message lists every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else "\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)


class Problems(list):
    """The problems found so far, gathered to be raised together as one :class:`ConfigError`."""

    def check(self, fn, *args):
        """``fn(*args)``; if it raises a ConfigError (its problems) or a ValueError (its message), that is
        added here and None returned."""
        try:
            return fn(*args)
        except ConfigError as exc:
            self.extend(exc.problems)
        except ValueError as exc:
            self.append(str(exc))
        return None

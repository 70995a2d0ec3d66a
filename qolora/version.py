"""The version of qolora (one place: the package, the adapter records and pyproject read it)."""

__version__ = "0.6.1"

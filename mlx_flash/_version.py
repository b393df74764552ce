"""The package version, in a module of its own: the bundle writer records it, and importing
the package's `__init__` (which names the public API) would pull in everything above it."""

__version__ = "0.1.0"

"""The code version, in one place: the package metadata reads it, and every store manifest and
result file records it as ``code_version``."""

__version__ = "0.2.0"

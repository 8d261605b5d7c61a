"""tlpersona: extract and compare persona vectors from chat models' residual streams."""

from tlpersona.errors import TlpersonaError

__version__ = "0.1.0"

__all__ = ["TlpersonaError", "__version__"]

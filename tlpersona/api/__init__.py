"""The typed API behind ``tlpersona``'s front door (see :mod:`tlpersona`)."""

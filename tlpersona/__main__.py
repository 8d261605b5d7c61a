"""``python -m tlpersona …`` (and ``torchrun -m tlpersona …``) runs the CLI."""

from tlpersona.cli import main

main()

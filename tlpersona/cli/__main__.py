"""``python -m tlpersona.cli …`` runs the CLI, as ``python -m tlpersona …`` does."""

from tlpersona.cli import main

main()

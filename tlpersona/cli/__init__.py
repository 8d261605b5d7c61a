"""Command line: click declarations that parse strings into typed values and call the API
(:mod:`tlpersona`).

Errors a user can cause are :class:`TlpersonaError`: printed as one line, exit code 2. The
library names parameters in backticks (`batch_size`); here they become the flags that set them
(--batch-size).

This module holds the ``tlpersona`` group and puts every command on it; the commands live in
one module per kind of work (:mod:`~tlpersona.cli.extract`, :mod:`~tlpersona.cli.store`,
:mod:`~tlpersona.cli.analyse`, :mod:`~tlpersona.cli.intervene`), on the string parsers
(:mod:`~tlpersona.cli.parse`), the shared options (:mod:`~tlpersona.cli.options`), the error
line (:mod:`~tlpersona.cli.errors`) and the printed summaries (:mod:`~tlpersona.cli.output`).
Nothing heavier than click loads at startup: each command imports what it runs when it runs.
"""

from __future__ import annotations

import click

from tlpersona.cli.analyse import compare, project, subspace, trajectory
from tlpersona.cli.extract import extract, generate, positions, prompts
from tlpersona.cli.intervene import experiment, intervention, patch, steer
from tlpersona.cli.store import export, verify


@click.group()
@click.version_option(package_name="tlpersona")
def main() -> None:
    """tlpersona: persona vectors from chat models' residual streams, through TransformerLens.

    Layer l means the output of block l (blocks.{l}.hook_resid_post = HF hidden_states[l+1]).
    """


for _command in (extract, generate, prompts, positions, verify, export, compare, experiment,
                 subspace, project, trajectory, patch, steer, intervention):
    main.add_command(_command)

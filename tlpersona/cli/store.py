"""Commands on a finished store: ``verify`` it against its manifest, ``export`` it (seed layout,
W&B artifact, one persona's vectors)."""

from __future__ import annotations

import click

import tlpersona.cli.parse as parse
from tlpersona.cli.errors import friendly
from tlpersona.cli.options import stored_layers_help
from tlpersona.errors import TlpersonaError


@click.command()
@click.argument("store", type=click.Path())
@friendly
def verify(store: str) -> None:
    """Re-check every file of a store against its manifest (presence, sha256, shapes)."""
    from tlpersona.cache.reader import check_store

    check = check_store(store)
    if check.problems:
        raise TlpersonaError(f"{store} fails verification: {'; '.join(check.problems)}")
    for note in check.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{store}: every file matches the manifest")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--seed-layout", type=click.Path(), default=None,
              help="write method_<x>/all_centroids.pt, <role>.pt, <role>__per_q.pt here")
@click.option("--wandb-project", default=None, help="log the store as a W&B artifact")
@click.option("--vectors", default=None,
              help="write one persona's vectors: gguf (llama.cpp control vector), safetensors, "
                   "pt, npz, npy (one layer)")
@click.option("--persona", default=None, help="with --vectors: the persona")
@click.option("--position", default=None, help="with --vectors: the recipe (a stored position)")
@click.option("--layers", default=None, help="with --vectors: " + stored_layers_help)
@click.option("--out", default=None, type=click.Path(), help="with --vectors: the file to write")
@click.option("--overwrite", is_flag=True, help="with --vectors: replace an existing --out file")
@friendly
def export(store: str, seed_layout: str | None, wandb_project: str | None, vectors: str | None,
           persona: str | None, position: str | None, layers: str | None, out: str | None,
           overwrite: bool) -> None:
    """Export a store for older code (seed layout), log it as a W&B artifact, and/or write one
    persona's vectors for llama.cpp, steering libraries or numpy (--vectors)."""
    from tlpersona.api.analysis import export_vectors, vector_request
    from tlpersona.cache import open_store

    if seed_layout is None and wandb_project is None and vectors is None:
        raise TlpersonaError("nothing to do: give --seed-layout DIR, --wandb-project NAME "
                             "and/or --vectors FORMAT")
    if vectors is None and any(v is not None for v in (persona, position, layers, out)):
        raise TlpersonaError("--persona, --position, --layers and --out go with --vectors")
    if vectors is not None and not (persona and position and out):
        raise TlpersonaError("--vectors needs --persona, --position and --out")
    if seed_layout:  # before the store is read or a vector written
        from tlpersona.cache.seed_layout import check_seed_root

        check_seed_root(seed_layout)
    wanted = parse.stored_layers(layers)
    if vectors is not None:  # every request checked before the store is read or anything written
        vector_request(str(persona), str(position), vectors, str(out), wanted, overwrite)
    st = open_store(store, verify=True)
    if vectors is not None:
        vecs = export_vectors(st, str(persona), str(position), vectors, str(out), wanted,
                              overwrite)
        click.echo(f"{vectors}: {persona} {position} layers {','.join(map(str, vecs))} -> {out}")
    if seed_layout:
        from tlpersona.cache.seed_layout import export_seed

        dirs = export_seed(st, seed_layout)
        click.echo(f"seed layout: {len(dirs)} methods in {seed_layout}")
    if wandb_project:
        from tlpersona.cache.wandb import log_wandb

        click.echo(f"W&B artifact: {log_wandb(st, wandb_project)}")

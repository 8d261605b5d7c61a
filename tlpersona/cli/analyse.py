"""Read-only analyses of a store: ``compare`` (with ``--against``, across two models'
stores), ``subspace``, ``project`` and ``trajectory``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

import tlpersona.cli.parse as parse
from tlpersona.cli.errors import flags, friendly
from tlpersona.cli.options import (
    batch_option,
    compare_options,
    holding_out,
    overwrite_option,
    stored_layers_help,
)
from tlpersona.cli.output import found, print_summary, print_trajectory, subspace_line
from tlpersona.errors import TlpersonaError


def _source(store: str | None, seed_dir: str | None) -> Any:
    """A seed-layout source (read now: it is small), or the store's path, which the API opens
    and verifies after checking every option."""
    from tlpersona.cache.seed_layout import read_seed

    if (store is None) == (seed_dir is None):
        raise TlpersonaError("give either STORE or --from-seed DIR")
    return read_seed(seed_dir) if seed_dir else Path(str(store))


@click.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout (method_<x>/all_centroids.pt) instead")
@click.option("--out", default="tlpersona-out/compare", show_default=True, type=click.Path())
@click.option("--layers", default=None, help=stored_layers_help)
@click.option("--positions", default=None, help="positions to compare (default: the seven recipes)")
@click.option("--against", type=click.Path(), default=None,
              help="STORE_B: a store of the same personas and questions from another model; "
                   "compares each recipe's persona geometry across the two models")
@click.option("--layers-a", default=None,
              help="with --against: STORE's layers, paired in order with --layers-b (default: "
                   "the block numbers both stores hold, when the models have the same depth)")
@click.option("--layers-b", default=None, help="with --against: STORE_B's layers (see --layers-a)")
@compare_options
@overwrite_option
@friendly
@holding_out
def compare(store: str | None, seed_dir: str | None, out: str, layers: str | None,
            positions: str | None, against: str | None, layers_a: str | None,
            layers_b: str | None, permutations: int | None, seed: int, splits: int,
            null_draws: int, overwrite: bool,
            **thresholds: Any) -> None:
    """Compare recipes in a store: metrics, permutation tests, noise floor, verdicts, report.
    With --against STORE_B: each recipe's persona geometry in two models."""
    from tlpersona.analyses.compare.result import Thresholds
    from tlpersona.api.analysis import compare as run

    path = Path(out)
    if against is not None:
        _compare_models(store, seed_dir, against, path, layers, positions, layers_a, layers_b,
                        permutations, seed, splits, null_draws, overwrite, list(thresholds))
        return
    if layers_a is not None or layers_b is not None:
        raise TlpersonaError("`layers_a` and `layers_b` pair the layers of two stores: give "
                             "them with `against`")
    result = run(_source(store, seed_dir), layers=parse.stored_layers(layers),
                 positions=parse.items(positions) if positions else None, permutations=permutations,
                 seed=seed, splits=splits, null_draws=null_draws,
                 thresholds=Thresholds(**thresholds))
    report = result.save(path, overwrite=overwrite)
    print_summary(result)
    click.echo(f"report: {report}")


def _compare_models(store: str | None, seed_dir: str | None, against: str, out: Path,
                    layers: str | None, positions: str | None, layers_a: str | None,
                    layers_b: str | None, permutations: int | None, seed: int, splits: int,
                    null_draws: int, overwrite: bool, threshold_names: list[str]) -> None:
    """``compare STORE --against STORE_B``: the options that mean something across two models
    are passed on; the others are refused, one line naming the first."""
    from click.core import ParameterSource

    from tlpersona.api.cross_model import compare_models

    ctx = click.get_current_context()
    if seed_dir is not None:
        raise TlpersonaError("`seed_dir` does not apply with `against`: give both stores "
                             "(a seed layout records no persona or question hashes to check)")
    if store is None:
        raise TlpersonaError("give STORE (the first model's store) with `against`")
    if layers is not None:
        raise TlpersonaError("`layers` does not apply with `against`: pair the two stores' "
                             "layers with `layers_a` and `layers_b`")
    given = [n for n in threshold_names if ctx.get_parameter_source(n) != ParameterSource.DEFAULT]
    if given:
        raise TlpersonaError(f"`{given[0]}` does not apply with `against`: PASS/GREY/KILL bounds "
                             "rest on per-persona cosines, which are not defined across models "
                             "(the calls are agree / differ / cannot tell)")
    result = compare_models(Path(store), Path(against), positions=parse.items(positions) if positions
                            else None, layers_a=parse.stored_layers_pair(layers_a, "layers_a"),
                            layers_b=parse.stored_layers_pair(layers_b, "layers_b"),
                            permutations=permutations, seed=seed, splits=splits,
                            null_draws=null_draws)
    report = result.save(out, overwrite=overwrite)
    click.echo(result.answer)
    for r in result.recipe_answers:
        click.echo(f"- {r.sentence}")
    for note in result.notes[1:]:  # the first says why per-persona cosine is left out
        click.echo(f"- {flags(note)}")
    click.echo(f"report: {report}")


@click.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout instead of a store")
@click.option("--out", default="tlpersona-out/subspace", show_default=True, type=click.Path())
@click.option("--layers", default=None, help=stored_layers_help)
@click.option("--positions", default=None, help="recipes to stack (default: the seven recipes)")
@click.option("--k-max", type=int, default=50, show_default=True)
@click.option("--unit-norm/--raw-scale", default=True, show_default=True,
              help="scale each recipe to unit total variance before the PCA (--raw-scale: keep "
                   "each recipe's own scale, so the largest recipe dominates)")
@click.option("--seed", type=int, default=0, show_default=True, help="held-out persona split")
@click.option("--align", type=click.Choice(["none", "procrustes"]), default="none", show_default=True,
              help="procrustes: also rotate each recipe onto a common frame before the PCA, so "
                   "the same geometry in a rotated basis counts as shared")
@click.option("--null-draws", type=int, default=100, show_default=True,
              help="relabelled reruns behind the descriptive k_found column (the test needs none; "
                   "0 runs none)")
@overwrite_option
@friendly
@holding_out
def subspace(store: str | None, seed_dir: str | None, out: str, layers: str | None,
             positions: str | None, k_max: int, unit_norm: bool, seed: int, align: str,
             null_draws: int, overwrite: bool) -> None:
    """Joint PCA of all recipes: the persona subspace they share, and its dimension per layer."""
    from tlpersona.api.analysis import subspace as run

    path = Path(out)
    result = run(_source(store, seed_dir), layers=parse.stored_layers(layers),
                 positions=parse.items(positions) if positions else None, k_max=k_max,
                 unit_norm=unit_norm, seed=seed, align=align, null_draws=null_draws)
    report = result.save(path, overwrite=overwrite)
    for lay in result.layers:
        click.echo(subspace_line(lay))
        if lay.aligned is not None:
            click.echo(f"  aligned (procrustes): {found(lay.aligned)}")
    click.echo(f"report: {report}")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--out", default="tlpersona-out/project", show_default=True, type=click.Path())
@click.option("--layer", type=int, default=None, help="a stored layer (default: the middle one)")
@click.option("--positions", default=None, help="recipes to project (default: all stored)")
@click.option("--axis", default="persona:assistant", show_default=True,
              help="'pcs' (shared PCs of the stored recipes) or 'persona:NAME' (NAME minus the "
                   "mean of the other personas)")
@click.option("--k", type=int, default=2, show_default=True, help="number of shared PCs")
@click.option("--unit-norm/--raw-scale", default=True, show_default=True,
              help="PCs fitted on recipes scaled to unit total variance (as `subspace` does)")
@click.option("--system", "systems", multiple=True, help="system prompt of a new persona")
@click.option("--question", "questions", multiple=True,
              help="question(s) for the new persona(s) (repeat; averaged; default: the store's "
                   "own questions, which makes the nearest-persona p exact)")
@click.option("--store-questions", default="builtin", show_default=True,
              help="the question set the store was made with ('builtin' or a questions JSONL), "
                   "for --system items without --question")
@click.option("--conversations", type=click.Path(), default=None,
              help="JSONL: each line a list of chat messages with a system and a user message")
@click.option("--text", "texts", multiple=True,
              help="raw text, read at its last token without a template (raw_system_last)")
@click.option("--model", default=None, help="default: the store's model")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@overwrite_option
@friendly
@holding_out
def project(store: str, out: str, layer: int | None, positions: str | None, axis: str, k: int,
            unit_norm: bool, systems: tuple[str, ...], questions: tuple[str, ...],
            conversations: str | None, texts: tuple[str, ...], model: str | None,
            device: str | None, dtype: str | None, store_questions: str,
            overwrite: bool) -> None:
    """Project stored personas, and new material, onto shared PCs or a persona axis."""
    from tlpersona.api.analysis import project as run
    from tlpersona.data.conversations import load_system_user_pairs

    path = Path(out)
    result = run(store, layer=layer, positions=parse.items(positions) if positions else None,
                 axis=axis, k=k, unit_norm=unit_norm,
                 systems=[(s, list(questions)) for s in systems],
                 conversations=(load_system_user_pairs(conversations)
                                if conversations is not None else []),
                 texts=list(texts), model=model,
                 device=device, dtype=dtype, questions=parse.questions(store_questions))
    written = result.save(path, overwrite=overwrite)
    for pt in result.points:
        if pt.nearest is not None:  # a new item
            coords = ", ".join(f"{k_}={v:+.3f}" for k_, v in pt.coords.items())
            click.echo(f"{pt.label} [{pt.recipe}]: {coords}; nearest: {pt.nearest.text()}")
    for c in result.combined:
        click.echo(f"combined: {c.text()}")
    click.echo(f"written: {written}")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--conversations", default="builtin", show_default=True,
              help="JSONL: each line a list of chat messages (system, user, assistant; any number "
                   "of turns) or {\"messages\": [...], \"persona\": NAME, \"label\": TEXT}; "
                   "'builtin': two built-in multi-turn conversations")
@click.option("--out", default="tlpersona-out/trajectory", show_default=True, type=click.Path())
@click.option("--axis", default="persona:assistant", show_default=True,
              help="'persona:NAME' (NAME minus the mean of the other personas) or 'pc:K' "
                   "(shared PC K)")
@click.option("--subspace", type=click.Path(), default=None,
              help="with --axis pc:K: a subspace output directory of this store whose PCs to use "
                   "(default: fitted on the stored recipes as the subspace command fits them)")
@click.option("--position", default=None,
              help="the recipe whose frame, axis and bands are used (default: response_mean "
                   "where stored)")
@click.option("--layer", type=int, default=None, help="a stored layer (default: the middle one)")
@click.option("--band", default="5,95", show_default=True,
              help="LOW,HIGH percentiles of the bands (by order statistics)")
@click.option("--personas", default="builtin", show_default=True,
              help="the persona set the store was made with ('builtin' or an assistant-axis "
                   "directory): a system message that is one of their prompts names its persona")
@click.option("--model", default=None, help="default: the store's model")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@batch_option
@overwrite_option
@friendly
def trajectory(store: str, conversations: str, out: str, axis: str, subspace: str | None,
               position: str | None, layer: int | None, band: str, personas: str,
               model: str | None, device: str | None, dtype: str | None, batch_size: str,
               overwrite: bool) -> None:
    """Drift along a persona axis or shared PC: every assistant turn and every token of
    multi-turn conversations, against the band the stored personas occupy."""
    from tlpersona.api.trajectory import load_conversations
    from tlpersona.api.trajectory import trajectory as run
    from tlpersona.infra.paths import check_results_dir

    path = Path(out)
    check_results_dir(path, overwrite)  # before the model loads
    result = run(store, model,
                 None if conversations == "builtin" else load_conversations(conversations),
                 axis=axis, position=position, layer=layer, subspace=subspace,
                 personas=None if personas == "builtin" else parse.personas(personas),
                 band=parse.numbers(band, "band"), batch_size=parse.batch_size(batch_size), device=device,
                 dtype=dtype)
    written = result.save(path, overwrite=overwrite)
    print_trajectory(result)
    click.echo(f"written: {written}")

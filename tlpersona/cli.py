"""Command line: click declarations that parse strings into typed values and call the API
(:mod:`tlpersona`).

Errors a user can cause are :class:`TlpersonaError`: printed as one line, exit code 2. The
library names parameters in backticks (`batch_size`); here they become the flags that set them
(--batch-size).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from tlpersona.errors import TlpersonaError

if TYPE_CHECKING:
    from tlpersona.api.trajectory import TrajectoryResult

#: API parameter -> flag, where a command's flag is not the parameter's own name.
_RENAMED = {"seed_dir": "--from-seed", "format": "--vectors", "systems": "--system",
            "texts": "--text"}


def _flags(message: str) -> str:
    """``message`` with every backticked parameter name written as the current command's flag
    for it (or as the bare name where the command has none)."""
    names = dict(_RENAMED)
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx else []:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = opt
        elif param.name:
            names[param.name] = param.name.upper()
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: names.get(m[1], m[1]), message)


def _friendly(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlpersonaError as exc:
            click.echo(f"error: {_flags(str(exc))}", err=True)
            sys.exit(2)

    return wrapper


# ------------------------------------------------------------------------------------------
# string parsing: the only place it happens


def _prompt_index(value: str) -> int | Literal["all"]:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise TlpersonaError(f"`prompt_index` must be an integer or 'all', not {value!r}") from None


def _batch_size(value: str) -> int | None:
    """``auto`` (None: sized from free GPU memory) or a positive integer."""
    if value == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise TlpersonaError(f"`batch_size` must be a positive integer or 'auto', not {value!r}") from None
    if size < 1:
        raise TlpersonaError("`batch_size` must be at least 1")
    return size


def _items(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _layers(value: str | None, default: Any = "default") -> Any:
    """One layer syntax for every command: ``default``, ``all``, or comma-separated block
    indices (negative from the end)."""
    if value is None:
        return default
    if value in ("default", "all"):
        return value
    try:
        return [int(x) for x in _items(value)]
    except ValueError:
        raise TlpersonaError(f"bad `layers` {value!r}: block indices (e.g. 7,14,-1), 'default' "
                             "or 'all'") from None


def _stored_layers(value: str | None) -> list[int] | None:
    """``--layers`` of a command that reads a store: every stored layer by default or ``all``."""
    got = _layers(value, None)
    if got in (None, "all"):
        return None
    if got == "default":
        raise TlpersonaError("`layers` default means every stored layer here: leave it out")
    return got


def _numbers(value: str, name: str) -> list[float]:
    try:
        return [float(a) for a in _items(value)]
    except ValueError:
        raise TlpersonaError(f"`{name}` must be comma-separated numbers, not {value!r}") from None


def _personas(spec: str, limit: int | None = None, param: str = "personas") -> Any:
    from tlpersona.data import load_personas

    return load_personas(spec, limit, param)


def _questions(spec: str, limit: int | None = None) -> Any:
    from tlpersona.data import load_questions

    return load_questions(spec, limit)


# ------------------------------------------------------------------------------------------
# shared options


_batch_option = click.option(
    "--batch-size", default="auto", show_default=True,
    help="rows per batch, or auto: generation and extraction each sized from free GPU memory, "
         "the model and the sequence lengths (16 and 8 on the CPU)")


_overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="replace earlier tlpersona results in --out (never files it did not write there)")


def _model_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--model", default="default", show_default=True,
                     help="'default' (SmolLM2-135M-Instruct), a hub id, a model dir or a .gguf"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)"),
        click.option("--dtype", default=None, help="fp32/bf16/fp16 (default: bf16 on GPU, fp32 on CPU)"),
    ]):
        fn = opt(fn)
    return fn


_decoder_option = click.option(
    "--decoder", type=click.Choice(["auto", "hf", "static"]), default="auto", show_default=True,
    help="greedy decoding: HF generate, or a static KV cache with CUDA graphs (same tokens, "
         "several times faster on a GPU); auto = static on GPU, hf on CPU")

_device_map_option = click.option(
    "--device-map", type=click.Choice(["auto", "balanced", "sequential"]), default=None,
    help="spread a model too large for one GPU over all visible GPUs (accelerate device map)")

_attn_option = click.option(
    "--attn", type=click.Choice(["auto", "sdpa", "eager"]), default="auto", show_default=True,
    help="attention inside the bridge: HF's sdpa (fast; attention-pattern hooks off) or the "
         "bridge's eager; auto = sdpa on GPU, eager on CPU")

_layers_help = "comma-separated block indices (negative from the end), 'default' or 'all'"
_stored_layers_help = "comma-separated stored layers (negative from the end; default: all stored)"


def _data_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--personas", default="builtin", show_default=True,
                     help="'builtin' or an assistant-axis directory (role_list.json, instructions/)"),
        click.option("--questions", default="builtin", show_default=True,
                     help="'builtin' or a JSONL file of {\"question\", \"id\"}"),
        click.option("--prompt-index", default="0", show_default=True,
                     help="which system-prompt phrasing per persona, or 'all' to average them"),
        click.option("--limit-personas", type=int, default=None, help="keep the first N personas"),
        click.option("--limit-questions", type=int, default=None, help="keep the first N questions"),
    ]):
        fn = opt(fn)
    return fn


@click.group()
@click.version_option(package_name="tlpersona")
def main() -> None:
    """tlpersona: persona vectors from chat models' residual streams, through TransformerLens.

    Layer l means the output of block l (blocks.{l}.hook_resid_post = HF hidden_states[l+1]).
    """


@main.command()
@_model_options
@_data_options
@click.option("--positions", default="last,sys_end,sys_end+1", show_default=True,
              help="comma-separated positions or recipe aliases "
                   "(a,b,bstar,bstar_no_last,c1,c2,c3); recipes = all seven (alias all6)")
@click.option("--layers", default="default", show_default=True, help=_layers_help)
@click.option("--out", default="tlpersona-out/store", show_default=True, type=click.Path())
@_batch_option
@click.option("--max-new-tokens", type=int, default=None,
              help="response length when responses must be generated (default 200 GPU, 48 CPU)")
@click.option("--responses", default=None, type=click.Path(),
              help="responses JSONL made elsewhere (default: OUT/responses.jsonl, generated if needed)")
@click.option("--include-eot", is_flag=True, help="response_mean also averages the end-of-turn token")
@click.option("--force-new", is_flag=True, help="replace an existing store at --out")
@_attn_option
@_decoder_option
@_device_map_option
@_friendly
def extract(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
            prompt_index: str, limit_personas: int | None, limit_questions: int | None,
            positions: str, layers: str, out: str, batch_size: str, max_new_tokens: int | None,
            responses: str | None, include_eot: bool, force_new: bool, attn: str, decoder: str,
            device_map: str | None) -> None:
    """Extract residual-stream vectors at named positions into an activation store."""
    from tlpersona.api.extraction import extract as run

    t0 = time.perf_counter()
    store = run(model, _personas(personas, limit_personas), _questions(questions, limit_questions),
                positions=_items(positions), layers=_layers(layers), out=out,
                prompt_index=_prompt_index(prompt_index), batch_size=_batch_size(batch_size),
                max_new_tokens=max_new_tokens, responses=responses, include_eot=include_eot,
                force_new=force_new, device=device, dtype=dtype, attn=attn, decoder=decoder,
                device_map=device_map)
    click.echo(f"store written to {store.root} in {time.perf_counter() - t0:.1f} s")


@main.command()
@_model_options
@_data_options
@click.option("--out", default="tlpersona-out/responses.jsonl", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None, help="default 200 on GPU, 48 on CPU")
@_batch_option
@_decoder_option
@_device_map_option
@_friendly
def generate(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
             prompt_index: str, limit_personas: int | None, limit_questions: int | None,
             out: str, max_new_tokens: int | None, batch_size: str, decoder: str,
             device_map: str | None) -> None:
    """Greedy responses for every persona x question (resumable JSONL with token ids; the same
    format `extract --responses` reads, so any engine can write it)."""
    from tlpersona.api.extraction import generate as run

    t0 = time.perf_counter()
    got = run(model, _personas(personas, limit_personas), _questions(questions, limit_questions),
              out=out, prompt_index=_prompt_index(prompt_index), max_new_tokens=max_new_tokens,
              batch_size=_batch_size(batch_size), device=device, dtype=dtype, decoder=decoder,
              device_map=device_map)
    click.echo(f"{len(got)} responses in {out} ({time.perf_counter() - t0:.1f} s)")


@main.command()
@click.option("--model", default="default", show_default=True)
@_data_options
@click.option("--out", default="tlpersona-out/prompts.jsonl", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
@_friendly
def prompts(model: str, personas: str, questions: str, prompt_index: str,
            limit_personas: int | None, limit_questions: int | None, out: str,
            overwrite: bool) -> None:
    """Write the templated prompts (token ids and text) for another engine to continue; read
    its responses back with `extract --responses` (see README, Python API)."""
    from tlpersona.api.extraction import write_prompts

    n = write_prompts(model, _personas(personas, limit_personas),
                      _questions(questions, limit_questions), out=out,
                      prompt_index=_prompt_index(prompt_index), overwrite=overwrite)
    click.echo(f"{n} prompts in {out}")


@main.command()
@click.option("--model", default="default", show_default=True)
@click.option("--system", default="You are a pirate captain who has spent forty years at sea.",
              show_default=True)
@click.option("--question", default="What is the best way to spend a free afternoon?",
              show_default=True)
@click.option("--positions", default="recipes", show_default=True)
@_friendly
def positions(model: str, system: str, question: str, positions: str) -> None:
    """Print one templated example with every position marked on its token."""
    from tlpersona.api.inspect import describe_positions

    click.echo(describe_positions(model, system, question, _items(positions)))


@main.command()
@click.argument("store", type=click.Path())
@_friendly
def verify(store: str) -> None:
    """Re-check every file of a store against its manifest (presence, sha256, shapes)."""
    from tlpersona.cache.reader import check_store

    check = check_store(store)
    if check.problems:
        raise TlpersonaError(f"{store} fails verification: {'; '.join(check.problems)}")
    for note in check.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{store}: every file matches the manifest")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--seed-layout", type=click.Path(), default=None,
              help="write method_<x>/all_centroids.pt, <role>.pt, <role>__per_q.pt here")
@click.option("--wandb-project", default=None, help="log the store as a W&B artifact")
@click.option("--vectors", default=None,
              help="write one persona's vectors: gguf (llama.cpp control vector), safetensors, "
                   "pt, npz, npy (one layer)")
@click.option("--persona", default=None, help="with --vectors: the persona")
@click.option("--position", default=None, help="with --vectors: the recipe (a stored position)")
@click.option("--layers", default=None, help="with --vectors: " + _stored_layers_help)
@click.option("--out", default=None, type=click.Path(), help="with --vectors: the file to write")
@click.option("--overwrite", is_flag=True, help="with --vectors: replace an existing --out file")
@_friendly
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
    wanted = _stored_layers(layers)
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


class _AutoCount(click.ParamType):
    """A count or ``auto`` (None: the library sizes it)."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)


_AUTO_COUNT = _AutoCount()


def _compare_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--permutations", type=_AUTO_COUNT, default="auto", show_default=True,
                     help="Mantel permutations; auto: 2 × cells / alpha (at least 1000), enough "
                          "for Holm over every cell to reach alpha"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--splits", type=int, default=10, show_default=True,
                     help="random question halves for the noise floor"),
        click.option("--pass-min-cos", type=float, default=0.95, show_default=True),
        click.option("--pass-mc-r", type=float, default=0.90, show_default=True),
        click.option("--pass-spread", type=float, default=0.80, show_default=True),
        click.option("--kill-min-cos", type=float, default=0.85, show_default=True),
        click.option("--kill-mc-r", type=float, default=0.70, show_default=True),
        click.option("--gate-spread", is_flag=True,
                     help="PASS also needs spread Spearman > --pass-spread (default: descriptive)"),
        click.option("--null-draws", type=int, default=100, show_default=True,
                     help="relabelled reruns behind the held-out Procrustes null (and, in "
                          "experiment, the shared subspace's k_found null)"),
    ]):
        fn = opt(fn)
    return fn


def _source(store: str | None, seed_dir: str | None) -> Any:
    """A seed-layout source (read now: it is small), or the store's path, which the API opens
    and verifies after checking every option."""
    from tlpersona.cache.seed_layout import read_seed

    if (store is None) == (seed_dir is None):
        raise TlpersonaError("give either STORE or --from-seed DIR")
    return read_seed(seed_dir) if seed_dir else Path(str(store))


def _holding_out(fn: Any) -> Any:
    """Run an analysis command holding its ``--out`` directory's lock: a second run into the
    same directory stops at once naming the first (not after its own computation), so two
    runs never write there at the same time. Checked before any computation: an ``--out``
    holding files tlpersona did not write is refused, earlier results need ``--overwrite``."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tlpersona.infra.locks import exclusive
        from tlpersona.infra.paths import check_results_dir

        out = Path(kwargs["out"])
        # the experiment's results set is its compare folder (its store sits beside it)
        check_results_dir(out / "compare" if fn.__name__ == "experiment" else out,
                          kwargs["overwrite"])
        with exclusive(out, "`out`"):
            return fn(*args, **kwargs)
    return wrapper


@main.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout (method_<x>/all_centroids.pt) instead")
@click.option("--out", default="tlpersona-out/compare", show_default=True, type=click.Path())
@click.option("--layers", default=None, help=_stored_layers_help)
@click.option("--positions", default=None, help="positions to compare (default: the seven recipes)")
@click.option("--against", type=click.Path(), default=None,
              help="STORE_B: a store of the same personas and questions from another model; "
                   "compares each recipe's persona geometry across the two models")
@click.option("--layers-a", default=None,
              help="with --against: STORE's layers, paired in order with --layers-b (default: "
                   "the block numbers both stores hold, when the models have the same depth)")
@click.option("--layers-b", default=None, help="with --against: STORE_B's layers (see --layers-a)")
@_compare_options
@_overwrite_option
@_friendly
@_holding_out
def compare(store: str | None, seed_dir: str | None, out: str, layers: str | None,
            positions: str | None, against: str | None, layers_a: str | None,
            layers_b: str | None, permutations: int | None, seed: int, splits: int,
            null_draws: int, overwrite: bool,
            **thresholds: Any) -> None:
    """Compare recipes in a store: metrics, permutation tests, noise floor, verdicts, report.
    With --against STORE_B: each recipe's persona geometry in two models."""
    from tlpersona.analyses.compare import Thresholds
    from tlpersona.api.analysis import compare as run

    path = Path(out)
    if against is not None:
        _compare_models(store, seed_dir, against, path, layers, positions, layers_a, layers_b,
                        permutations, seed, splits, null_draws, overwrite, list(thresholds))
        return
    if layers_a is not None or layers_b is not None:
        raise TlpersonaError("`layers_a` and `layers_b` pair the layers of two stores: give "
                             "them with `against`")
    result = run(_source(store, seed_dir), layers=_stored_layers(layers),
                 positions=_items(positions) if positions else None, permutations=permutations,
                 seed=seed, splits=splits, null_draws=null_draws,
                 thresholds=Thresholds(**thresholds))
    report = result.save(path, overwrite=overwrite)
    _print_summary(result)
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
    result = compare_models(Path(store), Path(against), positions=_items(positions) if positions
                            else None, layers_a=_stored_layers_pair(layers_a, "layers_a"),
                            layers_b=_stored_layers_pair(layers_b, "layers_b"),
                            permutations=permutations, seed=seed, splits=splits,
                            null_draws=null_draws)
    report = result.save(out, overwrite=overwrite)
    click.echo(result.answer)
    for r in result.recipe_answers:
        click.echo(f"- {r.sentence}")
    for note in result.notes[1:]:  # the first says why per-persona cosine is left out
        click.echo(f"- {_flags(note)}")
    click.echo(f"report: {report}")


def _stored_layers_pair(value: str | None, name: str) -> list[int] | None:
    """``--layers-a`` / ``--layers-b``: comma-separated block indices (negative from the end)."""
    if value is None:
        return None
    try:
        return [int(x) for x in _items(value)]
    except ValueError:
        raise TlpersonaError(f"bad `{name}` {value!r}: block indices (e.g. 7,14,-1)") from None


def _print_summary(result: Any) -> None:
    from tlpersona.report.compare import verdict_table

    click.echo(verdict_table(result.to_dict()))
    click.echo(result.answer)
    for note in result.notes:
        click.echo(f"- {note}")


@main.command()
@click.option("--model", default="default", show_default=True)
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@_data_options
@click.option("--layers", default="default", show_default=True, help=_layers_help)
@click.option("--out", default="tlpersona-out/experiment", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None,
              help="response length (default 200 on GPU, 24 on CPU)")
@_batch_option
@_attn_option
@_compare_options
@_overwrite_option
@_friendly
@_holding_out
def experiment(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
               prompt_index: str, limit_personas: int | None, limit_questions: int | None,
               layers: str, out: str, max_new_tokens: int | None, batch_size: str, attn: str,
               permutations: int | None, seed: int, splits: int, null_draws: int,
               overwrite: bool, **thresholds: Any) -> None:
    """Everything on one command: extract all seven recipes, compare them, find their shared
    subspace, patch and steer with them (a short run), and write one report.

    On the CPU the defaults keep it to a few minutes: the built-in personas, their first 12
    questions and 24-token responses. Use --limit-questions 0 for every question.
    """
    from tlpersona.analyses.compare import Thresholds
    from tlpersona.api.experiment import experiment as run
    from tlpersona.infra.checks import check_count

    check_count(limit_questions, "`limit_questions`", 0)
    res = run(out, model=model, personas=_personas(personas, limit_personas),
              questions=_questions(questions), limit_questions=limit_questions,
              prompt_index=_prompt_index(prompt_index), layers=_layers(layers),
              max_new_tokens=max_new_tokens, batch_size=_batch_size(batch_size), device=device,
              dtype=dtype, attn=attn, permutations=permutations, seed=seed, splits=splits,
              null_draws=null_draws, thresholds=Thresholds(**thresholds), overwrite=overwrite)
    _print_summary(res.compare)
    for lay in res.subspace.layers:
        click.echo(f"shared subspace, {_subspace_line(lay)}")
    _print_patch(res.patch)
    _print_steer(res.steering)
    _print_trajectory(res.trajectory)
    click.echo(", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()))
    click.echo(f"report: {res.report}")


@main.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout instead of a store")
@click.option("--out", default="tlpersona-out/subspace", show_default=True, type=click.Path())
@click.option("--layers", default=None, help=_stored_layers_help)
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
@_overwrite_option
@_friendly
@_holding_out
def subspace(store: str | None, seed_dir: str | None, out: str, layers: str | None,
             positions: str | None, k_max: int, unit_norm: bool, seed: int, align: str,
             null_draws: int, overwrite: bool) -> None:
    """Joint PCA of all recipes: the persona subspace they share, and its dimension per layer."""
    from tlpersona.api.analysis import subspace as run

    path = Path(out)
    result = run(_source(store, seed_dir), layers=_stored_layers(layers),
                 positions=_items(positions) if positions else None, k_max=k_max,
                 unit_norm=unit_norm, seed=seed, align=align, null_draws=null_draws)
    report = result.save(path, overwrite=overwrite)
    for lay in result.layers:
        click.echo(_subspace_line(lay))
        if lay.aligned is not None:
            click.echo(f"  aligned (procrustes): {_found(lay.aligned)}")
    click.echo(f"report: {report}")


def _found(k: Any) -> str:
    """A :class:`~tlpersona.api.results.KFound` on one line: the count and its null."""
    from tlpersona.analyses.subspace_result import null_text

    return (f"k_found {k} (held-out personas; relabelled personas (descriptive): "
            f"{null_text({'k_found_null': k.null, 'k_found_null_p': k.null_p})})")


def _subspace_line(lay: Any) -> str:
    return f"layer {lay.layer}: {_found(lay.k_found)}"


def _conversations(path: str | None) -> list[tuple[str, str]]:
    """(system, user) of every line of a JSONL file of chat messages."""
    from tlpersona.infra.reading import jsonl_lines, read_text

    if path is None:
        return []
    out = []
    for n, line in enumerate(jsonl_lines(read_text(Path(path), "conversations JSONL file")), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)
            msgs = msgs["messages"] if isinstance(msgs, dict) else msgs
            system = next(m["content"] for m in msgs if m["role"] == "system")
            user = next(m["content"] for m in msgs if m["role"] == "user")
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            raise TlpersonaError(f"{path}:{n}: expected a list of chat messages with a system "
                                 "and a user message") from None
        out.append((system, user))
    return out


@main.command()
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
@_overwrite_option
@_friendly
@_holding_out
def project(store: str, out: str, layer: int | None, positions: str | None, axis: str, k: int,
            unit_norm: bool, systems: tuple[str, ...], questions: tuple[str, ...],
            conversations: str | None, texts: tuple[str, ...], model: str | None,
            device: str | None, dtype: str | None, store_questions: str,
            overwrite: bool) -> None:
    """Project stored personas, and new material, onto shared PCs or a persona axis."""
    from tlpersona.api.analysis import project as run

    path = Path(out)
    result = run(store, layer=layer, positions=_items(positions) if positions else None,
                 axis=axis, k=k, unit_norm=unit_norm,
                 systems=[(s, list(questions)) for s in systems],
                 conversations=_conversations(conversations), texts=list(texts), model=model,
                 device=device, dtype=dtype, questions=_questions(store_questions))
    written = result.save(path, overwrite=overwrite)
    for pt in result.points:
        if pt.nearest is not None:  # a new item
            coords = ", ".join(f"{k_}={v:+.3f}" for k_, v in pt.coords.items())
            click.echo(f"{pt.label} [{pt.recipe}]: {coords}; nearest: {pt.nearest.text()}")
    for c in result.combined:
        click.echo(f"combined: {c.text()}")
    click.echo(f"written: {written}")


@main.command()
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
@_batch_option
@_overwrite_option
@_friendly
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
                 personas=None if personas == "builtin" else _personas(personas),
                 band=_numbers(band, "band"), batch_size=_batch_size(batch_size), device=device,
                 dtype=dtype)
    written = result.save(path, overwrite=overwrite)
    _print_trajectory(result)
    click.echo(f"written: {written}")


def _print_trajectory(result: TrajectoryResult) -> None:
    for c in result.conversations:
        turns = " -> ".join(f"{t.value:+.3g}" for t in c.turns)
        click.echo(f"{c.label} ({c.persona or 'no stored persona'}): {turns}")
    for line in result.flags:
        click.echo(f"flag: {line}")
    for note in result.notes:
        click.echo(f"note: {_flags(note)}")


@main.command()
@click.option("--store", type=click.Path(), default=None,
              help="a store: its model and phrasing are used")
@click.option("--out", default="tlpersona-out/patch", show_default=True, type=click.Path())
@click.option("--model", default=None, help="default: the store's model, else 'default'")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@_attn_option
@click.option("--personas", default="builtin", show_default=True,
              help="'builtin' or an assistant-axis directory")
@click.option("--questions", default="builtin", show_default=True)
@click.option("--prompt-index", type=int, default=None, help="phrasing (default: the store's, else 0)")
@click.option("--n-personas", type=int, default=4, show_default=True,
              help="clean personas: with --store the N farthest from the corrupt persona on its "
                   "axis, else the first N")
@click.option("--clean-personas", default=None, help="NAME,NAME: the clean personas, by hand")
@click.option("--n-questions", type=int, default=2, show_default=True)
@click.option("--layers", default=None,
              help="patching layers: " + _layers_help + " (default: 8 spread over the model)")
@click.option("--positions", default="system,sys_end,sys_end+1,user_end,last", show_default=True,
              help="patched positions; 'system' = every system-text token (sys_start+i)")
@click.option("--hook", type=click.Choice(["resid_post", "resid_pre", "attn_out", "mlp_out", "head"]),
              default="resid_post", show_default=True, help="component patched exactly")
@click.option("--method", type=click.Choice(["exact", "attribution", "both"]), default="both",
              show_default=True, help="attribution: every component estimated from one backward")
@click.option("--corrupt", default="assistant", show_default=True,
              help="corrupt persona, or 'next' (each persona against the next one)")
@click.option("--response-tokens", type=int, default=0, show_default=True,
              help="also read N teacher-forced tokens of the clean persona's greedy response")
@click.option("--control/--no-control", default=True, show_default=True,
              help="the exact grid again with the corrupt persona's own prompt reworded as the "
                   "clean run (what a cell does without a persona change)")
@_overwrite_option
@_friendly
@_holding_out
def patch(store: str | None, out: str, model: str | None, device: str | None, dtype: str | None,
          attn: str, personas: str, questions: str, prompt_index: int | None, n_personas: int,
          clean_personas: str | None, n_questions: int, layers: str | None, positions: str,
          hook: str, method: str, corrupt: str, response_tokens: int, control: bool,
          overwrite: bool) -> None:
    """Activation patching: positions × layers, clean persona into corrupt (steering is
    `tlpersona steer`)."""
    from tlpersona.api.causal import patch as run

    path = Path(out)
    result = run(model, _personas(personas), _questions(questions), store=store,
                 n_personas=n_personas,
                 clean_personas=_items(clean_personas) if clean_personas else None,
                 n_questions=n_questions,
                 layers=None if layers == "default" else _layers(layers, None),
                 positions=_items(positions), hook=hook, method=method, corrupt=corrupt,
                 response_tokens=response_tokens, prompt_index=prompt_index, control=control,
                 device=device, dtype=dtype, attn=attn)
    report = result.save(path, overwrite=overwrite)
    _print_patch(result)
    click.echo(f"report: {report}")


def _print_patch(result: Any) -> None:
    click.echo(f"patching, clean personas: {', '.join(x for x, _ in result.pairs)} "
               f"({result.personas_note})")
    for method in ("exact", "attribution"):
        cells = result.select(method, result.config.hook)
        if cells:
            click.echo(f"patching ({method}, {result.config.hook}): {len(cells)} cells")
    click.echo(f"rewording control: {result.control_note}")
    click.echo(f"persona beyond the rewording control: {result.answer()}")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--out", default="tlpersona-out/steer", show_default=True, type=click.Path())
@click.option("--model", default=None, help="default: the store's model")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@_attn_option
@click.option("--persona-source", default="builtin", show_default=True,
              help="the persona set the store was made with ('builtin' or an assistant-axis dir)")
@click.option("--questions", default="builtin", show_default=True,
              help="evaluation questions (those the store was not built from are used first)")
@click.option("--n-questions", type=int, default=8, show_default=True,
              help="half select the setting, the other half score it")
@click.option("--personas", default=None,
              help="NAME,NAME: target personas (default: the N farthest from the base on its axis)")
@click.option("--n-personas", type=int, default=4, show_default=True)
@click.option("--base", default="assistant", show_default=True, help="the base persona")
@click.option("--recipes", default=None, help="stored recipes (default: all)")
@click.option("--layers", default=None, help=_stored_layers_help)
@click.option("--operators", default="add,ablate,cap", show_default=True)
@click.option("--alphas", default=None,
              help="steering strengths × the layer's typical residual norm "
                   "(default 0.03125,0.0625,0.125,0.25,0.5,1)")
@click.option("--cap-percentiles", default=None,
              help="capping thresholds, percentiles of stored projections (default 10,25,50,75,90)")
@click.option("--n-random", type=int, default=10, show_default=True,
              help="seeded random directions (control)")
@click.option("--random-test", type=click.Choice(["t", "rank"]), default="t", show_default=True,
              help="beyond-random test: t (one-sided t-prediction over the random directions' "
                   "effects, used where they are not right-skewed, else rank) or rank (exact; "
                   "needs --n-random of at least tests / 0.05)")
@click.option("--response-tokens", type=int, default=16, show_default=True)
@click.option("--prompt-index", type=int, default=None, help="phrasing (default: the store's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-boot", "--bootstrap", "n_boot", type=int, default=2000, show_default=True,
              help="bootstrap resamples for the intervals (--bootstrap: its earlier name)")
@click.option("--fluency-margin", type=float, default=0.5, show_default=True,
              help="nats/token a setting may lose on the base response (see report)")
@click.option("--continuations", type=int, default=2, show_default=True,
              help="personas shown with greedy steered continuations")
@_overwrite_option
@_friendly
@_holding_out
def steer(store: str, out: str, model: str | None, device: str | None, dtype: str | None,
          attn: str, persona_source: str, questions: str, n_questions: int, personas: str | None,
          n_personas: int, base: str, recipes: str | None, layers: str | None, operators: str,
          alphas: str | None, cap_percentiles: str | None, n_random: int, random_test: str,
          response_tokens: int,
          prompt_index: int | None, seed: int, n_boot: int, fluency_margin: float,
          continuations: int, overwrite: bool) -> None:
    """Steering, ablation and capping with each recipe's persona vectors: settings selected on
    some questions, effects scored on others against random directions and other personas'
    vectors, with bootstrap intervals."""
    from tlpersona.api.causal import steer as run
    from tlpersona.cache.reader import open_store

    path = Path(out)
    result = run(open_store(store, verify=True), model,
                 _personas(persona_source, param="persona_source"), _questions(questions),
                 n_questions=n_questions, personas=_items(personas) if personas else None,
                 n_personas=n_personas, base=base, recipes=_items(recipes) if recipes else None,
                 layers=_stored_layers(layers),
                 operators=_items(operators),
                 alphas=_numbers(alphas, "alphas") if alphas else None,
                 cap_percentiles=(_numbers(cap_percentiles, "cap_percentiles")
                                  if cap_percentiles else None),
                 n_random=n_random, random_test=random_test, response_tokens=response_tokens,
                 prompt_index=prompt_index,
                 seed=seed, n_boot=n_boot, fluency_margin=fluency_margin,
                 continuations=continuations, device=device, dtype=dtype, attn=attn)
    report = result.save(path, overwrite=overwrite)
    _print_steer(result)
    click.echo(f"report: {report}")


@main.command()
@click.argument("store", type=click.Path())
@click.argument("steering_dir", type=click.Path())
@click.option("--out", default="tlpersona-out/intervention", show_default=True, type=click.Path())
@click.option("--persona-source", default="builtin", show_default=True,
              help="the persona set the store was made with ('builtin' or an assistant-axis dir)")
@click.option("--personas", default=None, help="NAME,NAME: steered personas (default: all)")
@click.option("--recipe", default=None, help="default: the best-ranked add recipe")
@click.option("--formats", default="safetensors,pt,gguf", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an earlier export in --out")
@_friendly
def intervention(store: str, steering_dir: str, out: str, persona_source: str,
                 personas: str | None, recipe: str | None, formats: str, overwrite: bool) -> None:
    """Write the add intervention `tlpersona steer` evaluated, per persona: the vector as added
    (alpha · s_l · v/|v|), its layer and start token, for HF, steering-vectors and llama.cpp."""
    from tlpersona.api.causal import export_intervention

    items = export_intervention(steering_dir, store, out,
                                persona_source=_personas(persona_source, param="persona_source"),
                                personas=_items(personas) if personas else None, recipe=recipe,
                                formats=_items(formats), overwrite=overwrite)
    for it in items:
        click.echo(f"{it.persona}: {it.setting.recipe} L{it.setting.layer} alpha "
                   f"{it.setting.alpha:g} (scale {it.scale:.3g}), from token {it.start} -> {out}")


def _print_steer(result: Any) -> None:
    for sentence in result.verdicts.values():
        click.echo("steering " + sentence)


if __name__ == "__main__":
    main()

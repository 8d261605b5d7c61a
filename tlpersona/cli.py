"""Command line: a thin click shell over the Python API.

Errors a user can cause are :class:`TlpersonaError`: printed as one line, exit code 2.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import click

from tlpersona.errors import TlpersonaError


def _friendly(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlpersonaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _prompt_index(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise TlpersonaError(f"--prompt-index must be an integer or 'all', not {value!r}") from None


def _batch_size(value: str) -> int | None:
    """``auto`` (None: sized from free GPU memory) or a positive integer."""
    if value == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise TlpersonaError(f"--batch-size must be a positive integer or 'auto', not {value!r}") from None
    if size < 1:
        raise TlpersonaError("--batch-size must be at least 1")
    return size


_batch_option = click.option(
    "--batch-size", default="auto", show_default=True,
    help="rows per batch, or auto: generation and extraction each sized from free GPU memory, "
         "the model and the sequence lengths (16 and 8 on the CPU)")


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
@click.option("--positions", "positions_spec", default="last,sys_end,sys_end+1", show_default=True,
              help="comma-separated positions or recipe aliases "
                   "(a,b,bstar,bstar_no_last,c1,c2,c3); all6 = all seven")
@click.option("--layers", default="default", show_default=True,
              help="comma-separated block indices, 'all', or 'default' (quartiles + last)")
@click.option("--out", default="tlpersona-out/store", show_default=True, type=click.Path())
@_batch_option
@click.option("--max-new-tokens", type=int, default=None,
              help="response length when responses must be generated (default 200 GPU, 48 CPU)")
@click.option("--responses", "responses_path", default=None, type=click.Path(),
              help="responses JSONL made elsewhere (default: OUT/responses.jsonl, generated if needed)")
@click.option("--include-eot", is_flag=True, help="response_mean also averages the end-of-turn token")
@click.option("--force-new", is_flag=True, help="replace an existing store at --out")
@_attn_option
@_decoder_option
@_device_map_option
@_friendly
def extract(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
            prompt_index: str, limit_personas: int | None, limit_questions: int | None,
            positions_spec: str, layers: str, out: str, batch_size: str,
            max_new_tokens: int | None, responses_path: str | None, include_eot: bool,
            force_new: bool, attn: str, decoder: str, device_map: str | None) -> None:
    """Extract residual-stream vectors at named positions into an activation store."""
    from tlpersona.pipeline import ExtractRequest, run_extract

    req = ExtractRequest(
        model=model, device=device, dtype=dtype, personas=personas, questions=questions,
        prompt_index=_prompt_index(prompt_index), limit_personas=limit_personas,
        limit_questions=limit_questions, positions=positions_spec, layers=layers, out=out,
        batch_size=_batch_size(batch_size), max_new_tokens=max_new_tokens, responses=responses_path,
        include_eot=include_eot, force_new=force_new, attn=attn, decoder=decoder,
        device_map=device_map,
    )
    t0 = time.perf_counter()
    path = run_extract(req)
    click.echo(f"store written to {path} in {time.perf_counter() - t0:.1f} s")


@main.command()
@_model_options
@_data_options
@click.option("--out", default="tlpersona-out/responses.jsonl", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None, help="default 200 on GPU, 48 on CPU")
@_batch_option
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@_decoder_option
@_device_map_option
@_friendly
def generate(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
             prompt_index: str, limit_personas: int | None, limit_questions: int | None,
             out: str, max_new_tokens: int | None, batch_size: str, backend: str,
             decoder: str, device_map: str | None) -> None:
    """Greedy responses for every persona x question (resumable JSONL with token ids)."""
    from tlpersona.pipeline import run_generate

    t0 = time.perf_counter()
    n = run_generate(model, device, dtype, personas, questions, _prompt_index(prompt_index),
                     limit_personas, limit_questions, out, max_new_tokens, _batch_size(batch_size),
                     backend,
                     decoder, device_map)
    click.echo(f"{n} responses in {out} ({time.perf_counter() - t0:.1f} s)")


@main.command()
@click.option("--model", default="default", show_default=True)
@click.option("--system", default="You are a pirate captain who has spent forty years at sea.",
              show_default=True)
@click.option("--question", default="What is the best way to spend a free afternoon?",
              show_default=True)
@click.option("--positions", "positions_spec", default="all6", show_default=True)
@_friendly
def positions(model: str, system: str, question: str, positions_spec: str) -> None:
    """Print one templated example with every position marked on its token."""
    from tlpersona.pipeline import describe_positions

    click.echo(describe_positions(model, system, question, positions_spec))


@main.command()
@click.argument("store", type=click.Path())
@_friendly
def verify(store: str) -> None:
    """Re-check every file of a store against its manifest (presence, sha256, shapes)."""
    from tlpersona.cache import verify_store

    problems = verify_store(store)
    if problems:
        raise TlpersonaError(f"{store} fails verification: {'; '.join(problems)}")
    click.echo(f"{store}: every file matches the manifest")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--seed-layout", "seed_dir", type=click.Path(), default=None,
              help="write method_<x>/all_centroids.pt, <role>.pt, <role>__per_q.pt here")
@click.option("--wandb-project", default=None, help="log the store as a W&B artifact")
@click.option("--vectors", "vector_format", default=None,
              help="write one persona's vectors: gguf (llama.cpp control vector), safetensors, "
                   "pt, npz, npy (one layer)")
@click.option("--persona", default=None, help="with --vectors: the persona")
@click.option("--position", default=None, help="with --vectors: the recipe (a stored position)")
@click.option("--layers", default=None, help="with --vectors: stored layers (default: all)")
@click.option("--out", default=None, type=click.Path(), help="with --vectors: the file to write")
@_friendly
def export(store: str, seed_dir: str | None, wandb_project: str | None, vector_format: str | None,
           persona: str | None, position: str | None, layers: str | None, out: str | None) -> None:
    """Export a store for older code (seed layout), log it as a W&B artifact, and/or write one
    persona's vectors for llama.cpp, steering libraries or numpy (--vectors)."""
    from tlpersona.cache import open_store

    if seed_dir is None and wandb_project is None and vector_format is None:
        raise TlpersonaError("nothing to do: give --seed-layout DIR, --wandb-project NAME "
                             "and/or --vectors FORMAT")
    if vector_format is not None:
        from tlpersona.vector_export import VectorExport, check_export, export_vectors

        if not (persona and position and out):
            raise TlpersonaError("--vectors needs --persona, --position and --out")
        try:
            wanted = [int(x) for x in layers.split(",")] if layers else None
        except ValueError:
            raise TlpersonaError(f"--layers must be comma-separated integers, not {layers!r}") from None
        req = VectorExport(persona, position, vector_format, Path(out), wanted)
        check_export(req)
    st = open_store(store, verify=True)
    if vector_format is not None:
        req.meta = {"model": str(st.provenance.get("model")), "store_manifest": st.manifest_hash}
        vecs = export_vectors(st, req)
        click.echo(f"{vector_format}: {persona} {position} layers {','.join(map(str, vecs))} -> {out}")
    if seed_dir:
        from tlpersona.cache.seed_layout import export_seed

        dirs = export_seed(st, seed_dir)
        click.echo(f"seed layout: {len(dirs)} methods in {seed_dir}")
    if wandb_project:
        from tlpersona.pipeline import log_wandb

        click.echo(f"W&B artifact: {log_wandb(st, wandb_project)}")


def _compare_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--permutations", type=int, default=1000, show_default=True,
                     help="Mantel and paired permutation count"),
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
                     help="relabelled reruns behind the held-out Procrustes null"),
    ]):
        fn = opt(fn)
    return fn


def _compare_config(positions: str | None, layers: str | None, permutations: int, seed: int,
                    splits: int, null_draws: int = 100, **th: Any) -> Any:
    from tlpersona.analyses.compare import CompareConfig, Thresholds
    from tlpersona.positions import parse_positions

    if permutations < 1:
        raise TlpersonaError("--permutations must be at least 1")
    if null_draws < 1:
        raise TlpersonaError("--null-draws must be at least 1")
    if splits < 1:
        raise TlpersonaError("--splits must be at least 1")
    layer_list = None
    if layers:
        try:
            layer_list = [int(x) for x in layers.split(",")]
        except ValueError:
            raise TlpersonaError(f"bad --layers {layers!r}") from None
    return CompareConfig(
        positions=[p.name for p in parse_positions(positions)] if positions else None,
        layers=layer_list, n_perm=permutations, seed=seed, n_splits=splits, n_null=null_draws,
        thresholds=Thresholds(**th),
    )


@main.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout (method_<x>/all_centroids.pt) instead")
@click.option("--out", default="tlpersona-out/compare", show_default=True, type=click.Path())
@click.option("--layers", default=None, help="comma-separated stored layers (default: all stored)")
@click.option("--positions", default=None, help="positions to compare (default: the seven recipes)")
@_compare_options
@_friendly
def compare(store: str | None, seed_dir: str | None, out: str, layers: str | None,
            positions: str | None, permutations: int, seed: int, splits: int,
            **th: Any) -> None:
    """Compare recipes in a store: metrics, permutation tests, noise floor, verdicts, report."""
    from tlpersona.pipeline import run_compare

    cfg = _compare_config(positions, layers, permutations, seed, splits, **th)
    report, result = run_compare(store, seed_dir, cfg, out)
    _print_summary(result)
    click.echo(f"report: {report}")


def _print_summary(result: dict[str, Any]) -> None:
    from tlpersona.analyses.report import verdict_table

    click.echo(verdict_table(result))
    click.echo(result["overall"]["sentence"])


@main.command()
@click.option("--model", default="default", show_default=True)
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@_data_options
@click.option("--layers", default="default", show_default=True)
@click.option("--out", default="tlpersona-out/experiment", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None,
              help="response length (default 200 on GPU, 24 on CPU)")
@_batch_option
@_attn_option
@_compare_options
@_friendly
def experiment(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
               prompt_index: str, limit_personas: int | None, limit_questions: int | None,
               layers: str, out: str, max_new_tokens: int | None, batch_size: str, attn: str,
               permutations: int, seed: int, splits: int, **th: Any) -> None:
    """Everything on one command: extract all seven recipes, compare them, find their shared
    subspace, patch and steer with them (a short run), and write one report.

    On the CPU the defaults keep it to a few minutes: the built-in personas, their first 12
    questions and 24-token responses. Use --limit-questions 0 for every question.
    """
    from tlpersona.cache.store import open_store
    from tlpersona.files import atomic_write_bytes
    from tlpersona.pipeline import (
        ExtractRequest,
        PatchRequest,
        SteerRequest,
        run_compare,
        run_extract,
        run_patch,
        run_steer,
        run_subspace,
    )

    cpu = (device or "").startswith("cpu") or not _cuda()
    if limit_questions is None and cpu:
        limit_questions = 12
    if max_new_tokens is None and cpu:
        max_new_tokens = 24
    t0 = time.perf_counter()
    store = run_extract(ExtractRequest(
        model=model, device=device, dtype=dtype, personas=personas, questions=questions,
        prompt_index=_prompt_index(prompt_index), limit_personas=limit_personas,
        limit_questions=limit_questions or None,
        # the sink position and the sink-free prompt mean feed the report's attention-sink check
        positions="all6,first,prompt_mean_no_first", layers=layers,
        out=str(Path(out) / "store"), batch_size=_batch_size(batch_size),
        max_new_tokens=max_new_tokens,
        attn=attn,
    ))
    t1 = time.perf_counter()
    cfg = _compare_config(None, None, permutations, seed, splits, **th)
    report, result = run_compare(str(store), None, cfg, str(Path(out) / "compare"),
                                 title=f"Recipe comparison: {model}")
    t2 = time.perf_counter()
    _, sub = run_subspace(str(store), None, _subspace_config(None, None), report.parent,
                          append_to=report)
    t3 = time.perf_counter()
    # A short causal section: patching (3 personas × 2 questions), then steering (`add`) at the
    # middle stored layer (3 contrasting personas, 2 + 3 held-out questions); `tlpersona steer`
    # runs the full evaluation (ablation and capping too).
    stored = [lay["layer"] for lay in sub["layers"]]
    mid = stored[(len(stored) - 1) // 2]
    names = open_store(store).personas
    base = "assistant" if "assistant" in names else names[0]
    _, causal = run_patch(PatchRequest(
        store=str(store), out=str(report.parent), device=device, dtype=dtype, attn=attn,
        personas=personas, questions=questions, n_personas=3, n_questions=2, corrupt=base))
    t4 = time.perf_counter()
    steer_md, steering = run_steer(SteerRequest(
        store=str(store), out=str(report.parent), device=device, dtype=dtype, attn=attn,
        persona_source=personas, questions=questions, n_questions=5, n_personas=3, base=base,
        layers=str(mid), operators="add", alphas="0.03125,0.0625,0.125,0.25", response_tokens=6,
        seed=seed, n_boot=1000, continuations=1, continuation_tokens=16))
    atomic_write_bytes(report, report.read_bytes() + b"\n" + (report.parent / "patch.md").read_bytes()
                       + b"\n" + steer_md.read_bytes())
    _print_summary(result)
    for lay in sub["layers"]:
        click.echo(f"shared subspace, {_subspace_line(lay)}")
    _print_patch(causal)
    _print_steer(steering)
    click.echo(f"extract {t1 - t0:.1f} s, compare {t2 - t1:.1f} s, subspace {t3 - t2:.1f} s, "
               f"patching {t4 - t3:.1f} s, steering {time.perf_counter() - t4:.1f} s")
    click.echo(f"report: {report}")


@main.command()
@click.argument("store", required=False, type=click.Path())
@click.option("--from-seed", "seed_dir", type=click.Path(), default=None,
              help="read centroids in the seed layout instead of a store")
@click.option("--out", default="tlpersona-out/subspace", show_default=True, type=click.Path())
@click.option("--layers", default=None, help="comma-separated stored layers (default: all stored)")
@click.option("--positions", default=None, help="recipes to stack (default: the seven recipes)")
@click.option("--k-max", type=int, default=50, show_default=True)
@click.option("--unit-norm/--raw-scale", default=True, show_default=True,
              help="scale each recipe to unit total variance before the PCA (--raw-scale: keep "
                   "each recipe's own scale, so the largest recipe dominates)")
@click.option("--seed", type=int, default=0, show_default=True, help="held-out persona split")
@_friendly
def subspace(store: str | None, seed_dir: str | None, out: str, layers: str | None,
             positions: str | None, k_max: int, unit_norm: bool, seed: int) -> None:
    """Joint PCA of all recipes: the persona subspace they share, and its dimension per layer."""
    from tlpersona.pipeline import run_subspace

    if k_max < 2:
        raise TlpersonaError("--k-max must be at least 2 (the figures and the matrix r need two PCs)")
    path, result = run_subspace(store, seed_dir, _subspace_config(positions, layers, k_max,
                                                                  unit_norm, seed), out)
    for lay in result["layers"]:
        click.echo(_subspace_line(lay))
    click.echo(f"report: {path}")


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
              help="question(s) for the new persona(s) (repeat; averaged)")
@click.option("--conversations", type=click.Path(), default=None,
              help="JSONL: each line a list of chat messages with a system and a user message")
@click.option("--text", "texts", multiple=True,
              help="raw text, read at its last token without a template (raw_system_last)")
@click.option("--model", default=None, help="default: the store's model")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@_friendly
def project(store: str, out: str, layer: int | None, positions: str | None, axis: str, k: int,
            unit_norm: bool, systems: tuple[str, ...], questions: tuple[str, ...],
            conversations: str | None, texts: tuple[str, ...], model: str | None,
            device: str | None, dtype: str | None) -> None:
    """Project stored personas, and new material, onto shared PCs or a persona axis."""
    from tlpersona.pipeline import ProjectRequest, run_project

    if systems and not questions:
        raise TlpersonaError("--system needs at least one --question")
    req = ProjectRequest(store=store, out=out, layer=layer, positions=positions, axis=axis, k=k,
                         unit_norm=unit_norm, systems=[(s, list(questions)) for s in systems],
                         conversations=conversations, texts=list(texts), model=model,
                         device=device, dtype=dtype)
    path, result = run_project(req)
    for it in result["items"]:
        near = ", ".join(f"{n['persona']} ({n['cos']:.2f})" for n in it["nearest"][:3])
        coords = ", ".join(f"{k_}={v:+.3f}" for k_, v in it["coords"].items())
        click.echo(f"{it['label']} [{it['recipe']}]: {coords}; nearest: {near}")
    click.echo(f"written: {path}")


def _subspace_line(lay: dict[str, Any]) -> str:
    null = ", ".join("none" if k is None else str(k) for k in lay["k_found_null"])
    found = f">= {lay['k_found']}" if lay["k_found_saturated"] else lay["k_found"]
    return (f"layer {lay['layer']}: k_found {found} (held-out personas; in sample "
            f"{lay['k_found_in_sample']}; relabelled-persona null: {null or 'not run'})")


def _subspace_config(positions: str | None, layers: str | None, k_max: int = 50,
                     unit_norm: bool = True, seed: int = 0) -> Any:
    from tlpersona.analyses.subspace import SubspaceConfig

    base = _compare_config(positions, layers, 1, seed, 1)
    return SubspaceConfig(positions=base.positions, layers=base.layers, k_max=k_max,
                          unit_norm=unit_norm, seed=seed)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()


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
@click.option("--layers", default=None, help="patching layers (default: 8 spread over the model)")
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
@_friendly
def patch(store: str | None, out: str, model: str | None, device: str | None, dtype: str | None,
          attn: str, personas: str, questions: str, prompt_index: int | None, n_personas: int,
          clean_personas: str | None, n_questions: int, layers: str | None, positions: str,
          hook: str, method: str, corrupt: str, response_tokens: int) -> None:
    """Activation patching: positions × layers, clean persona into corrupt (steering is
    `tlpersona steer`)."""
    from tlpersona.pipeline import PatchRequest, run_patch

    path, result = run_patch(PatchRequest(
        store=store, out=out, model=model, device=device, dtype=dtype, attn=attn,
        personas=personas, questions=questions, prompt_index=prompt_index,
        n_personas=n_personas, clean_personas=clean_personas, n_questions=n_questions,
        layers=layers, positions=positions, hook=hook, method=method, corrupt=corrupt,
        response_tokens=response_tokens))
    _print_patch(result)
    click.echo(f"report: {path}")


def _print_patch(result: Any) -> None:
    click.echo(f"patching, clean personas: {', '.join(x for x, _ in result.pairs)} "
               f"({result.personas_note})")
    for method in ("exact", "attribution"):
        top = sorted(result.select(method, result.config.hook), key=lambda c: -c.kl_effect)[:3]
        if top:
            click.echo(f"patching ({method}, {result.config.hook}), largest KL effects: " + "; ".join(
                f"{c.position} L{c.layer}{'' if c.head is None else f' H{c.head}'} "
                f"{c.kl_effect:.2f}" for c in top))


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
@click.option("--layers", default=None, help="stored layers (default: all)")
@click.option("--operators", default="add,ablate,cap", show_default=True)
@click.option("--alphas", default=None,
              help="steering strengths × the layer's typical residual norm "
                   "(default 0.03125,0.0625,0.125,0.25,0.5,1)")
@click.option("--cap-percentiles", default=None,
              help="capping thresholds, percentiles of stored projections (default 10,25,50,75,90)")
@click.option("--n-random", type=int, default=10, show_default=True,
              help="seeded random directions (control)")
@click.option("--response-tokens", type=int, default=16, show_default=True)
@click.option("--prompt-index", type=int, default=None, help="phrasing (default: the store's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bootstrap", "n_boot", type=int, default=2000, show_default=True)
@click.option("--fluency-margin", type=float, default=0.5, show_default=True,
              help="nats/token a setting may lose on the base response (see report)")
@click.option("--continuations", type=int, default=2, show_default=True,
              help="personas shown with greedy steered continuations")
@_friendly
def steer(store: str, out: str, model: str | None, device: str | None, dtype: str | None,
          attn: str, persona_source: str, questions: str, n_questions: int, personas: str | None,
          n_personas: int, base: str, recipes: str | None, layers: str | None, operators: str,
          alphas: str | None, cap_percentiles: str | None, n_random: int, response_tokens: int,
          prompt_index: int | None, seed: int, n_boot: int, fluency_margin: float,
          continuations: int) -> None:
    """Steering, ablation and capping with each recipe's persona vectors: settings selected on
    some questions, effects scored on others against random directions and other personas'
    vectors, with bootstrap intervals."""
    from tlpersona.pipeline import SteerRequest, run_steer

    path, result = run_steer(SteerRequest(
        store=store, out=out, model=model, device=device, dtype=dtype, attn=attn,
        persona_source=persona_source, questions=questions, n_questions=n_questions,
        personas=personas, n_personas=n_personas, base=base, recipes=recipes, layers=layers,
        operators=operators, alphas=alphas, cap_percentiles=cap_percentiles, n_random=n_random,
        response_tokens=response_tokens, prompt_index=prompt_index, seed=seed, n_boot=n_boot,
        fluency_margin=fluency_margin, continuations=continuations))
    _print_steer(result)
    click.echo(f"report: {path}")


def _print_steer(result: Any) -> None:
    for sentence in result.verdicts.values():
        click.echo("steering " + sentence)

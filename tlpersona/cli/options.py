"""Click options that several commands share, declared once so that a flag means the same
everywhere, and :func:`holding_out`, the ``--out`` lock of the commands that write results."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from tlpersona.cli.parse import AUTO_COUNT

batch_option = click.option(
    "--batch-size", default="auto", show_default=True,
    help="rows per batch, or auto: generation and extraction each sized from free GPU memory, "
         "the model and the sequence lengths (16 and 8 on the CPU)")


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="replace earlier tlpersona results in --out (never files it did not write there)")


def model_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--model", default="default", show_default=True,
                     help="'default' (SmolLM2-135M-Instruct), a hub id, a model dir or a .gguf"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)"),
        click.option("--dtype", default=None, help="fp32/bf16/fp16 (default: bf16 on GPU, fp32 on CPU)"),
    ]):
        fn = opt(fn)
    return fn


decoder_option = click.option(
    "--decoder", type=click.Choice(["auto", "hf", "static"]), default="auto", show_default=True,
    help="greedy decoding: HF generate, or a static KV cache with CUDA graphs (same tokens, "
         "several times faster on a GPU); auto = static on GPU, hf on CPU")

device_map_option = click.option(
    "--device-map", type=click.Choice(["auto", "balanced", "sequential"]), default=None,
    help="spread a model too large for one GPU over all visible GPUs (accelerate device map)")

attn_option = click.option(
    "--attn", type=click.Choice(["auto", "sdpa", "eager"]), default="auto", show_default=True,
    help="attention inside the bridge: HF's sdpa (fast; attention-pattern hooks off) or the "
         "bridge's eager; auto = sdpa on GPU, eager on CPU")

layers_help = "comma-separated block indices (negative from the end), 'default' or 'all'"
stored_layers_help = "comma-separated stored layers (negative from the end; default: all stored)"


def data_options(fn: Any) -> Any:
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


def compare_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--permutations", type=AUTO_COUNT, default="auto", show_default=True,
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


def holding_out(fn: Any) -> Any:
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


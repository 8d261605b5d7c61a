"""Commands that make a store or what a store is made from: ``extract``, ``generate``,
``prompts`` (for another engine to continue) and ``positions`` (one templated example)."""

from __future__ import annotations

import time

import click

import tlpersona.cli.parse as parse
from tlpersona.cli.errors import friendly
from tlpersona.cli.options import (
    attn_option,
    batch_option,
    data_options,
    decoder_option,
    device_map_option,
    layers_help,
    model_options,
)


@click.command()
@model_options
@data_options
@click.option("--positions", default="last,sys_end,sys_end+1", show_default=True,
              help="comma-separated positions or recipe aliases "
                   "(a,b,bstar,bstar_no_last,c1,c2,c3); recipes = all seven (alias all6)")
@click.option("--layers", default="default", show_default=True, help=layers_help)
@click.option("--out", default="tlpersona-out/store", show_default=True, type=click.Path())
@batch_option
@click.option("--max-new-tokens", type=int, default=None,
              help="response length when responses must be generated (default 200 GPU, 48 CPU)")
@click.option("--responses", default=None, type=click.Path(),
              help="responses JSONL made elsewhere (default: OUT/responses.jsonl, generated if needed)")
@click.option("--include-eot", is_flag=True, help="response_mean also averages the end-of-turn token")
@click.option("--force-new", is_flag=True, help="replace an existing store at --out")
@attn_option
@decoder_option
@device_map_option
@friendly
def extract(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
            prompt_index: str, limit_personas: int | None, limit_questions: int | None,
            positions: str, layers: str, out: str, batch_size: str, max_new_tokens: int | None,
            responses: str | None, include_eot: bool, force_new: bool, attn: str, decoder: str,
            device_map: str | None) -> None:
    """Extract residual-stream vectors at named positions into an activation store."""
    from tlpersona.api.extraction import extract as run

    t0 = time.perf_counter()
    store = run(model, parse.personas(personas, limit_personas), parse.questions(questions, limit_questions),
                positions=parse.items(positions), layers=parse.layers(layers), out=out,
                prompt_index=parse.prompt_index(prompt_index), batch_size=parse.batch_size(batch_size),
                max_new_tokens=max_new_tokens, responses=responses, include_eot=include_eot,
                force_new=force_new, device=device, dtype=dtype, attn=attn, decoder=decoder,
                device_map=device_map)
    click.echo(f"store written to {store.root} in {time.perf_counter() - t0:.1f} s")


@click.command()
@model_options
@data_options
@click.option("--out", default="tlpersona-out/responses.jsonl", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None, help="default 200 on GPU, 48 on CPU")
@batch_option
@decoder_option
@device_map_option
@friendly
def generate(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
             prompt_index: str, limit_personas: int | None, limit_questions: int | None,
             out: str, max_new_tokens: int | None, batch_size: str, decoder: str,
             device_map: str | None) -> None:
    """Greedy responses for every persona x question (resumable JSONL with token ids; the same
    format `extract --responses` reads, so any engine can write it)."""
    from tlpersona.api.extraction import generate as run

    t0 = time.perf_counter()
    got = run(model, parse.personas(personas, limit_personas), parse.questions(questions, limit_questions),
              out=out, prompt_index=parse.prompt_index(prompt_index), max_new_tokens=max_new_tokens,
              batch_size=parse.batch_size(batch_size), device=device, dtype=dtype, decoder=decoder,
              device_map=device_map)
    click.echo(f"{len(got)} responses in {out} ({time.perf_counter() - t0:.1f} s)")


@click.command()
@click.option("--model", default="default", show_default=True)
@data_options
@click.option("--out", default="tlpersona-out/prompts.jsonl", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
@friendly
def prompts(model: str, personas: str, questions: str, prompt_index: str,
            limit_personas: int | None, limit_questions: int | None, out: str,
            overwrite: bool) -> None:
    """Write the templated prompts (token ids and text) for another engine to continue; read
    its responses back with `extract --responses` (see README, Python API)."""
    from tlpersona.api.extraction import write_prompts

    n = write_prompts(model, parse.personas(personas, limit_personas),
                      parse.questions(questions, limit_questions), out=out,
                      prompt_index=parse.prompt_index(prompt_index), overwrite=overwrite)
    click.echo(f"{n} prompts in {out}")


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--system", default="You are a pirate captain who has spent forty years at sea.",
              show_default=True)
@click.option("--question", default="What is the best way to spend a free afternoon?",
              show_default=True)
@click.option("--positions", default="recipes", show_default=True)
@friendly
def positions(model: str, system: str, question: str, positions: str) -> None:
    """Print one templated example with every position marked on its token."""
    from tlpersona.api.inspect import describe_positions

    click.echo(describe_positions(model, system, question, parse.items(positions)))

"""Commands that run the model on personas: ``patch``, ``steer``, ``intervention`` (write the
add intervention ``steer`` evaluated) and ``experiment`` (every step on one command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

import tlpersona.cli.parse as parse
from tlpersona.cli.errors import friendly
from tlpersona.cli.options import (
    attn_option,
    batch_option,
    compare_options,
    data_options,
    holding_out,
    layers_help,
    overwrite_option,
    stored_layers_help,
)
from tlpersona.cli.output import print_patch, print_steer, print_summary, print_trajectory, subspace_line


@click.command()
@click.option("--store", type=click.Path(), default=None,
              help="a store: its model and phrasing are used")
@click.option("--out", default="tlpersona-out/patch", show_default=True, type=click.Path())
@click.option("--model", default=None, help="default: the store's model, else 'default'")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@attn_option
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
              help="patching layers: " + layers_help + " (default: 8 spread over the model)")
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
@overwrite_option
@friendly
@holding_out
def patch(store: str | None, out: str, model: str | None, device: str | None, dtype: str | None,
          attn: str, personas: str, questions: str, prompt_index: int | None, n_personas: int,
          clean_personas: str | None, n_questions: int, layers: str | None, positions: str,
          hook: str, method: str, corrupt: str, response_tokens: int, control: bool,
          overwrite: bool) -> None:
    """Activation patching: positions × layers, clean persona into corrupt (steering is
    `tlpersona steer`)."""
    from tlpersona.api.causal import patch as run

    path = Path(out)
    result = run(model, parse.personas(personas), parse.questions(questions), store=store,
                 n_personas=n_personas,
                 clean_personas=parse.items(clean_personas) if clean_personas else None,
                 n_questions=n_questions,
                 layers=None if layers == "default" else parse.layers(layers, None),
                 positions=parse.items(positions), hook=hook, method=method, corrupt=corrupt,
                 response_tokens=response_tokens, prompt_index=prompt_index, control=control,
                 device=device, dtype=dtype, attn=attn)
    report = result.save(path, overwrite=overwrite)
    print_patch(result)
    click.echo(f"report: {report}")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--out", default="tlpersona-out/steer", show_default=True, type=click.Path())
@click.option("--model", default=None, help="default: the store's model")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@attn_option
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
@click.option("--layers", default=None, help=stored_layers_help)
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
@overwrite_option
@friendly
@holding_out
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
                 parse.personas(persona_source, param="persona_source"), parse.questions(questions),
                 n_questions=n_questions, personas=parse.items(personas) if personas else None,
                 n_personas=n_personas, base=base, recipes=parse.items(recipes) if recipes else None,
                 layers=parse.stored_layers(layers),
                 operators=parse.items(operators),
                 alphas=parse.numbers(alphas, "alphas") if alphas else None,
                 cap_percentiles=(parse.numbers(cap_percentiles, "cap_percentiles")
                                  if cap_percentiles else None),
                 n_random=n_random, random_test=random_test, response_tokens=response_tokens,
                 prompt_index=prompt_index,
                 seed=seed, n_boot=n_boot, fluency_margin=fluency_margin,
                 continuations=continuations, device=device, dtype=dtype, attn=attn)
    report = result.save(path, overwrite=overwrite)
    print_steer(result)
    click.echo(f"report: {report}")


@click.command()
@click.argument("store", type=click.Path())
@click.argument("steering_dir", type=click.Path())
@click.option("--out", default="tlpersona-out/intervention", show_default=True, type=click.Path())
@click.option("--persona-source", default="builtin", show_default=True,
              help="the persona set the store was made with ('builtin' or an assistant-axis dir)")
@click.option("--personas", default=None, help="NAME,NAME: steered personas (default: all)")
@click.option("--recipe", default=None, help="default: the best-ranked add recipe")
@click.option("--formats", default="safetensors,pt,gguf", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an earlier export in --out")
@friendly
def intervention(store: str, steering_dir: str, out: str, persona_source: str,
                 personas: str | None, recipe: str | None, formats: str, overwrite: bool) -> None:
    """Write the add intervention `tlpersona steer` evaluated, per persona: the vector as added
    (alpha · s_l · v/|v|), its layer and start token, for HF, steering-vectors and llama.cpp."""
    from tlpersona.api.causal import export_intervention

    items = export_intervention(steering_dir, store, out,
                                persona_source=parse.personas(persona_source, param="persona_source"),
                                personas=parse.items(personas) if personas else None, recipe=recipe,
                                formats=parse.items(formats), overwrite=overwrite)
    for it in items:
        click.echo(f"{it.persona}: {it.setting.recipe} L{it.setting.layer} alpha "
                   f"{it.setting.alpha:g} (scale {it.scale:.3g}), from token {it.start} -> {out}")


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@data_options
@click.option("--layers", default="default", show_default=True, help=layers_help)
@click.option("--out", default="tlpersona-out/experiment", show_default=True, type=click.Path())
@click.option("--max-new-tokens", type=int, default=None,
              help="response length (default 200 on GPU, 24 on CPU)")
@batch_option
@attn_option
@compare_options
@overwrite_option
@friendly
@holding_out
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
    from tlpersona.analyses.compare.result import Thresholds
    from tlpersona.api.experiment import experiment as run
    from tlpersona.infra.checks import check_count

    check_count(limit_questions, "`limit_questions`", 0)
    res = run(out, model=model, personas=parse.personas(personas, limit_personas),
              questions=parse.questions(questions), limit_questions=limit_questions,
              prompt_index=parse.prompt_index(prompt_index), layers=parse.layers(layers),
              max_new_tokens=max_new_tokens, batch_size=parse.batch_size(batch_size), device=device,
              dtype=dtype, attn=attn, permutations=permutations, seed=seed, splits=splits,
              null_draws=null_draws, thresholds=Thresholds(**thresholds), overwrite=overwrite)
    print_summary(res.compare)
    for lay in res.subspace.layers:
        click.echo(f"shared subspace, {subspace_line(lay)}")
    print_patch(res.patch)
    print_steer(res.steering)
    print_trajectory(res.trajectory)
    click.echo(", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()))
    click.echo(f"report: {res.report}")

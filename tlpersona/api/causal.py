"""Experiments that run the model: activation patching and steering, and the export of the
intervention steering evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tlpersona.cache.reader import Store
from tlpersona.cache.source import as_store, stored_layers
from tlpersona.chat.positions import parse_positions
from tlpersona.data import (
    Persona,
    Question,
    builtin_personas,
    builtin_questions,
    persona_hash,
    system_prompt,
)
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.export import Intervention
from tlpersona.interventions.patching import DEFAULT_POSITIONS, PatchResult
from tlpersona.interventions.steering import SteeringResult
from tlpersona.models.layers import LayerSpec, resolve_layers
from tlpersona.models.loading import LoadedModel, default_device, load_config, load_model, resolve


def _model_for(model: str | LoadedModel | None, prov: dict[str, Any], device: str | None,
               dtype: str | None, attn: str) -> LoadedModel:
    """The bridged model (loaded unless given), checked against the store's model identity when
    there is a store."""
    loaded = (model if isinstance(model, LoadedModel)
              else load_model(model or prov.get("model", "default"), device or default_device(),
                               dtype, attn))
    if prov and loaded.info.identity != prov.get("model_identity"):
        raise TlpersonaError(f"`model` {loaded.info.spec} is not the model the store was made "
                             f"with ({prov.get('model')})")
    return loaded


def _store_phrasing(prov: dict[str, Any], given: int | None) -> int:
    """The store's phrasing unless one is given; a store averaged over phrasings ("all") → 0."""
    if given is not None:
        return given
    stored = prov.get("prompt_index", 0)
    return stored if isinstance(stored, int) else 0


def store_personas(st: Store, given: Sequence[Persona] | None, param: str) -> list[Persona]:
    """The store's personas, with their prompts from ``given`` (default: the built-in set;
    see :func:`tlpersona.api.analysis.stored_items`)."""
    from tlpersona.api.analysis import stored_items

    return stored_items(st.personas, builtin_personas() if given is None else given,
                        lambda p: p.name, persona_hash, st.provenance.get("persona_hash"),
                        param, "persona", "their system prompts differ")


def _spread_layers(n_layers: int, k: int = 8) -> list[int]:
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def patch(model: str | LoadedModel | None = None, personas: Sequence[Persona] | None = None,
          questions: Sequence[Question] | None = None, *, store: Store | str | Path | None = None,
          n_personas: int = 4, clean_personas: Sequence[str] | None = None,
          n_questions: int = 2, layers: LayerSpec | None = None,
          positions: Sequence[str] = DEFAULT_POSITIONS,
          hook: str = "resid_post", method: str = "both", corrupt: str = "assistant",
          response_tokens: int = 0, prompt_index: int | None = None, control: bool = True,
          device: str | None = None, dtype: str | None = None, attn: str = "auto",
          progress: bool = True) -> PatchResult:
    """Activation patching over positions × layers: each clean persona's activation patched into
    the ``corrupt`` persona's run (or each persona into the next, ``corrupt="next"``), effects
    as the share of KL(clean ‖ corrupt) removed and of the logit difference restored, averaged
    over persona pairs and the first ``n_questions`` questions.

    ``hook`` is the component patched exactly (``resid_pre``, ``resid_post``, ``attn_out``,
    ``mlp_out``, ``head``); ``method="attribution"`` estimates every component from one
    backward pass per example, ``"both"`` reports the two side by side. Clean personas:
    ``clean_personas`` by name, else with a store the ``n_personas`` farthest from the corrupt
    persona on its axis, else the first ``n_personas``. With ``store``, the model and phrasing
    default to the store's (a different model is an error). ``layers`` default to 8 spread
    over the model; ``positions`` use the position grammar, ``"system"`` being every
    system-text token. ``control`` adds the exact grid once more with the corrupt persona's own
    prompt in another phrasing as the clean run (no persona change): what a cell does when the
    system prompts differ only in wording. ``.save(out)`` writes patch.json, figures and patch.md.
    """
    from tlpersona.interventions.patching import (
        PatchConfig,
        check_config,
        check_inputs,
        run_patching,
    )
    from tlpersona.interventions.runner import HOOKS, Runner
    from tlpersona.interventions.selection import choose_clean

    if hook not in HOOKS:
        raise TlpersonaError(f"unknown `hook` {hook!r} ({', '.join(HOOKS)})")
    if n_questions < 1:
        raise TlpersonaError("`n_questions` must be at least 1")
    st = None if store is None else as_store(store)
    prov = st.provenance if st is not None else {}
    ps = (store_personas(st, personas, "personas") if st is not None
          else builtin_personas() if personas is None else list(personas))
    qs = (builtin_questions() if questions is None else list(questions))[:n_questions]
    keep = None if corrupt == "next" else corrupt
    chosen, note = choose_clean(ps, keep, n_personas,
                                list(clean_personas) if clean_personas else None, st)
    # every option checked against the model's shape before the model loads
    if isinstance(model, LoadedModel):
        n_layers = model.info.n_layers
    else:
        source, _ = resolve(model or prov.get("model", "default"))
        n_layers = int(load_config(source).num_hidden_layers)
    cfg = PatchConfig(
        layers=(resolve_layers(layers, n_layers) if layers is not None
                else _spread_layers(n_layers)),
        positions=list(positions), hook=hook, method=method, corrupt=corrupt,
        response_tokens=response_tokens, prompt_index=_store_phrasing(prov, prompt_index),
        progress=progress, control=control)
    check_config(cfg, n_layers)
    check_inputs(chosen, qs, cfg)
    loaded = _model_for(model, prov, device, dtype, attn)
    res = run_patching(Runner(loaded), chosen, qs, cfg, personas_note=note)
    if st is not None and res.inputs is not None:  # the store chose the clean personas
        res.inputs = replace(res.inputs, store_manifest_hash=st.manifest_hash)
    return res


def eval_questions(store: Store, questions: list[Question], n: int, needed: int
                   ) -> tuple[list[Question], str]:
    """Up to ``n`` questions the store's vectors were not built from; the first ``n`` of all
    of them (and a note saying so) when fewer than ``needed`` such remain. Fewer than
    ``needed`` in all cannot give every test of the run: refused before any forward pass."""
    if n < needed:
        raise TlpersonaError(f"`n_questions` must be at least {needed} ({_question_roles(needed)})")
    fresh = [q for q in questions if q.id not in set(store.questions)]
    if len(fresh) >= needed:
        return fresh[:n], (f"Questions are ones the persona vectors were not built from "
                           f"(not among the store's {len(store.questions)}).")
    if len(questions) < needed:
        raise TlpersonaError(f"`questions` holds {len(questions)} question(s); steering needs at "
                             f"least {needed} ({_question_roles(needed)})")
    return questions[:n], (f"Fewer than {needed} questions are left outside the store's, so "
                           "the persona vectors were built from these same questions.")


def _question_roles(needed: int) -> str:
    score = needed - 1
    return (f"one to select the setting on, {score} to score it on"
            + (": recipes are ranked by a sign-flip test over the scoring questions"
               if score > 1 else ""))


def steer(store: Store | str | Path, model: str | LoadedModel | None = None,
          persona_source: Sequence[Persona] | None = None,
          questions: Sequence[Question] | None = None, *, n_questions: int = 8,
          personas: Sequence[str] | None = None, n_personas: int = 4,
          base: str = "assistant", recipes: Sequence[str] | None = None,
          layers: Sequence[int] | None = None, operators: Sequence[str] = ("add", "ablate", "cap"),
          alphas: Sequence[float] | None = None, cap_percentiles: Sequence[float] | None = None,
          n_random: int = 10, random_test: str = "t", response_tokens: int = 16,
          prompt_index: int | None = None,
          seed: int = 0, n_boot: int = 2000, fluency_margin: float = 0.5, continuations: int = 2,
          continuation_tokens: int = 24, device: str | None = None, dtype: str | None = None,
          attn: str = "auto", progress: bool = True) -> SteeringResult:
    """Steering, ablation and capping with each stored recipe's persona vectors.

    ``persona_source`` must be the persona set the store was made with (their system prompts
    are needed; the store keeps their hash); default: the built-in set. Settings (layer, alpha in
    units of the layer's typical residual norm) are selected on one half of up to
    ``n_questions`` questions the store was not built from and scored on the other half,
    against ``n_random`` random directions and the other personas' vectors, with bootstrap
    intervals. "Beyond random" (Holm over recipes × operators): ``random_test="t"``, a
    one-sided t-prediction test over the random directions' effects, used where they are not
    right-skewed (else the rank p), which can be significant with the default 10 directions;
    ``"rank"``, the exact rank p, which needs at least tests / 0.05 directions.
    ``personas`` names the steered personas; default: the ``n_personas`` farthest
    from ``base`` on its axis. ``.save(out)`` writes steering.json, figures and steering.md.
    """
    from tlpersona.infra.checks import check_finite_numbers
    from tlpersona.interventions.steering import SteerConfig
    from tlpersona.interventions.steering import steer as _steer
    from tlpersona.interventions.steering.config import (
        DEFAULT_ALPHAS,
        DEFAULT_PERCENTILES,
        check_config,
        min_questions,
    )

    st = as_store(store)
    prov = st.provenance
    ps = store_personas(st, persona_source, "persona_source")
    for name, values in (("alphas", alphas), ("cap_percentiles", cap_percentiles)):
        if values is not None:
            check_finite_numbers(values, f"`{name}`")
    cfg = SteerConfig(
        recipes=[p.name for p in parse_positions(list(recipes))] if recipes else None,
        layers=stored_layers(st, layers), operators=list(operators),
        alphas=list(alphas) if alphas is not None else list(DEFAULT_ALPHAS),
        cap_percentiles=(list(cap_percentiles) if cap_percentiles is not None
                         else list(DEFAULT_PERCENTILES)),
        personas=list(personas) if personas else None, n_personas=n_personas, base=base,
        n_random=n_random, random_test=random_test, response_tokens=response_tokens,
        prompt_index=_store_phrasing(prov, prompt_index), seed=seed, n_boot=n_boot,
        fluency_margin=fluency_margin, continuations=continuations,
        continuation_tokens=continuation_tokens, progress=progress)
    check_config(cfg, st)  # before the model is loaded
    for p in ps:
        system_prompt(p, cfg.prompt_index)
    qs, note = eval_questions(st, builtin_questions() if questions is None else list(questions),
                              n_questions, min_questions(cfg, st))
    loaded = _model_for(model, prov, device, dtype, attn)
    return _steer(st, loaded, ps, qs, cfg, questions_note=note)


def export_intervention(steering: str | Path, store: Store | str | Path, out: str | Path, *,
                        persona_source: Sequence[Persona] | None = None,
                        personas: Sequence[str] | None = None, recipe: str | None = None,
                        formats: Sequence[str] = ("safetensors", "pt", "gguf"),
                        model: str | LoadedModel | None = None,
                        overwrite: bool = False) -> list[Intervention]:
    """Write the ``add`` intervention a steering result evaluated, per persona, where other tools
    apply it (see :mod:`tlpersona.interventions.export`): the vector as added (``alpha · s_l`` times
    the unit persona vector), its layer, the first edited token and the base persona's system
    prompt it was added to, and llama.cpp's scale and layer range. ``steering``: ``tlpersona
    steer``'s output directory (or its steering.json); ``store``: the store it ran on;
    ``persona_source``: the persona set the store was made with (for the base persona's
    prompt); ``personas``: steered personas (default: all of them); ``recipe``: default the
    best-ranked one; ``model``: only its tokenizer is read, for the start token (default: the
    store's model). ``out`` is a new directory (an earlier export there only with
    ``overwrite``), written whole or not at all."""
    from tlpersona.chat.template import ChatRenderer
    from tlpersona.infra.resultsets import results_set
    from tlpersona.interventions import export as iv
    from tlpersona.interventions.steering.evaluate import after_system
    from tlpersona.models.loading import load_tokenizer

    record = iv.read_steering(steering)
    setting, names = iv.choose(record, recipe, list(personas) if personas else None)
    iv.check_formats(list(formats), setting.layer)
    st = as_store(store)
    by_name = {p.name: p for p in store_personas(st, persona_source, "persona_source")}
    base_prompt = system_prompt(by_name[record.base], record.prompt_index)
    tokenizer = (model.tokenizer if isinstance(model, LoadedModel)
                 else load_tokenizer(resolve(model or st.provenance.get("model", "default"))[0]))
    spans = ChatRenderer(tokenizer).prompt(base_prompt, "What do you think?")
    anchor = "sys_end+1" if "sys_end" in spans.anchors else "sys_last+1"
    items = iv.build(st, record, setting, names, (after_system(spans), anchor), base_prompt)
    with results_set(out, "intervention", overwrite) as stage:
        iv.write(items, stage, list(formats))
    return items

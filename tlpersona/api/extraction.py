"""Extraction and generation runs: everything checked before the first write, then model work."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tlpersona.cache.ownership import clear_store, store_dir_state
from tlpersona.cache.reader import Store, open_store
from tlpersona.cache.writer import check_parts
from tlpersona.chat.positions import Position, parse_positions
from tlpersona.chat.template import template_hash
from tlpersona.data import Persona, Question, builtin_personas, builtin_questions, indexed_prompts
from tlpersona.data.provenance import check_compatible, check_ours
from tlpersona.data.provenance import header as response_header
from tlpersona.data.responses import Key, Response, ResponsesFile, read_responses, read_responses_file
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, extract_to_store, provenance_of
from tlpersona.extraction.generation import check_prompts as check_saved
from tlpersona.extraction.generation import generate_responses
from tlpersona.extraction.preflight import (
    PromptCheck,
    check_context,
    check_prompts,
    check_response_keys,
    check_responses,
    coverage,
)
from tlpersona.infra.checks import check_count
from tlpersona.infra.locks import exclusive
from tlpersona.infra.paths import check_new_file, check_output_dir, check_output_file, in_store
from tlpersona.models.layers import LayerSpec, resolve_layers
from tlpersona.models.loading import (
    LoadedModel,
    check_device,
    load_config,
    load_hf,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve,
)
from tlpersona.runtime.distributed import Ranks, ranks

#: Recipes ``extract`` reads when none are named.
DEFAULT_POSITIONS = ("last", "sys_end", "sys_end+1")
PromptIndex = int | Literal["all"]


def _model_spec(model: str | LoadedModel, device: str | None, dtype: str | torch.dtype | None
                ) -> tuple[str, str | None, str | None]:
    """(spec, device, dtype name) of a model given by spec or already loaded."""
    if isinstance(model, LoadedModel):
        return model.info.spec, model.device, str(model.dtype).replace("torch.", "")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    return model, device, dtype


def _resolve_once(spec: str, rk: Ranks) -> None:
    """Under torchrun, rank 0 fetches/converts the model first; the others then read its cache."""
    if rk.world > 1:
        if rk.main:
            resolve(spec)
        rk.barrier()


@dataclass
class _Plan:
    """What a run was checked to do, before it writes anything."""

    source: str
    identity: str
    tokenizer: Any
    device: str
    dtype: torch.dtype
    n_layers: int
    vocab: int
    context: int | None
    max_new_tokens: int
    checked: dict[Key, PromptCheck]
    header: dict[str, Any]


def _plan(model: str, device: str | None, dtype: str | None, device_map: str | None,
          positions: list[Position], personas: list[Persona], questions: list[Question],
          prompt_index: PromptIndex, max_new_tokens: int | None, generating: bool) -> _Plan:
    """Resolve the model (tokenizer and config only) and check every prompt of the run."""
    rk = ranks()
    if device_map and rk.world > 1:
        raise TlpersonaError("`device_map` and torchrun do not combine: use one or the other")
    dev = device or rk.device()
    check_device(dev)
    tdtype = pick_dtype(dtype, dev)
    _resolve_once(model, rk)
    source, identity = resolve(model)
    tok = load_tokenizer(source)
    config = load_config(source)
    n_new = max_new_tokens or (200 if dev.startswith("cuda") else 48)
    context = getattr(config, "max_position_embeddings", None)
    checked = check_prompts(tok, positions, personas, questions, prompt_index)
    check_context(checked, context, n_new if generating else 0)
    header = response_header(identity, template_hash(tok), str(tdtype).replace("torch.", ""), n_new)
    return _Plan(source, identity, tok, dev, tdtype, int(config.num_hidden_layers),
                 int(config.vocab_size), context, n_new, checked, header)


def _data(personas: Sequence[Persona] | None, questions: Sequence[Question] | None
          ) -> tuple[list[Persona], list[Question]]:
    ps = builtin_personas() if personas is None else list(personas)
    qs = builtin_questions() if questions is None else list(questions)
    if not ps:
        raise TlpersonaError("`personas` is empty")
    if not qs:
        raise TlpersonaError("`questions` is empty")
    return ps, qs


def _generate(plan: _Plan, dtype: str | None, personas: list[Persona], questions: list[Question],
              prompt_index: PromptIndex, out: Path, batch_size: int | None, progress: bool,
              decoder: str, device_map: str | None) -> dict[Key, Response]:
    hf = load_hf(plan.source, plan.device, pick_dtype(dtype, plan.device), device_map=device_map)
    try:
        # CUDA graphs cannot capture a device-mapped model's forward
        return generate_responses(hf, plan.tokenizer, personas, questions, prompt_index, out,
                                  plan.max_new_tokens, batch_size, progress, decoder,
                                  graphs=not device_map, header=plan.header)
    finally:
        del hf
        gc.collect()


def extract(model: str | LoadedModel = "default", personas: Sequence[Persona] | None = None,
            questions: Sequence[Question] | None = None, *,
            positions: Sequence[str] = DEFAULT_POSITIONS, layers: LayerSpec = "default",
            out: str | Path = "tlpersona-out/store", prompt_index: PromptIndex = 0,
            batch_size: int | None = None, max_new_tokens: int | None = None,
            responses: str | Path | None = None, include_eot: bool = False,
            force_new: bool = False, device: str | None = None,
            dtype: str | torch.dtype | None = None, attn: str = "auto", decoder: str = "auto",
            device_map: str | None = None, progress: bool = True) -> Store:
    """Extract residual-stream vectors at named positions into an activation store at ``out``.

    ``model`` is a spec (``"default"``, a hub id, a model directory, a ``.gguf``) or a model from
    :func:`tlpersona.load_model` (its bridge is reused; its device and dtype apply).
    ``personas``/``questions`` default to the built-in sets. ``positions`` are names of the
    position grammar (``"last"``, ``"sys_end+1"``, recipe aliases, ``"all6"``); ``layers`` are
    block indices (negative from the end), ``"default"`` or ``"all"``. Responses are generated
    when a position needs them (fused with extraction on a GPU), unless ``responses`` names a
    JSONL file made elsewhere (:mod:`tlpersona.data.responses` says what a line may hold). That
    file must exist even when no position reads it, and every line must answer a prompt of this
    run; a prompt without a line (or with an empty response) gets invalid rows in
    ``Store.valid``, and one line on stderr says how many, while a persona left without any
    row is refused. ``batch_size=None`` sizes batches from free GPU memory.

    Everything is checked before the first write or forward pass (options, data, every prompt
    against every position and layer, the state of ``out``); ``force_new`` then removes only
    what the store format owns. ``out`` is locked for the run: a second run on it stops at
    once, naming the holder's PID. Returns the finished store (resumed where it stopped).
    """
    spec, device, dtype_name = _model_spec(model, device, dtype)
    pos = parse_positions(",".join(positions)) if positions else []
    if not pos:
        raise TlpersonaError("`positions` is empty")
    check_count(batch_size, "`batch_size`", 1)
    check_count(max_new_tokens, "`max_new_tokens`", 1)
    ps, qs = _data(personas, questions)
    out = Path(out)
    check_output_dir(out)
    if force_new and out.is_symlink():
        raise TlpersonaError(f"`out` {out} is a symbolic link; `force_new` does not clear through links")
    needs = any(p.needs_response for p in pos)
    resp_path = Path(responses) if responses else out / "responses.jsonl"
    given = _read_given(resp_path, needs, ps, qs, prompt_index) if responses else None
    plan = _plan(spec, device, dtype_name, device_map, pos, ps, qs, prompt_index, max_new_tokens,
                 needs and given is None)
    cfg = ExtractConfig(positions=pos, layers=resolve_layers(layers, plan.n_layers),
                        prompt_index=prompt_index, batch_size=batch_size,
                        include_eot=include_eot, progress=progress)
    expected = provenance_of(spec, plan.identity, plan.tokenizer, plan.dtype, cfg, ps, qs, None)
    resp: dict[Key, Response] | None = None
    if given is not None:
        check_compatible(resp_path, given.header, plan.header, max_new_tokens is not None,
                         {given.where[k]: len(r.ids) for k, r in given.responses.items()})
        resp = given.responses
        check_responses(plan.checked, pos, resp, plan.vocab, include_eot, str(resp_path),
                        plan.context)
        note = coverage(plan.checked, resp).note(str(resp_path))
        if note and ranks().main:
            print(f"tlpersona: {note}", file=sys.stderr)
    keep = {resp_path} if responses else set()  # the user's file is never cleared or refused
    header = plan.header if needs and given is None else None
    _check_out(out, expected, force_new, keep, header)
    rk = ranks()
    with ExitStack() as held:
        # Rank 0 locks, checks and clears; its refusal reaches every rank, and the others
        # start writing only once it has finished.
        rk.agree(lambda: _claim(held, out, expected, force_new, keep, header, plan, resp_path)
                 if rk.main else None)
        if needs and given is None and _fused(decoder, plan.device, device_map, out, resp_path,
                                              ps, qs, prompt_index, cfg):
            return _run_fused(spec, plan, cfg, batch_size, ps, qs, out, resp_path, rk)
        if needs and given is None:
            resp = _generate(plan, dtype_name, ps, qs, prompt_index, resp_path,
                             batch_size and max(batch_size, 16), progress, decoder, device_map)
            check_responses(plan.checked, pos, resp, plan.vocab, include_eot, str(resp_path),
                            plan.context)
        bridge = (model if isinstance(model, LoadedModel)
                  else load_model(spec, plan.device, dtype_name, attn, device_map))
        stats: dict[str, int] = {}
        path = extract_to_store(bridge, cfg, ps, qs, out, resp, stats=stats, keep=keep)
    who = f" (rank {rk.rank} of {rk.world})" if rk.world > 1 else ""
    print(f"tlpersona: extracted {stats['computed']} personas ({stats['reused']} already in the "
          f"store){who}", file=sys.stderr)
    return open_store(path)


def _read_given(path: Path, needs: bool, personas: list[Persona], questions: list[Question],
                prompt_index: PromptIndex) -> ResponsesFile | None:
    """A responses file the user names: it must exist even when no position reads it (a typo
    is never ignored); when read, every line must answer a prompt of this run. Both before
    any model is loaded."""
    if not path.is_file():
        what = ("is a directory, expected a responses JSONL file" if path.is_dir()
                else "not a regular file" if path.exists() else "responses file not found")
        raise TlpersonaError(f"`responses` {path}: {what}")
    if not needs:
        print(f"tlpersona: no position reads responses; `responses` {path} is not read",
              file=sys.stderr)
        return None
    given = read_responses_file(path)
    outside = check_response_keys(given.where, personas, questions, prompt_index)
    if outside:
        persona, pidx, qid = outside[0]
        print(f"tlpersona: {path}: {len(outside)} of {len(given.where)} lines answer prompts this "
              f"run does not ask for and are left out (first: {given.where[outside[0]]}, persona "
              f"{persona!r}, phrasing {pidx}, question {qid!r})", file=sys.stderr)
        for key in outside:
            del given.responses[key], given.where[key]
    return given


def _claim(held: ExitStack, out: Path, expected: dict[str, Any], force_new: bool, keep: set[Path],
           header: dict[str, Any] | None, plan: _Plan, resp_path: Path) -> None:
    """Under the lock of ``out`` (held until ``held`` closes): check ``out`` again, clear it
    for ``force_new``, and check that the responses a run of ours saved there (which it will
    reuse) continue this run's prompts, before any model is loaded."""
    held.enter_context(exclusive(out, "`out`"))
    _check_out(out, expected, force_new, keep, header)
    if force_new:
        clear_store(out, keep)  # before generation: a new store gets new responses too
    if header is not None:
        check_saved(read_responses(resp_path, resume=True),
                    {k: c.sha for k, c in plan.checked.items()}, resp_path)


def _check_out(out: Path, expected: dict[str, Any], force_new: bool, keep: set[Path],
               header: dict[str, Any] | None) -> None:
    """Refuse, before anything is touched, an ``out`` this run may not write: a directory that
    is not a store, a store made with other settings (unless ``force_new``), a responses file in
    it that is not ours or was made with other generation settings."""
    resp = out / "responses.jsonl"
    if header is not None and not force_new:
        check_ours(resp, header, "`out`")
    manifest = store_dir_state(out, keep)
    if not force_new:  # parts a killed run of other settings left, before hours of generation
        check_parts(out, expected, frozenset({"responses_hash"}))
    if manifest is not None and not force_new:
        old = manifest.get("provenance") or {}
        diff = [k for k in expected if k != "responses_hash" and old.get(k) != expected[k]]
        if diff:
            raise TlpersonaError(f"{out} holds a store made with a different {', '.join(diff)}; "
                                 "use another `out` or `force_new`")
    if force_new and resp not in keep and resp.exists():
        check_ours(resp, None, "`out`")  # ours is replaced; a foreign one is never removed


def _fused(decoder: str, device: str, device_map: str | None, out: Path, resp_path: Path,
           personas: list[Persona], questions: list[Question], prompt_index: PromptIndex,
           cfg: ExtractConfig) -> bool:
    """Generate and extract in one pass (tlpersona.extraction.fused) when the static decoder generates the
    responses here: always for a store that a fused run started; otherwise unless every
    response is already on disk (then extraction alone is the shorter way), or a position needs
    tokens after the response (:func:`tlpersona.extraction.fused.fusable`)."""
    from tlpersona.extraction.fused import fusable, fused_marked

    static = decoder == "static" or (decoder == "auto" and device.startswith("cuda"))
    if not static or device_map:
        return False
    if not fusable(cfg):
        print("tlpersona: response_mean_seed reads the template's closing tokens after each "
              "response, which decoding never feeds: generating first, then extracting in a "
              "second pass", file=sys.stderr)
        return False
    if fused_marked(out):
        return True
    have = read_responses(resp_path, resume=True)
    return any((p.name, k, q.id) not in have for p in personas
               for k, _ in indexed_prompts(p, prompt_index) for q in questions)


def _run_fused(spec: str, plan: _Plan, cfg: ExtractConfig, batch_size: int | None,
               personas: list[Persona], questions: list[Question], out: Path, resp_path: Path,
               rk: Ranks) -> Store:
    """Generate and extract in one pass (the run was checked and ``out`` locked by the caller)."""
    from tlpersona.extraction.fused import FusedConfig, fused_extract_to_store
    from tlpersona.models.loading import model_info

    hf = load_hf(plan.source, plan.device, plan.dtype)
    info = model_info(spec, plan.source, plan.identity, hf.config)
    stats: dict[str, int] = {}
    path = fused_extract_to_store(hf, plan.tokenizer, info, cfg,
                                  FusedConfig(plan.max_new_tokens, batch_size), personas,
                                  questions, out, resp_path, stats=stats, header=plan.header)
    who = f" (rank {rk.rank} of {rk.world})" if rk.world > 1 else ""
    print(f"tlpersona: generated and extracted {stats['computed']} personas in one pass "
          f"({stats['reused']} already in the store){who}", file=sys.stderr)
    return open_store(path)


def generate(model: str | LoadedModel = "default", personas: Sequence[Persona] | None = None,
             questions: Sequence[Question] | None = None, *,
             out: str | Path = "tlpersona-out/responses.jsonl", prompt_index: PromptIndex = 0,
             max_new_tokens: int | None = None, batch_size: int | None = None,
             device: str | None = None, dtype: str | None = None, decoder: str = "auto",
             device_map: str | None = None, progress: bool = True) -> dict[Key, Response]:
    """Greedy responses for every persona × question into the JSONL file ``out`` (resumable).

    ``model`` is a spec or a model from :func:`tlpersona.load_model` (its spec, device and dtype
    apply; generation runs on a plain HF copy of it). ``out`` must be missing, empty or a
    tlpersona responses file made with the same model, template and generation settings, and
    not inside a store (a store's responses are written by ``extract``); its directory is
    locked for the run. The file is also the interchange format: responses another engine
    wrote in it are read by ``extract(responses=...)``. Returns the responses by (persona,
    phrasing, question id).
    """
    spec, device, dtype = _model_spec(model, device, dtype)
    check_count(batch_size, "`batch_size`", 1)
    check_count(max_new_tokens, "`max_new_tokens`", 1)
    ps, qs = _data(personas, questions)
    path = Path(out)
    check_output_file(path)
    _not_in_store(path)
    check_ours(path, None, "`out`")
    plan = _plan(spec, device, dtype, device_map, [], ps, qs, prompt_index, max_new_tokens, True)
    check_ours(path, plan.header, "`out`")
    rk = ranks()
    with ExitStack() as held:
        rk.agree(lambda: held.enter_context(exclusive(path.parent, "the directory of `out`"))
                 if rk.main else None)
        return _generate(plan, dtype, ps, qs, prompt_index, path, batch_size, progress, decoder,
                         device_map)


def _not_in_store(path: Path) -> None:
    """A store's responses file belongs to the store: appending to it would change the
    responses its vectors were read from (and ``verify`` could not tell)."""
    if in_store(path.parent):
        raise TlpersonaError(f"`out` {path} lies inside a store's directory, whose responses "
                             "`extract` writes; generate into another file")


def write_prompts(model: str | LoadedModel = "default", personas: Sequence[Persona] | None = None,
                  questions: Sequence[Question] | None = None, *,
                  out: str | Path = "tlpersona-out/prompts.jsonl",
                  prompt_index: PromptIndex = 0, overwrite: bool = False) -> int:
    """Write every prompt a run would generate from, for another engine (vLLM, llama.cpp …) to
    continue: a JSONL file, one line per (persona, phrasing, question) with ``persona``,
    ``prompt_index``, ``question_id``, the templated ``prompt_ids`` (generation prompt
    included), ``prompt_text`` and ``prompt_sha``. The engine writes back, per line, the same
    keys with ``response_ids`` (the generated ids, end-of-turn token included when emitted),
    ``finished`` and optionally ``prompt_sha``; ``extract(responses=...)`` reads that file
    (:mod:`tlpersona.data.responses` says what it accepts). ``model`` is a spec or a model from
    :func:`tlpersona.load_model` (its tokenizer is used). Written under a temporary name, then
    renamed; an existing ``out`` is replaced only with ``overwrite``. Returns the number of
    prompts."""
    import json

    from tlpersona.extraction.generation import prompt_lines
    from tlpersona.infra.files import atomic_write_bytes

    ps, qs = _data(personas, questions)
    path = Path(out)
    check_new_file(path, overwrite)
    tokenizer = (model.tokenizer if isinstance(model, LoadedModel)
                 else load_tokenizer(resolve(model)[0]))
    lines = prompt_lines(tokenizer, ps, qs, prompt_index)
    atomic_write_bytes(path, "".join(json.dumps(line) + "\n" for line in lines).encode())
    return len(lines)

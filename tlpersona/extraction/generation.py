"""Greedy response generation, saved as resumable JSONL with the generated token ids (the
format of :mod:`tlpersona.data.responses`). Generation uses a plain (un-bridged) HF model."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tlpersona.chat.template import ChatRenderer
from tlpersona.data import Persona, Question, indexed_prompts
from tlpersona.data.provenance import check_ours, prompt_sha
from tlpersona.data.responses import (
    Key,
    Response,
    append_lines,
    drop_torn_tail,
    merge_rank_files,
    rank_files,
    read_responses,
    response_line,
)
from tlpersona.errors import TlpersonaError
from tlpersona.runtime.batching import generate_batch, pad_batch, pad_id
from tlpersona.runtime.distributed import ranks

DECODERS = ("auto", "hf", "static")


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise TlpersonaError("the model defines no end-of-sequence token")
    return ids


@torch.no_grad()
def greedy_batch(model: Any, prompts: list[list[int]], max_new_tokens: int,
                 eos: list[int], pad_id: int) -> list[Response]:
    """Plain HF greedy decoding of a left-padded batch; returns each row's generated ids."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids, mask = pad_batch(prompts, pad_id, "left")
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos,
        temperature=None, top_p=None, top_k=None,
    )
    result = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        result.append(Response(row if cut is None else row[: cut + 1], cut is not None))
    return result


def prompt_lines(tokenizer: Any, personas: list[Persona], questions: list[Question],
                 prompt_index: int | str) -> list[dict[str, Any]]:
    """The prompts file's lines: every (persona, phrasing, question) prompt as templated token
    ids and text, keyed as the responses file is, with the prompt hash a response echoes."""
    return [{"persona": key[0], "prompt_index": key[1], "question_id": key[2], "prompt_ids": ids,
             "prompt_text": tokenizer.decode(ids), "prompt_sha": prompt_sha(ids)}
            for key, ids in prompt_jobs(tokenizer, personas, questions, prompt_index)]


def prompt_jobs(tokenizer: Any, personas: list[Persona], questions: list[Question],
                prompt_index: int | str) -> list[tuple[Key, list[int]]]:
    """Every (persona, phrasing, question) key with its templated prompt ids."""
    renderer = ChatRenderer(tokenizer)
    return [((persona.name, pidx, q.id), renderer.prompt(system, q.text).ids)
            for persona in personas for pidx, system in indexed_prompts(persona, prompt_index)
            for q in questions]


def generate_responses(model: Any, tokenizer: Any, personas: list[Persona],
                       questions: list[Question], prompt_index: int | str, out_path: str | Path,
                       max_new_tokens: int, batch_size: int | None = None,
                       progress: bool = True, decoder: str = "auto",
                       graphs: bool = True, header: dict[str, Any] | None = None
                       ) -> dict[Key, Response]:
    """Generate every missing (persona, prompt, question) response into ``out_path`` (JSONL).

    Resumable: keys already in the file are kept; each batch is appended and fsynced.
    ``decoder``: ``hf`` (HF ``generate``), ``static`` (:mod:`tlpersona.runtime.decode`: static cache,
    CUDA graphs on a GPU unless ``graphs`` is false) or ``auto`` (static on CUDA, hf elsewhere).
    ``header`` (:func:`tlpersona.data.provenance.header`) starts a new file; an existing one
    must carry the same, and its responses must continue this run's prompts.
    """
    if decoder not in DECODERS:
        raise TlpersonaError(f"unknown decoder {decoder!r} (auto, hf or static)")
    if max_new_tokens < 1:
        raise TlpersonaError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if header is not None:
        for p in [Path(out_path), *rank_files(Path(out_path))]:
            check_ours(p, header, "responses file")
    have = read_responses(out_path, resume=True)
    jobs = prompt_jobs(tokenizer, personas, questions, prompt_index)
    # Batches are fixed over every job (similar lengths together), not just the missing ones, so
    # a resumed run decodes each prompt in the same batch as an uninterrupted run would, and gets
    # the same tokens. A batch with any response missing is decoded again; only the missing
    # responses are written.
    check_prompts(have, {key: prompt_sha(ids) for key, ids in jobs}, out_path)
    order = sorted(range(len(jobs)), key=lambda i: (len(jobs[i][1]), i))
    if batch_size is None:  # from free memory; fixed by the data and the card
        batch_size = generate_batch(next(model.parameters()).device, model.config, model.dtype,
                                    len(jobs), max((len(j[1]) for j in jobs), default=1),
                                    max_new_tokens)
    batches = [[jobs[i] for i in order[a:a + batch_size]] for a in range(0, len(order), batch_size)]
    rk = ranks()
    todo = [b for b in batches[rk.rank::rk.world] if any(key not in have for key, _ in b)]
    main = Path(out_path)
    # Under torchrun each rank appends to its own file; rank 0 merges them at the end.
    path = main if rk.world == 1 else main.with_name(f"{main.stem}.rank{rk.rank}{main.suffix}")
    if todo:
        _generate(model, tokenizer, todo, have, path, max_new_tokens, progress and rk.main,
                  decoder, graphs, header)
    rk.barrier()
    if rk.main:
        merge_rank_files(main)  # also after a torchrun that was killed and is resumed by one process
    rk.barrier()
    return read_responses(main, resume=True) if rk.world > 1 else have


def check_prompts(have: dict[Key, Response], prompt_shas: dict[Key, str],
                  where: str | Path) -> None:
    """Every saved response that records its prompt continues this run's prompt for its key
    (``prompt_shas``: :func:`tlpersona.data.provenance.prompt_sha` of each prompt)."""
    for key, sha in prompt_shas.items():
        r = have.get(key)
        if r is not None and r.prompt_sha is not None and r.prompt_sha != sha:
            raise TlpersonaError(
                f"{where}: the response for persona {key[0]!r}, question {key[2]!r} continues a "
                "different prompt (system prompt, question or chat template changed); write "
                "to another output, or remove the file")


def _decoder(model: Any, name: str, max_new_tokens: int, eos: list[int], pad: int,
             graphs: bool = True) -> Callable[[list[list[int]]], list[Response]]:
    if name == "auto":
        name = "static" if next(model.parameters()).device.type == "cuda" else "hf"
    if name == "hf":
        return lambda prompts: greedy_batch(model, prompts, max_new_tokens, eos, pad)
    from tlpersona.runtime.decode import StaticGreedy

    engine = StaticGreedy(model, max_new_tokens, eos, pad, use_graphs=None if graphs else False)
    return lambda prompts: [Response(ids, bool(ids) and ids[-1] in eos) for ids in engine(prompts)]


def _generate(model: Any, tokenizer: Any, todo: list[list[tuple[Key, list[int]]]],
              have: dict[Key, Response], path: Path, max_new_tokens: int, progress: bool,
              decoder: str = "auto", graphs: bool = True,
              header: dict[str, Any] | None = None) -> None:
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    decode = _decoder(model, decoder, max_new_tokens, eos, pad, graphs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlpersonaError(f"cannot write {path}: {exc.strerror or exc}") from None
    drop_torn_tail(path)
    missing = sum(key not in have for b in todo for key, _ in b)
    bar = tqdm(total=missing, desc="generate", unit="resp", disable=not progress, file=sys.stderr)
    if header is not None and (not path.exists() or path.stat().st_size == 0):
        append_lines(path, [json.dumps(header) + "\n"])
    with bar:  # closed on an error too, so that its line ends before the error's
        for chunk in todo:
            responses = decode([c[1] for c in chunk])
            lines = []
            for (key, prompt), resp in zip(chunk, responses, strict=True):
                if key in have:
                    continue
                resp.prompt_sha = prompt_sha(prompt)
                lines.append(response_line(key, resp, tokenizer.decode(resp.ids,
                                                                       skip_special_tokens=True)))
            # on disk (fsynced) before it counts as had: a failed write leaves it missing, to
            # be generated again on resume
            append_lines(path, lines)
            for (key, _), resp in zip(chunk, responses, strict=True):
                have.setdefault(key, resp)
            bar.update(len(lines))

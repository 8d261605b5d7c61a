"""The steps behind the CLI commands, callable from a notebook with plain arguments."""

from __future__ import annotations

import gc
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpersona.cache.store import clear_store, store_dir_state
from tlpersona.conversation import ChatRenderer, template_hash
from tlpersona.data import load_personas, load_questions
from tlpersona.distributed import ranks
from tlpersona.errors import TlpersonaError
from tlpersona.extract import ExtractConfig, Extractor, extract_to_store, provenance_of
from tlpersona.generate import Key, Response, generate_responses, read_responses
from tlpersona.locks import exclusive
from tlpersona.models import (
    check_device,
    default_device,
    load_bridge,
    load_config,
    load_hf,
    load_tokenizer,
    parse_layers,
    pick_dtype,
    resolve,
)
from tlpersona.positions import parse_positions
from tlpersona.preflight import PromptCheck, check_context, check_prompts, check_responses
from tlpersona.response_provenance import check_compatible, check_ours
from tlpersona.response_provenance import header as response_header
from tlpersona.safety import (
    check_count,
    check_finite_numbers,
    check_output_dir,
    check_output_file,
    jsonl_lines,
    read_text,
)


@dataclass
class ExtractRequest:
    """Arguments of ``tlpersona extract``; every field has the CLI's default."""

    model: str = "default"
    device: str | None = None
    dtype: str | None = None
    personas: str = "builtin"
    questions: str = "builtin"
    prompt_index: int | str = 0
    limit_personas: int | None = None
    limit_questions: int | None = None
    positions: str = "last,sys_end,sys_end+1"
    layers: str = "default"
    out: str = "tlpersona-out/store"
    batch_size: int | None = None  # None: auto (tlpersona.batching)
    max_new_tokens: int | None = None
    responses: str | None = None
    include_eot: bool = False
    force_new: bool = False
    attn: str = "auto"
    decoder: str = "auto"
    device_map: str | None = None
    progress: bool = True


def _generate(source: str, device: str, dtype: str | None, tokenizer, personas, questions,
              prompt_index, out: str | Path, max_new_tokens: int, batch_size: int | None,
              progress: bool = True, decoder: str = "auto",
              device_map: str | None = None,
              header: dict[str, Any] | None = None) -> dict[Key, Response]:
    hf = load_hf(source, device, pick_dtype(dtype, device), device_map=device_map)
    try:
        # CUDA graphs cannot capture a device-mapped model's forward
        return generate_responses(hf, tokenizer, personas, questions, prompt_index, out,
                                  max_new_tokens, batch_size, progress, decoder,
                                  graphs=not device_map, header=header)
    finally:
        del hf
        gc.collect()


def _resolve_once(spec: str, rk: Any) -> None:
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
    dtype: Any
    n_layers: int
    vocab: int
    context: int | None
    max_new_tokens: int
    checked: dict[Key, PromptCheck]
    header: dict[str, Any]


def _plan(model: str, device: str | None, dtype: str | None, device_map: str | None,
          positions: list[Any], personas: list[Any], questions: list[Any],
          prompt_index: int | str, max_new_tokens: int | None, generating: bool) -> _Plan:
    """Resolve the model (tokenizer and config only) and check every prompt of the run."""
    rk = ranks()
    if device_map and rk.world > 1:
        raise TlpersonaError("--device-map and torchrun do not combine: use one or the other")
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


def _check_counts(batch_size: int, max_new_tokens: int | None) -> None:
    check_count(batch_size, "--batch-size", 1)
    check_count(max_new_tokens, "--max-new-tokens", 1)


def run_extract(req: ExtractRequest) -> Path:
    """Load data and model, generate missing responses if a response position needs them,
    extract into ``req.out``. Returns the store path.

    Everything is checked before the first write or generation (options, data, every prompt
    against every position and layer, the state of ``req.out``); ``force_new`` then removes only
    what the store format owns (:func:`tlpersona.cache.store.clear_store`). ``req.out`` is
    locked for the run: a second run on it stops at once, naming the holder's PID.
    """
    positions = parse_positions(req.positions)
    _check_counts(req.batch_size, req.max_new_tokens)
    personas = load_personas(req.personas, req.limit_personas)
    questions = load_questions(req.questions, req.limit_questions)
    out = Path(req.out)
    check_output_dir(out)
    if req.force_new and out.is_symlink():
        raise TlpersonaError(f"--out {out} is a symbolic link; --force-new does not clear through links")
    needs = any(p.needs_response for p in positions)
    resp_path = Path(req.responses) if req.responses else out / "responses.jsonl"
    if needs and req.responses and not resp_path.exists():
        raise TlpersonaError(f"{resp_path}: responses file not found")
    given = read_responses(resp_path) if needs and req.responses else None
    if given is not None:
        known = {p.name for p in personas}
        unknown = sorted({k[0] for k in given} - known)
        if unknown:
            raise TlpersonaError(f"{resp_path}: responses for unknown persona {unknown[0]!r}")
    plan = _plan(req.model, req.device, req.dtype, req.device_map, positions, personas, questions,
                 req.prompt_index, req.max_new_tokens, needs and given is None)
    cfg = ExtractConfig(positions=positions, layers=parse_layers(req.layers, plan.n_layers),
                        prompt_index=req.prompt_index, batch_size=req.batch_size,
                        include_eot=req.include_eot, progress=req.progress)
    expected = provenance_of(req.model, plan.identity, plan.tokenizer, plan.dtype, cfg, personas,
                             questions, None)
    keep = {resp_path} if given is not None else set()
    _check_out(out, expected, req.force_new, keep, plan.header if needs and given is None else None)
    rk = ranks()
    with exclusive(out, "--out") if rk.main else nullcontext():
        if rk.main:
            _check_out(out, expected, req.force_new, keep,
                       plan.header if needs and given is None else None)
            if req.force_new:
                clear_store(out, keep)  # before generation: a new store gets new responses too
        rk.barrier()  # other ranks start writing only once rank 0 has checked and cleared
        responses = None
        if given is not None:
            check_compatible(resp_path, plan.identity, expected["template_hash"])
            responses = given
        elif needs and _fused(req, plan.device, resp_path, personas, questions):
            return _run_fused(req, plan, cfg, personas, questions, out, resp_path, rk)
        elif needs:
            responses = _generate(plan.source, plan.device, req.dtype, plan.tokenizer, personas,
                                  questions, req.prompt_index, resp_path, plan.max_new_tokens,
                                  req.batch_size and max(req.batch_size, 16), req.progress,
                                  req.decoder, req.device_map, plan.header)
        if responses is not None:
            check_responses(plan.checked, positions, responses, plan.vocab, req.include_eot,
                            str(resp_path), plan.context)
        model = load_bridge(req.model, plan.device, req.dtype, req.attn, req.device_map)
        stats: dict[str, int] = {}
        path = extract_to_store(model, cfg, personas, questions, out, responses, stats=stats,
                                keep=keep)
    who = f" (rank {rk.rank} of {rk.world})" if rk.world > 1 else ""
    print(f"tlpersona: extracted {stats['computed']} personas ({stats['reused']} already in the "
          f"store){who}", file=sys.stderr)
    return path


def _check_out(out: Path, expected: dict[str, Any], force_new: bool, keep: set[Path],
               header: dict[str, Any] | None) -> None:
    """Refuse, before anything is touched, an ``--out`` this run may not write: a directory that
    is not a store, a store made with other settings (unless ``force_new``), a responses file in
    it that is not ours or was made with other generation settings."""
    resp = out / "responses.jsonl"
    if header is not None and not force_new:
        check_ours(resp, header, "--out")
    manifest = store_dir_state(out, keep)
    if manifest is not None and not force_new:
        old = manifest.get("provenance") or {}
        diff = [k for k in expected if k != "responses_hash" and old.get(k) != expected[k]]
        if diff:
            raise TlpersonaError(f"{out} holds a store made with a different {', '.join(diff)}; "
                                 "use another --out or --force-new")
    if force_new and resp not in keep and resp.exists():
        check_ours(resp, None, "--out")  # ours is replaced; a foreign one is never removed


def _fused(req: ExtractRequest, device: str, resp_path: Path, personas, questions) -> bool:
    """Generate and extract in one pass (tlpersona.fused) when the static decoder generates the
    responses here: always for a store that a fused run started; otherwise unless every
    response is already on disk (then extraction alone is the shorter way)."""
    from tlpersona.data import indexed_prompts
    from tlpersona.fused import fused_marked

    static = req.decoder == "static" or (req.decoder == "auto" and device.startswith("cuda"))
    if not static or req.device_map:
        return False
    if fused_marked(req.out):
        return True
    have = read_responses(resp_path)
    return any((p.name, k, q.id) not in have for p in personas
               for k, _ in indexed_prompts(p, req.prompt_index) for q in questions)


def _run_fused(req: ExtractRequest, plan: _Plan, cfg: ExtractConfig, personas, questions,
               out: Path, resp_path: Path, rk: Any) -> Path:
    """Generate and extract in one pass (the run was checked and ``out`` locked by the caller)."""
    from tlpersona.fused import FusedConfig, fused_extract_to_store
    from tlpersona.models import model_info

    hf = load_hf(plan.source, plan.device, plan.dtype)
    info = model_info(req.model, plan.source, plan.identity, hf.config)
    stats: dict[str, int] = {}
    path = fused_extract_to_store(hf, plan.tokenizer, info, cfg,
                                  FusedConfig(plan.max_new_tokens, req.batch_size), personas,
                                  questions, out, resp_path, stats=stats, header=plan.header)
    who = f" (rank {rk.rank} of {rk.world})" if rk.world > 1 else ""
    print(f"tlpersona: generated and extracted {stats['computed']} personas in one pass "
          f"({stats['reused']} already in the store){who}", file=sys.stderr)
    return path


def run_generate(model: str, device: str | None, dtype: str | None, personas: str, questions: str,
                 prompt_index: int | str, limit_personas: int | None,
                 limit_questions: int | None, out: str, max_new_tokens: int | None,
                 batch_size: int | None, backend: str = "hf", decoder: str = "auto",
                 device_map: str | None = None) -> int:
    """``tlpersona generate``: returns the number of responses in ``out``.

    ``out`` must be missing, empty or a tlpersona responses file made with the same model,
    template and generation settings; its directory is locked for the run."""
    if backend == "vllm":
        raise TlpersonaError("the vllm backend is not available yet; use --backend hf")
    _check_counts(batch_size, max_new_tokens)
    ps = load_personas(personas, limit_personas)
    qs = load_questions(questions, limit_questions)
    path = Path(out)
    check_output_file(path)
    check_ours(path, None, "--out")
    plan = _plan(model, device, dtype, device_map, [], ps, qs, prompt_index, max_new_tokens, True)
    check_ours(path, plan.header, "--out")
    rk = ranks()
    with exclusive(path.parent, "the directory of --out") if rk.main else nullcontext():
        return len(_generate(plan.source, plan.device, dtype, plan.tokenizer, ps, qs, prompt_index,
                             path, plan.max_new_tokens, batch_size, decoder=decoder,
                             device_map=device_map, header=plan.header))


def describe_positions(model: str, system: str, question: str, spec: str) -> str:
    """Text showing the templated tokens with each requested position marked."""
    positions = parse_positions(spec)
    source, _ = resolve(model)
    tok = load_tokenizer(source)
    renderer = ChatRenderer(tok)
    spans = renderer.prompt(system, question)
    marks: dict[int, list[str]] = {}
    notes = []
    for pos in positions:
        if pos.kind == "raw":
            raw = renderer.raw_system(system)
            notes.append(f"{pos.name}: token {tok.convert_ids_to_tokens(raw[-1])!r} of the system "
                         f"text tokenised alone ({len(raw)} tokens, no template)")
            continue
        if pos.needs_response:
            notes.append(f"{pos.name}: needs a generated response (after token {spans.prompt_len - 1})")
            continue
        try:
            start, stop = pos.resolve(spans)
        except TlpersonaError as exc:
            notes.append(f"{pos.name}: {exc}")
            continue
        if stop - start == 1:
            marks.setdefault(start, []).append(pos.name)
        else:
            notes.append(f"{pos.name}: mean over tokens {start}..{stop - 1}")
    lines = [f"template of {model} (system role: {'yes' if renderer.supports_system_role else 'no'})"]
    for i, tid in enumerate(spans.ids):
        label = "  <- " + ", ".join(marks[i]) if i in marks else ""
        lines.append(f"{i:4d}  {tok.convert_ids_to_tokens(tid)!r:24}{label}")
    lines.extend(notes)
    return "\n".join(lines)


def open_source(store: str | None, seed_dir: str | None) -> Any:
    """What the analyses read: a verified store, or centroids in the seed layout."""
    from tlpersona.cache.seed_layout import read_seed
    from tlpersona.cache.store import open_store

    if (store is None) == (seed_dir is None):
        raise TlpersonaError("give either STORE or --from-seed DIR")
    return read_seed(seed_dir) if seed_dir else open_store(store, verify=True)


def run_compare(store: str | None, seed_dir: str | None, cfg: Any, out: str | Path,
                title: str = "Recipe comparison") -> tuple[Path, dict]:
    """Compare a store (or seed-layout directory) and write results.json, figures, report.md.

    ``cfg`` is a :class:`tlpersona.analyses.compare.CompareConfig`.
    """
    from tlpersona.analyses.compare import compare
    from tlpersona.analyses.report import write_report

    check_output_dir(Path(out))
    source = open_source(store, seed_dir)
    result = compare(source, cfg)
    return write_report(result, source, out, title), result


def run_subspace(store: str | None, seed_dir: str | None, cfg: Any, out: str | Path,
                 append_to: Path | None = None) -> tuple[Path, dict]:
    """Shared-subspace analysis into ``out`` (subspace.json, pcs.safetensors, figures,
    subspace.md); with ``append_to``, the section is also appended to that report.

    ``cfg`` is a :class:`tlpersona.analyses.subspace.SubspaceConfig`.
    """
    from tlpersona.analyses.report import write_subspace
    from tlpersona.analyses.subspace import subspace
    from tlpersona.files import atomic_write_bytes

    check_output_dir(Path(out))
    source = open_source(store, seed_dir)
    result, comps = subspace(source, cfg)
    section = write_subspace(result, comps, source, out)
    path = Path(out) / "subspace.md"
    atomic_write_bytes(path, section.encode())
    if append_to is not None:
        atomic_write_bytes(append_to, append_to.read_bytes() + b"\n" + section.encode())
    return path, result


def log_wandb(store: Any, project: str) -> str:
    """Log a store directory as a W&B artifact (type ``activation-store``, with its manifest as
    metadata); ``WANDB_MODE=offline`` keeps it local. Returns the artifact name."""
    try:
        import wandb
    except ImportError:
        raise TlpersonaError("--wandb-project needs the wandb package") from None
    name = f"store-{store.manifest_hash[:12]}"
    run = wandb.init(project=project, job_type="extract", config=store.provenance,
                     dir=str(store.root.parent))
    try:
        artifact = wandb.Artifact(name, type="activation-store",
                                  metadata={"manifest_hash": store.manifest_hash})
        artifact.add_dir(str(store.root))
        run.log_artifact(artifact)
    finally:
        run.finish()
    return name


@dataclass
class ProjectRequest:
    """Arguments of ``tlpersona project``."""

    store: str
    out: str = "tlpersona-out/project"
    layer: int | None = None
    positions: str | None = None
    axis: str = "persona:assistant"  # or "pcs"
    k: int = 2
    unit_norm: bool = True
    systems: list[tuple[str, list[str]]] | None = None  # (system prompt, questions)
    conversations: str | None = None
    texts: list[str] | None = None
    model: str | None = None  # default: the store's model
    device: str | None = None
    dtype: str | None = None


def _new_material(req: ProjectRequest) -> list[tuple[str, str, list[str]]]:
    """(label, system text, questions) for every new item; questions empty for raw text."""
    import json

    items = [(f"system:{i}", s, qs) for i, (s, qs) in enumerate(req.systems or [])]
    if req.conversations:
        path = Path(req.conversations)
        for n, line in enumerate(jsonl_lines(read_text(path, "conversations JSONL file")), 1):
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
            items.append((f"conversation:{n}", system, [user]))
    items += [(f"text:{i}", t, []) for i, t in enumerate(req.texts or [])]
    return items


def run_project(req: ProjectRequest) -> tuple[Path, dict]:
    """Project stored personas (and new material run through the store's model) onto shared PCs
    or a persona axis, per recipe; write projection.json, projection.csv and a figure."""
    import csv
    import io
    import json

    import numpy as np

    from tlpersona.analyses import plots
    from tlpersona.analyses.projection import axis_frame, nearest, pc_frame
    from tlpersona.analyses.subspace import SubspaceConfig, subspace
    from tlpersona.cache.store import open_store
    from tlpersona.data import Persona, Question
    from tlpersona.files import atomic_write_bytes

    check_output_dir(Path(req.out))
    st = open_store(req.store, verify=True)
    # token 0 is the same for every persona: nothing to project
    positions = ([p.name for p in parse_positions(req.positions)] if req.positions
                 else [p for p in st.positions if p != "first"])
    for p in positions:
        st.centroids(p)  # one line for a position the store lacks
    layer = req.layer if req.layer is not None else st.layers[len(st.layers) // 2]
    li = st.layer_index(layer)
    prompt_positions = [p for p in parse_positions(",".join(positions)) if not p.needs_response]
    if req.texts and "raw_system_last" not in positions:
        raise TlpersonaError("--text is read with the raw_system_last recipe, which "
                             + ("--positions does not include" if req.positions else
                                "this store does not have"))
    if (req.systems or req.conversations) and not prompt_positions:
        raise TlpersonaError("--system/--conversations need a recipe read from the prompt; "
                             "these positions all need a response")
    cent = {p: st.centroids(p)[:, li].double().numpy() for p in positions}
    if req.axis == "pcs":
        if req.k < 1:
            raise TlpersonaError("--k must be at least 1")
        _, comps = subspace(st, SubspaceConfig(positions=positions, layers=[layer],
                                               k_max=req.k, unit_norm=req.unit_norm, n_null=0))
        if req.k > comps[layer].shape[0]:
            raise TlpersonaError(f"--k {req.k}: only {comps[layer].shape[0]} shared PCs exist for "
                                 f"{len(st.personas)} personas and {len(positions)} recipes")
        frames = {p: pc_frame(c, comps[layer], req.k, req.unit_norm) for p, c in cent.items()}
    elif req.axis.startswith("persona:"):
        frames = {p: axis_frame(c, st.personas, req.axis.split(":", 1)[1]) for p, c in cent.items()}
    else:
        raise TlpersonaError(f"unknown --axis {req.axis!r} (pcs or persona:NAME)")
    result: dict[str, Any] = {"store": str(st.root), "layer": layer, "axis": req.axis,
                              "positions": positions, "stored": {}, "items": []}
    for p, f in frames.items():
        coords = f.coords(cent[p])
        result["stored"][p] = [{"persona": name, "coords": dict(zip(f.names, map(float, c), strict=True))}
                               for name, c in zip(st.personas, coords, strict=True)]
    items = _new_material(req)
    if items:
        model_spec = req.model or st.provenance["model"]
        model = load_bridge(model_spec, req.device or default_device(), req.dtype)
        if model.info.identity != st.provenance.get("model_identity"):
            raise TlpersonaError(f"{model_spec} is not the model this store was made with")
        for label, system, questions in items:
            pos_list = ([p for p in prompt_positions if p.kind == "raw"] if not questions
                        else prompt_positions)
            if not pos_list:
                continue
            ex = Extractor(model, ExtractConfig(positions=pos_list, layers=[layer], progress=False))
            qs = [Question(str(i), q) for i, q in enumerate(questions or ["."])]
            res = ex.persona(Persona(label, (system,)), qs)
            for p in pos_list:
                x = res.centroid[p.name][0].double().numpy()
                f = frames[p.name]
                result["items"].append({
                    "label": label, "recipe": p.name,
                    "coords": dict(zip(f.names, map(float, f.coords(x[None])[0]), strict=True)),
                    "nearest": nearest(x, cent[p.name], st.personas),
                })
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "projection.json", json.dumps(result, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    names = next(iter(frames.values())).names
    w.writerow(["kind", "label", "recipe", "layer", *names])
    for p, rows in result["stored"].items():
        for r in rows:
            w.writerow(["stored", r["persona"], p, layer, *(r["coords"][n] for n in names)])
    for it in result["items"]:
        w.writerow(["new", it["label"], it["recipe"], layer, *(it["coords"][n] for n in names)])
    atomic_write_bytes(out / "projection.csv", buf.getvalue().encode())
    first = {p: np.array([r["coords"][names[0]] for r in rows]) for p, rows in result["stored"].items()}
    marks = {p: [(it["label"], it["coords"][names[0]]) for it in result["items"] if it["recipe"] == p]
             for p in positions}
    plots.ranked_bars(first, st.personas, marks, names[0], layer, out / "projection.png")
    return out / "projection.json", result


@dataclass
class PatchRequest:
    """Arguments of ``tlpersona patch``. With a store, the model and phrasing default to the
    store's."""

    store: str | None = None
    out: str = "tlpersona-out/patch"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    attn: str = "auto"
    personas: str = "builtin"
    questions: str = "builtin"
    prompt_index: int | None = None  # default: the store's, else 0
    n_personas: int = 4
    n_questions: int = 2
    layers: str | None = None  # patching layers; default: 8 spread over the model
    positions: str = "system,sys_end,sys_end+1,user_end,last"
    hook: str = "resid_post"
    method: str = "both"  # exact, attribution or both
    corrupt: str = "assistant"
    clean_personas: str | None = None  # "NAME,NAME": chosen by hand
    response_tokens: int = 0
    progress: bool = True


def _spread_layers(n_layers: int, k: int = 8) -> list[int]:
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def _store_phrasing(prov: dict[str, Any], given: int | None) -> int:
    """The store's phrasing unless one is given; a store averaged over phrasings ("all") → 0."""
    if given is not None:
        return given
    stored = prov.get("prompt_index", 0)
    return stored if isinstance(stored, int) else 0


def _model_for(spec: str | None, prov: dict[str, Any], device: str | None, dtype: str | None,
               attn: str) -> Any:
    """The bridged model, checked against the store's model identity when there is a store."""
    model = load_bridge(spec or prov.get("model", "default"), device or default_device(), dtype,
                        attn)
    if prov and model.info.identity != prov.get("model_identity"):
        raise TlpersonaError(f"{model.info.spec} is not the model the store was made with "
                             f"({prov.get('model')})")
    return model


def run_patch(req: PatchRequest) -> tuple[Path, Any]:
    """Activation patching into ``req.out``: patch.json, figures, patch.md. Returns (patch.md,
    the :class:`~tlpersona.analyses.patching.PatchResult`)."""
    from tlpersona.analyses.interventions import HOOKS, Runner
    from tlpersona.analyses.patching import PatchConfig, check_config, choose_clean, run_patching
    from tlpersona.analyses.report import write_patch
    from tlpersona.cache.store import open_store

    check_output_dir(Path(req.out))
    if req.hook not in HOOKS:
        raise TlpersonaError(f"unknown --hook {req.hook!r} ({', '.join(HOOKS)})")
    if req.n_questions < 1:
        raise TlpersonaError("--n-questions must be at least 1")
    st = open_store(req.store, verify=True) if req.store else None
    prov = st.provenance if st else {}
    personas = load_personas(req.personas)
    questions = load_questions(req.questions, req.n_questions)
    keep = None if req.corrupt == "next" else req.corrupt
    chosen, note = choose_clean(personas, keep, req.n_personas, _names(req.clean_personas), st)
    model = _model_for(req.model, prov, req.device, req.dtype, req.attn)
    runner = Runner(model)
    layers = (parse_layers(req.layers, model.info.n_layers) if req.layers
              else _spread_layers(model.info.n_layers))
    cfg = PatchConfig(
        layers=layers, positions=[p.strip() for p in req.positions.split(",") if p.strip()],
        hook=req.hook, method=req.method, corrupt=req.corrupt,
        response_tokens=req.response_tokens,
        prompt_index=_store_phrasing(prov, req.prompt_index), progress=req.progress)
    check_config(cfg, model.info.n_layers)
    patching = run_patching(runner, chosen, questions, cfg, personas_note=note)
    write_patch(patching, req.out)
    return Path(req.out) / "patch.md", patching


@dataclass
class SteerRequest:
    """Arguments of ``tlpersona steer``: strings as the CLI takes them, parsed here. Model and
    phrasing default to the store's; ``persona_source`` must be the persona set the store was
    made with (its system prompts are needed, the store keeps their hash)."""

    store: str
    out: str = "tlpersona-out/steer"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    attn: str = "auto"
    persona_source: str = "builtin"
    questions: str = "builtin"
    n_questions: int = 8
    personas: str | None = None  # "NAME,NAME": the target personas, chosen by hand
    n_personas: int = 4
    base: str = "assistant"
    recipes: str | None = None
    layers: str | None = None
    operators: str = "add,ablate,cap"
    alphas: str | None = None
    cap_percentiles: str | None = None
    n_random: int = 10
    response_tokens: int = 16
    prompt_index: int | None = None
    seed: int = 0
    n_boot: int = 2000
    fluency_margin: float = 0.5
    continuations: int = 2
    continuation_tokens: int = 24
    progress: bool = True


def _numbers(spec: str, option: str) -> list[float]:
    try:
        values = [float(a) for a in spec.split(",") if a.strip()]
    except ValueError:
        raise TlpersonaError(f"{option} must be comma-separated numbers, not {spec!r}") from None
    check_finite_numbers(values, option)
    return values


def _names(spec: str | None) -> list[str] | None:
    return [x.strip() for x in spec.split(",") if x.strip()] if spec else None


def eval_questions(store: Any, questions: list[Any], n: int) -> tuple[list[Any], str]:
    """Up to ``n`` questions the store's vectors were not built from; all of them (and a note
    saying so) when fewer than two such remain."""
    if n < 2:
        raise TlpersonaError("--n-questions must be at least 2 (selection and scoring halves)")
    fresh = [q for q in questions if q.id not in set(store.questions)]
    if len(fresh) >= 2:
        return fresh[:n], (f"Questions are ones the persona vectors were not built from "
                           f"(not among the store's {len(store.questions)}).")
    return questions[:n], ("Fewer than two questions are left outside the store's, so the "
                           "persona vectors were built from these same questions.")


def run_steer(req: SteerRequest) -> tuple[Path, Any]:
    """``tlpersona steer``: evaluate every operator × recipe (see
    :mod:`tlpersona.analyses.steering`), write steering.json, steering.md and figures into
    ``req.out``. Returns (steering.md, the :class:`SteeringResult`)."""
    from tlpersona.analyses.steer_report import write_steering
    from tlpersona.analyses.steering import (
        DEFAULT_ALPHAS,
        DEFAULT_PERCENTILES,
        SteerConfig,
        check_config,
        steer,
    )
    from tlpersona.cache.store import open_store
    from tlpersona.data import content_hash
    from tlpersona.positions import parse_positions

    st = open_store(req.store, verify=True)
    prov = st.provenance
    personas = load_personas(req.persona_source)
    by_name = {p.name: p for p in personas}
    stored = [by_name.get(n) for n in st.personas]
    if None in stored or content_hash([[p.name, list(p.system_prompts)] for p in stored]) \
            != prov.get("persona_hash"):
        raise TlpersonaError("--persona-source does not match the personas the store was made with")
    questions, note = eval_questions(st, load_questions(req.questions), req.n_questions)
    cfg = SteerConfig(
        recipes=[p.name for p in parse_positions(req.recipes)] if req.recipes else None,
        layers=[int(x) for x in _numbers(req.layers, "--layers")] if req.layers else None,
        operators=_names(req.operators) or [],
        alphas=_numbers(req.alphas, "--alphas") if req.alphas else list(DEFAULT_ALPHAS),
        cap_percentiles=(_numbers(req.cap_percentiles, "--cap-percentiles")
                         if req.cap_percentiles else list(DEFAULT_PERCENTILES)),
        personas=_names(req.personas), n_personas=req.n_personas, base=req.base,
        n_random=req.n_random, response_tokens=req.response_tokens,
        prompt_index=_store_phrasing(prov, req.prompt_index), seed=req.seed, n_boot=req.n_boot,
        fluency_margin=req.fluency_margin, continuations=req.continuations,
        continuation_tokens=req.continuation_tokens, progress=req.progress)
    check_config(cfg, st)  # before the model is loaded
    model = _model_for(req.model, prov, req.device, req.dtype, req.attn)
    result = steer(st, model, personas, questions, cfg, questions_note=note)
    write_steering(result, req.out)
    return Path(req.out) / "steering.md", result

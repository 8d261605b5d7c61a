"""Cross-persona activation patching: which positions, layers and components carry the difference
between two personas' system prompts, and which of them carry more than a rewording of the
corrupt persona's own prompt does (a paired sign-flip test over questions, Holm-adjusted; see
:func:`beyond_rewording`).

Clean run: persona X's system prompt + a question. Corrupt run: persona Y's (by default the
``assistant`` persona) + the same question. One component's activation at one named position
and layer (and, for ``head``, one attention head) is copied from the clean run into the corrupt
run, and the corrupt run's next-token distribution at the last prompt token (and at
teacher-forced tokens of X's own greedy response, if asked) is compared with the clean one.
Components (:data:`~tlpersona.interventions.runner.HOOK_POINTS`): the residual stream before
or after a block, the attention and MLP outputs that the block adds to it, and each head's
attention-weighted values (``attn.hook_z``).

Positions are aligned by name, not index: ``sys_end`` of X goes into ``sys_end`` of Y even when
the system prompts differ in length. ``sys_start+i`` rows are the system-text tokens; a row is
defined for a pair only where both system texts have token ``i``. Where the clean and corrupt
tokens agree up to and including a position at the same index (a shared "You are a" prefix),
its activations are identical in both runs and the patch is exactly a no-op; such cells take the
corrupt run's values without a forward pass.

Metrics, each 0 = corrupt and 1 = clean, aggregated as a ratio of sums over all (pair, question)
examples where the cell is defined (stable when one example has a tiny denominator):

* KL: ``1 - sum KL(clean || patched) / sum KL(clean || corrupt)``
* logit difference: with ``t_c``/``t_y`` the clean/corrupt top tokens at each read position and
  ``LD = logit[t_c] - logit[t_y]``, ``sum(LD_patched - LD_corrupt) / sum(LD_clean - LD_corrupt)``.

Rewording control and its test: the exact grid again with the corrupt persona's own prompt in
each of its other phrasings as the clean run (no persona change). Per cell and question, the
persona effect (KL effect over that question's pairs) minus the control effect (over that
question's rewordings) is one paired difference; under the null that the cell does no more for a
persona swap than for a rewording, each question's difference is symmetric about 0, and a
one-sided sign-flip over questions tests "persona effect > control effect" (see
:func:`beyond_rewording` for the families).

Two methods, reported side by side:

* ``exact``: one patched corrupt forward per cell. The cells of an example run as rows of
  batched forwards (the corrupt sequence replicated along the batch, each row patched at its own
  cell); the clean activations come from one cached clean forward. The residuals before the
  final norm are collected for every cell and read out (final norm, unembedding) in chunks of a
  size fixed by the read length alone, so a cell's numbers do not depend on which other cells
  shared its forward: on the CPU in fp32 they are bit-identical to one forward per cell.
* ``attribution`` (:mod:`tlpersona.interventions.attribution`): a first-order estimate of every cell
  of every component from one clean forward and one corrupt forward + backward.

TransformerLens's ``patching.generic_activation_patch`` runs one unbatched forward per cell and
indexes clean and corrupt by the same position; here clean and corrupt differ in length, so the
loop is our own; the hooks are TransformerLens's (``run_with_cache``, ``run_with_hooks``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from tlpersona.analyses.stats import draws_for_family, holm
from tlpersona.chat.positions import parse_position
from tlpersona.data import Inputs, Persona, Question, system_prompt
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.cells import align, logit_diff, noop
from tlpersona.interventions.runner import HOOKS, Conversation, Runner, hook_name, kl
from tlpersona.models.layers import check_layers

DEFAULT_POSITIONS = ("system", "sys_end", "sys_end+1", "user_end", "last")
METHODS = ("exact", "attribution", "both")
# Cells of a forward on the CPU; on a GPU a forward carries about this many tokens.
CPU_ROWS, GPU_TOKENS = 32, 16384
# Tokens per readout chunk: the chunking depends on the read length only (see module doc).
READOUT_TOKENS = 256

Key = tuple[str, int, int | None]  # (position row, layer, head or None)
# Sign-flip tests enumerate every pattern up to this many questions (2^16 patterns), else draw.
EXACT_SIGN_FLIP_QUESTIONS = 16
# The longest answer() sentence.
ANSWER_CHARS = 220


@dataclass
class PatchConfig:
    """``positions``: names in the position grammar (single tokens), ``system`` for every
    system-text token (``sys_start+0``, ``sys_start+1`` …) or ``all`` for every token (equal-length
    prompts only). ``hook``: the component patched exactly (one of ``HOOKS``);
    ``attribution_hooks``: the components estimated by attribution patching. ``method``:
    ``exact``, ``attribution`` or ``both``. ``corrupt``: a persona name, or ``next`` to pair
    each persona with the next one in the list. ``max_rows``: cells per forward (None: 32 on the
    CPU, about 16k tokens per forward on a GPU)."""

    layers: list[int]
    positions: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIONS))
    hook: str = "resid_post"
    method: str = "both"
    attribution_hooks: list[str] = field(default_factory=lambda: list(HOOKS))
    corrupt: str = "assistant"
    response_tokens: int = 0
    prompt_index: int = 0
    max_rows: int | None = None
    skip_noops: bool = True
    progress: bool = True
    # the same exact grid with the corrupt persona's own prompt reworded as the clean run
    control: bool = True
    # familywise level of the persona-beyond-rewording test (one family: cells and regions)
    alpha: float = 0.05


@dataclass
class Cell:
    """Running sums of one cell over examples."""

    kl_patched: float = 0.0
    kl_corrupt: float = 0.0
    ld_gain: float = 0.0  # sum of LD_patched - LD_corrupt
    ld_range: float = 0.0  # sum of LD_clean - LD_corrupt
    n: int = 0
    n_noop: int = 0

    def add(self, kl_p: float, kl_y: float, gain: float, rng: float, noop: bool) -> None:
        self.kl_patched += kl_p
        self.kl_corrupt += kl_y
        self.ld_gain += gain
        self.ld_range += rng
        self.n += 1
        self.n_noop += noop

    @property
    def kl_effect(self) -> float:
        return 1.0 - self.kl_patched / self.kl_corrupt if self.kl_corrupt > 0 else float("nan")

    @property
    def ld_effect(self) -> float:
        return self.ld_gain / self.ld_range if self.ld_range > 0 else float("nan")


@dataclass
class CellEffect:
    """One cell's effects over every example where it is defined. ``noop``: a no-op in every
    one of them (identical prefixes), so both methods give exactly 0."""

    method: str
    component: str
    position: str
    layer: int
    head: int | None
    kl_effect: float
    ld_effect: float
    n: int
    noop: bool
    # exact cells: the KL effect at each question (ratio of sums over that question's pairs,
    # NaN where the cell is undefined), the paired unit of the rewording-control test
    kl_by_question: list[float] | None = None


@dataclass
class CellTest:
    """One cell (or region) of the persona-beyond-rewording test: means over questions of the
    persona effect, the control effect and their difference (KL effects), the one-sided
    sign-flip p that the difference is > 0, and p Holm-adjusted over its family."""

    position: str  # a position row, or a region name for a region test
    layer: int | None  # None for a region
    head: int | None
    persona: float
    control: float
    difference: float
    n: int  # questions (paired units)
    p: float
    p_holm: float
    carries: bool  # p_holm <= alpha: more than a rewording


@dataclass
class RewordingTest:
    """The persona-beyond-rewording test of the exact grid (see :func:`beyond_rewording`).
    ``n_cells``: the family of cells (cells that are 1 by construction, whose difference is 0
    whatever the prompts, and cells that are no-ops in either grid, which compare a patch with no
    patch, are left out). ``min_p``: the smallest
    p the test can give with ``n`` questions; ``min_holm_cells`` (= ``min_holm_regions``: cells
    and regions are one family): the smallest Holm-adjusted p it can reach;
    ``questions_for_cells`` (= ``questions_for_regions``): questions needed for that to be at
    most ``alpha``."""

    metric: str
    pairing: str
    alpha: float
    n: int
    exact: bool
    n_cells: int
    min_p: float
    min_holm_cells: float
    min_holm_regions: float
    questions_for_cells: int
    questions_for_regions: int
    cells: list[CellTest]
    regions: list[CellTest]


@dataclass
class Agreement:
    """Attribution against exact patching over the cells of one component that are not no-ops:
    Spearman over all of them, per region (system-text rows ``sys_start+i``, where clean and
    corrupt tokens differ and a patch swaps a token's whole identity; and the rows after the
    system text, which differ only through what they attend to), within each layer, and the
    cells where the two differ most (``(position, layer, head, exact, attribution)``)."""

    component: str
    metric: str  # "kl" or "ld"
    spearman: float
    n_cells: int
    by_region: dict[str, tuple[float, int]]  # region -> (Spearman, cells)
    by_layer: dict[int, float]
    largest_gaps: list[tuple[str, int, int | None, float, float]]


@dataclass
class PatchResult:
    config: PatchConfig
    model: str
    pairs: list[tuple[str, str]]
    personas_note: str  # which clean personas were chosen, and why
    questions: list[str]
    positions: list[str]
    layers: list[int]
    n_heads: int
    n_layers: int  # the model's blocks (the last one's read-position residual is the output)
    kl_clean_corrupt_mean: float | None
    cells: list[CellEffect]
    # rewording control: exact cells with clean = the corrupt persona in another wording (no
    # persona change); empty when none ran, ``control_note`` says which wording or why not
    control: list[CellEffect]
    control_note: str
    agreement: list[Agreement]
    seconds: dict[str, float]  # wall time per method
    inputs: Inputs | None = None  # the model, persona prompts, questions (and store) it ran on
    # persona effect against the rewording control, per cell and region; None without a control
    rewording_test: RewordingTest | None = None

    def select(self, method: str, component: str) -> list[CellEffect]:
        return [c for c in self.cells if c.method == method and c.component == component]

    def answer(self) -> str:
        """One sentence: where patching carries the persona beyond the rewording control (or
        what would have to change for the test to say)."""
        return answer(self.rewording_test, self.control_note)

    def to_dict(self) -> dict[str, Any]:
        """What patch.json holds under ``"patching"``."""
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        """A saved patching result: ``path`` is its patch.json or the directory holding it
        (``.to_dict()`` is the file's ``"patching"``)."""
        from tlpersona.infra.resultjson import Reader
        from tlpersona.infra.resultsets import read_result

        file, data = read_result(path, "patch")
        reader = Reader(file, data.get("code_version"))
        extra = [k for k in data if k not in ("patching", "code_version")]
        if extra:
            reader.unknown(extra[0])
        return reader.dataclass(cls, data["patching"], "patching")

    def to_frame(self) -> Any:
        """One row per patched cell (method, component, position, layer, effects) as a pandas
        DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.cells)

    def __repr__(self) -> str:
        from tlpersona.infra.resultjson import clip

        return (f"PatchResult({len(self.pairs)} pairs × {len(self.questions)} questions, "
                f"layers {self.layers}, positions {', '.join(self.positions)}, "
                f"{len(self.cells)} cells)\n  {clip(self.answer())}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """patch.json, figures/ and patch.md into ``out`` (one set, swapped in whole; earlier
        results there only with ``overwrite``); returns patch.md's path."""
        from tlpersona.infra.resultsets import results_set
        from tlpersona.report.html import write_html
        from tlpersona.report.patch import write_patch

        with results_set(out, "patch", overwrite, finish=write_html) as stage:
            write_patch(self, stage)
        return Path(out) / "patch.md"


def pairs(personas: list[Persona], corrupt: str) -> list[tuple[Persona, Persona]]:
    """(clean, corrupt) persona pairs."""
    if corrupt == "next":
        if len(personas) < 2:
            raise TlpersonaError("`corrupt` next needs at least two personas")
        return [(p, personas[(i + 1) % len(personas)]) for i, p in enumerate(personas)]
    by_name = {p.name: p for p in personas}
    if corrupt not in by_name:
        raise TlpersonaError(f"corrupt persona {corrupt!r} is not among the personas")
    return [(p, by_name[corrupt]) for p in personas if p.name != corrupt]


def _system_len(conv: Conversation) -> int:
    return conv.spans.anchors["sys_last"] - conv.spans.anchors["sys_start"] + 1


def expand_positions(names: list[str], clean: list[Conversation]) -> list[str]:
    """Row names: ``system`` becomes ``sys_start+0 … sys_start+(n-1)`` for the longest system
    text among the clean runs; every other name is checked against the grammar."""
    rows: list[str] = []
    for name in names:
        if name == "system":
            longest = max(_system_len(c) for c in clean)
            rows.extend(f"sys_start+{i}" if i else "sys_start" for i in range(longest))
        elif name == "all":
            rows.append("all")
        else:
            pos = parse_position(name)
            if pos.kind != "anchored":
                raise TlpersonaError(f"patching needs single-token positions, not {pos.name}")
            rows.append(pos.name)
    return list(dict.fromkeys(rows))


def rows_per_forward(runner: Runner, cfg: PatchConfig, seq_len: int) -> int:
    if cfg.max_rows is not None:
        return cfg.max_rows
    if str(runner.model.device).startswith("cuda"):
        return max(1, GPU_TOKENS // seq_len)
    return CPU_ROWS


@torch.no_grad()
def patch_example(runner: Runner, clean: Conversation, corrupt: Conversation,
                  rows: list[str], cfg: PatchConfig) -> dict[Key, tuple[float, float, float, float, bool]]:
    """Every (row, layer, head) cell of ``cfg.hook`` for one example, exactly: ``(KL_patched,
    KL_corrupt, LD gain, LD range, no-op)``; ``head`` is None except for the ``head`` component.

    ``clean`` and ``corrupt`` carry the same teacher-forced tokens after their prompts.
    """
    names = {layer: hook_name(cfg.hook, layer) for layer in cfg.layers}
    acts = runner.cache(clean.ids, list(names.values()), clean.read)
    lp_c = acts.pop("logprobs")  # [read, vocab]
    lp_y = runner.logprobs(corrupt.ids, corrupt.read)[0]
    tc, ty = lp_c.argmax(-1), lp_y.argmax(-1)
    kl_y = float(kl(lp_c, lp_y).sum())
    ld_c = float(logit_diff(lp_c, tc, ty))
    ld_y = float(logit_diff(lp_y, tc, ty))
    heads: list[int | None] = (list(range(runner.bridge.cfg.n_heads)) if cfg.hook == "head"
                               else [None])
    out: dict[Key, tuple[float, float, float, float, bool]] = {}
    todo: list[tuple[Key, list[tuple[int, int]]]] = []
    for row in rows:
        idx = align(row, clean, corrupt)
        if idx is None:
            continue
        for layer in cfg.layers:
            for head in heads:
                if cfg.skip_noops and noop(idx, clean, corrupt):
                    out[row, layer, head] = (kl_y, kl_y, 0.0, ld_c - ld_y, True)
                else:
                    todo.append(((row, layer, head), idx))
    if not todo:
        return out
    per = rows_per_forward(runner, cfg, len(corrupt.ids))
    finals = []
    for start in range(0, len(todo), per):
        chunk = todo[start:start + per]
        hooks = []
        for layer, name in names.items():
            mine = [(r, idx, key[2]) for r, (key, idx) in enumerate(chunk) if key[1] == layer]
            if mine:
                hooks.append((name, _patcher(mine, acts[name])))
        finals.append(runner.final(corrupt.ids, corrupt.read, rows=len(chunk), hooks=hooks))
    resid = torch.cat(finals)  # [cells, read, d]
    step = max(1, READOUT_TOKENS // len(corrupt.read))
    for start in range(0, len(todo), step):
        lp = runner.readout(resid[start:start + step])
        kl_p = kl(lp_c, lp).sum(-1)
        ld_p = logit_diff(lp, tc, ty)
        for i, (key, _) in enumerate(todo[start:start + step]):
            out[key] = (float(kl_p[i]), kl_y, float(ld_p[i]) - ld_y, ld_c - ld_y, False)
    return out


def _patcher(rows: list[tuple[int, list[tuple[int, int]], int | None]], clean: torch.Tensor) -> Any:
    """Hook writing clean activations (``[seq, ...]``) into each (batch row, index pairs, head)."""
    b = torch.tensor([r for r, idx, _ in rows for _ in idx])
    k = torch.tensor([i for _, idx, _ in rows for i, _ in idx])
    c = torch.tensor([j for _, idx, _ in rows for _, j in idx])
    if rows[0][2] is None:
        src = clean[k]

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act[b.to(act.device), c.to(act.device)] = src.to(act.dtype)
            return act
    else:
        h = torch.tensor([head for _, idx, head in rows for _ in idx])
        src = clean[k, h]

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act[b.to(act.device), c.to(act.device), h.to(act.device)] = src.to(act.dtype)
            return act

    return fn


def check_config(cfg: PatchConfig, n_layers: int) -> None:
    """Every setting checked before any forward pass."""
    if not cfg.layers:
        raise TlpersonaError("no layers to patch")
    check_layers(cfg.layers, n_layers)
    if cfg.method not in METHODS:
        raise TlpersonaError(f"unknown `method` {cfg.method!r} ({', '.join(METHODS)})")
    for h in [cfg.hook, *cfg.attribution_hooks]:
        hook_name(h, 0)
    if cfg.method != "exact" and not cfg.attribution_hooks:
        raise TlpersonaError("attribution patching needs at least one component")
    if cfg.response_tokens < 0:
        raise TlpersonaError("`response_tokens` must be at least 0")
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise TlpersonaError("`max_rows` must be at least 1")
    for name in cfg.positions:
        if name not in ("system", "all"):
            expand_positions([name], [])


def check_inputs(personas: list[Persona], questions: list[Question], cfg: PatchConfig
                 ) -> list[tuple[Persona, Persona]]:
    """The persona pairs, with every persona and question checked before any forward pass:
    at least one pair and one question, and the phrasing ``prompt_index`` in every persona."""
    plist = pairs(personas, cfg.corrupt)
    if not plist:
        raise TlpersonaError("patching needs at least one clean persona besides the corrupt one")
    if not questions:
        raise TlpersonaError("patching needs at least one question")
    for p in personas:
        system_prompt(p, cfg.prompt_index)
    return plist


def run_patching(runner: Runner, personas: list[Persona], questions: list[Question],
                 cfg: PatchConfig, personas_note: str = "") -> PatchResult:
    """Grid of positions × layers (× heads) averaged over persona pairs and questions, by exact
    and/or attribution patching (see module doc)."""
    from tlpersona.interventions.attribution import attribute_example

    check_config(cfg, runner.model.info.n_layers)
    plist = check_inputs(personas, questions, cfg)

    examples = _examples(runner, plist, questions, cfg)
    rows = expand_positions(cfg.positions, [clean for clean, _ in examples])
    sums: dict[tuple[str, str, str, int, int | None], Cell] = {}  # method, component, cell
    by_q: dict[tuple[str, str, str, int, int | None], list[Cell]] = {}  # exact, per question
    kl_base: list[float] = []
    seconds: dict[str, float] = {}
    methods = ["exact", "attribution"] if cfg.method == "both" else [cfg.method]
    for method in methods:
        t0 = time.perf_counter()
        for i, (clean, corrupt) in enumerate(tqdm(examples, desc=f"patching ({method})",
                                                  unit="example", disable=not cfg.progress)):
            if method == "exact":
                got = {(cfg.hook, *key): v for key, v in
                       patch_example(runner, clean, corrupt, rows, cfg).items()}
            else:
                got = attribute_example(runner, clean, corrupt, rows, cfg.layers,
                                        cfg.attribution_hooks, cfg.skip_noops)
            for key, vals in got.items():
                sums.setdefault((method, *key), Cell()).add(*vals)
                if method == "exact":
                    _per_question(by_q, (method, *key), len(questions))[i % len(questions)].add(*vals)
            if method == methods[0]:
                kl_base.append(next(iter(got.values()))[1] if got else float("nan"))
        seconds[method] = time.perf_counter() - t0
    t0 = time.perf_counter()
    control, control_note, n_reworded = _rewording_control(runner, plist, questions, rows, cfg)
    if control:
        seconds["control"] = time.perf_counter() - t0
    cells = _effects(sums, by_q)
    order = {r: i for i, r in enumerate(rows)}
    for cs in (cells, control):
        cs.sort(key=lambda c: (c.method, c.component, order[c.position], c.layer, c.head or 0))
    agreement = [agree(cells, cfg.hook, metric) for metric in ("kl", "ld")
                 if cfg.method == "both" and cfg.hook in cfg.attribution_hooks]
    n_layers = int(runner.model.info.n_layers)
    test = (beyond_rewording([c for c in cells if c.method == "exact" and c.component == cfg.hook],
                             control, cfg.alpha,
                             lambda c: by_construction(c, n_layers, cfg.response_tokens),
                             len(plist), n_reworded)
            if control else None)
    return PatchResult(
        config=cfg, model=runner.model.info.spec,
        pairs=[(x.name, y.name) for x, y in plist], personas_note=personas_note,
        questions=[q.id for q in questions],
        positions=[r for r in rows if any(c.position == r for c in cells)],
        layers=list(cfg.layers), n_heads=int(runner.bridge.cfg.n_heads),
        n_layers=n_layers,
        kl_clean_corrupt_mean=float(np.nanmean(kl_base)) if kl_base else None,
        cells=cells, control=control, control_note=control_note, agreement=agreement,
        seconds=seconds, inputs=Inputs.of(runner.model.info.identity,
                                          list({p.name: p for pair in plist for p in pair}.values()),
                                          questions),
        rewording_test=test)


def _per_question(by_q: dict[Any, list[Cell]], key: Any, n_questions: int) -> list[Cell]:
    if key not in by_q:
        by_q[key] = [Cell() for _ in range(n_questions)]
    return by_q[key]


def _examples(runner: Runner, plist: list[tuple[Persona, Persona]], questions: list[Question],
              cfg: PatchConfig) -> list[tuple[Conversation, Conversation]]:
    """(clean, corrupt) conversations of every pair × question, both followed by the clean
    persona's own greedy response tokens (``cfg.response_tokens`` of them). Pair-major: example
    ``i`` asks question ``i % len(questions)``."""
    def system(p: Persona) -> str:
        return system_prompt(p, cfg.prompt_index)

    jobs = [(x, y, q) for x, y in plist for q in questions]
    responses = runner.greedy([runner.conversation(system(x), q.text).ids for x, _, q in jobs],
                              cfg.response_tokens)
    return [(runner.conversation(system(x), q.text, resp),
             runner.conversation(system(y), q.text, resp))
            for (x, y, q), resp in zip(jobs, responses, strict=True)]


def _effects(sums: dict[tuple[str, str, str, int, int | None], Cell],
             by_q: dict[tuple[str, str, str, int, int | None], list[Cell]]) -> list[CellEffect]:
    def per_question(key: tuple[str, str, str, int, int | None]) -> list[float] | None:
        return [q.kl_effect for q in by_q[key]] if key in by_q else None

    return [CellEffect(m, comp, row, layer, head, c.kl_effect, c.ld_effect, c.n, c.n_noop == c.n,
                       per_question((m, comp, row, layer, head)))
            for (m, comp, row, layer, head), c in sums.items() if c.n > 0]


def reworded(persona: Persona, prompt_index: int, to: int | None = None) -> Persona | None:
    """``persona`` whose phrasing at ``prompt_index`` is its phrasing ``to`` (default: the next
    one; None with one phrasing): a clean run of the rewording control, the same persona in
    other words."""
    prompts = list(persona.system_prompts)
    if len(prompts) < 2:
        return None
    j = (prompt_index + 1) % len(prompts) if to is None else to
    prompts[prompt_index], prompts[j] = prompts[j], prompts[prompt_index]
    return Persona(f"{persona.name} (reworded)", tuple(prompts))


def _rewording_control(runner: Runner, plist: list[tuple[Persona, Persona]],
                       questions: list[Question], rows: list[str], cfg: PatchConfig
                       ) -> tuple[list[CellEffect], str, int]:
    """The exact grid again with clean = the corrupt persona in each of its other phrasings, on
    the same questions and rows, computed as the main grid is: a cell that carries persona
    information should do more in the main grid than here, where the two system prompts differ
    only in wording. Returns the cells, a note, and the number of rewordings."""
    if not cfg.control:
        return [], "not run (`control` off)", 0
    if cfg.method == "attribution":
        return [], "not run: it is an exact grid, and only attribution was asked for", 0
    if cfg.corrupt == "next":
        return [], "not run: with `corrupt` next there is no single corrupt persona to reword", 0
    y = plist[0][1]
    n = len(y.system_prompts)
    if n < 2:
        return [], f"not run: {y.name!r} has one phrasing", 0
    others = [(cfg.prompt_index + k) % n for k in range(1, n)]
    cpairs = [(x, y) for j in others if (x := reworded(y, cfg.prompt_index, j)) is not None]
    sums: dict[tuple[str, str, str, int, int | None], Cell] = {}
    by_q: dict[tuple[str, str, str, int, int | None], list[Cell]] = {}
    for i, (clean, corrupt) in enumerate(_examples(runner, cpairs, questions, cfg)):
        for key, vals in patch_example(runner, clean, corrupt, rows, cfg).items():
            full = ("exact", cfg.hook, *key)
            sums.setdefault(full, Cell()).add(*vals)
            _per_question(by_q, full, len(questions))[i % len(questions)].add(*vals)
    words = "phrasing" if len(others) == 1 else "phrasings"
    return _effects(sums, by_q), (
        f"clean = {y.name!r} in its {words} {', '.join(map(str, others))} instead of "
        f"{cfg.prompt_index} ({len(others) * len(questions)} examples)"), len(others)


REGIONS = ("system text", "after the system text")


def region(position: str) -> str:
    return REGIONS[0] if position.startswith("sys_start") or position == "all" else REGIONS[1]


def agree(cells: list[CellEffect], component: str, metric: str) -> Agreement:
    """Spearman between exact and attribution effects of ``component`` (see :class:`Agreement`)."""
    attr = "kl_effect" if metric == "kl" else "ld_effect"
    est = {(c.position, c.layer, c.head): c for c in cells
           if c.method == "attribution" and c.component == component}
    both = [(c, est[c.position, c.layer, c.head]) for c in cells
            if c.method == "exact" and c.component == component and not c.noop
            and (c.position, c.layer, c.head) in est]
    both = [(e, a) for e, a in both
            if np.isfinite(getattr(e, attr)) and np.isfinite(getattr(a, attr))]

    def rho(group: list[tuple[CellEffect, CellEffect]]) -> float:
        if len(group) < 3:
            return float("nan")
        return float(stats.spearmanr([getattr(e, attr) for e, _ in group],
                                     [getattr(a, attr) for _, a in group]).statistic)

    regions = {name: [p for p in both if region(p[0].position) == name] for name in REGIONS}
    by_layer = {la: rho([p for p in both if p[0].layer == la])
                for la in sorted({e.layer for e, _ in both})}
    gaps = sorted(both, key=lambda p: -abs(getattr(p[0], attr) - getattr(p[1], attr)))[:5]
    return Agreement(component, metric, rho(both), len(both),
                     {name: (rho(group), len(group)) for name, group in regions.items()}, by_layer,
                     [(e.position, e.layer, e.head, getattr(e, attr), getattr(a, attr))
                      for e, a in gaps])


def by_construction(c: CellEffect, n_layers: int, response_tokens: int) -> bool:
    """A residual-stream patch after the last block at the read position (``last``, when only
    it is read): the patched run's output is the clean run's, effect 1 whatever the personas."""
    return (c.component == "resid_post" and c.position == "last" and not response_tokens
            and c.layer == n_layers - 1)


def sign_flip_greater(d: np.ndarray, n_draws: int = 9999, seed: int = 0) -> tuple[np.ndarray, bool]:
    """One-sided sign-flip p that each row's mean of ``d`` (``[tests, n]``) is greater than 0,
    and whether it is exact: every one of the 2^n sign patterns when n ≤
    :data:`EXACT_SIGN_FLIP_QUESTIONS` (p ≥ 2^-n, the observed pattern counted), else ``n_draws``
    seeded random patterns (p ≥ 1 / (n_draws + 1)). Returns ``([tests], exact)``."""
    d = np.asarray(d, dtype=np.float64)
    exact = d.shape[1] <= EXACT_SIGN_FLIP_QUESTIONS
    if d.shape[1] == 1:  # two patterns, which scipy does not take: +d is the larger when d > 0
        return np.where(d[:, 0] > 0, 0.5, 1.0), True

    def mean(x: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(x, axis=axis)

    res = stats.permutation_test((d,), mean, permutation_type="samples", vectorized=True,
                                 n_resamples=np.inf if exact else n_draws, alternative="greater",
                                 axis=1, random_state=np.random.default_rng(seed))
    return np.atleast_1d(res.pvalue).astype(np.float64), exact


def questions_needed(family: int, alpha: float) -> int:
    """Questions an exact sign-flip needs before ``family`` Holm-adjusted tests can reach
    ``alpha``: the smallest n with ``family · 2^-n ≤ alpha``."""
    return max(1, math.ceil(math.log2(max(family, 1) / alpha)))


def beyond_rewording(cells: list[CellEffect], control: list[CellEffect], alpha: float,
                     trivial: Callable[[CellEffect], bool], n_pairs: int, n_reworded: int
                     ) -> RewordingTest | None:
    """Which exact cells, and which regions, carry more of a persona swap than of a rewording.

    Paired unit: the question. For cell ``c`` and question ``q``, ``d[c, q]`` = the KL effect
    over the persona pairs at ``q`` minus the KL effect over the corrupt persona's rewordings at
    ``q`` (the same corrupt run, so the same question is the natural pair; the pairs share it,
    so they are not separate units). Under the null that the cell does no more for a persona
    swap than for a rewording, each question's difference is symmetric about 0; the one-sided
    sign-flip of the mean over questions tests "persona effect > control effect". The KL effect
    is used because the logit difference is undefined where a rewording leaves the top token
    unchanged. One family, Holm-adjusted at ``alpha``: the cells defined in both grids (cells
    that are 1 by construction, ``trivial``, and cells that are no-ops in either grid left out)
    and the regions (:data:`REGIONS`), whose per-question difference is the mean of ``d`` over
    the region's cells (a region's claim and its cells' rest on the same differences, so they
    are corrected together). None when no cell can be paired."""
    ctl = {(c.position, c.layer, c.head): c for c in control}
    tested: list[tuple[CellEffect, np.ndarray, np.ndarray]] = []
    for c in cells:
        k = ctl.get((c.position, c.layer, c.head))
        if k is None or c.kl_by_question is None or k.kl_by_question is None:
            continue
        # a no-op in either grid compares a patch with no patch (identical prefixes: the
        # persona prompts share "You are a" with the corrupt prompt, a rewording need not)
        if c.noop or k.noop or trivial(c):
            continue
        x, y = np.asarray(c.kl_by_question), np.asarray(k.kl_by_question)
        if np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.any(x != y):
            tested.append((c, x, y))
    if not tested:
        return None
    x = np.stack([t[1] for t in tested])  # [cells, questions]
    y = np.stack([t[2] for t in tested])
    d = x - y
    n = d.shape[1]
    names = [r for r in REGIONS if any(region(t[0].position) == r for t in tested)]
    members = [np.array([region(t[0].position) == r for t in tested]) for r in names]
    n_draws = draws_for_family(len(tested) + len(names), alpha)
    p, exact = sign_flip_greater(d, n_draws)
    rd = np.stack([d[m].mean(0) for m in members])  # [regions, questions]
    rp, _ = sign_flip_greater(rd, n_draws)
    # one family: a region's difference is the mean of its cells', so claims about a region
    # and its cells are made together and corrected together
    joint = holm(np.concatenate([p, rp]))
    ph, rph = joint[: len(p)], joint[len(p):]
    m = len(tested) + len(names)
    min_p = 2.0 ** -n if exact else 1.0 / (n_draws + 1)
    out = [CellTest(c.position, c.layer, c.head, float(xi.mean()), float(yi.mean()),
                    float(di.mean()), n, float(pi), float(hi), bool(hi <= alpha))
           for (c, xi, yi), di, pi, hi in zip(tested, d, p, ph, strict=True)]
    regions = [CellTest(r, None, None, float(x[m].mean(0).mean()), float(y[m].mean(0).mean()),
                        float(rd[i].mean()), n, float(rp[i]), float(rph[i]), bool(rph[i] <= alpha))
               for i, (r, m) in enumerate(zip(names, members, strict=True))]
    how = "exact, every one of the 2^n sign patterns" if exact else f"{n_draws} random sign patterns"
    pairing = (f"paired by question: at each of {n} questions, the KL effect over its {n_pairs} "
               f"persona pair(s) minus that over its {n_reworded} rewording(s) of the corrupt "
               f"persona; one-sided sign-flip over the questions ({how})")
    return RewordingTest("kl", pairing, alpha, n, exact, len(tested), min_p,
                         min(1.0, m * min_p), min(1.0, m * min_p),
                         questions_needed(m, alpha), questions_needed(m, alpha),
                         out, regions)


def _p(p: float) -> str:
    return f"{p:.2g}"


def cell_name(c: CellTest) -> str:
    return c.position if c.layer is None else (
        f"{c.position} L{c.layer}" + ("" if c.head is None else f" H{c.head}"))


def answer(test: RewordingTest | None, control_note: str) -> str:
    """One sentence (at most :data:`ANSWER_CHARS` characters) with numbers: the regions and
    cells that carry the persona beyond the rewording control, or what would let the test say."""
    if test is None:
        return _fit([f"Patching cannot separate the persona from a rewording here: the rewording "
                     f"control was {control_note}."[:ANSWER_CHARS - 1] + "."])
    regions = [r for r in test.regions if r.carries]
    cells = sorted((c for c in test.cells if c.carries), key=lambda c: c.p)
    head = (f"Beyond the rewording control (share of KL restored, these pairs, Holm "
            f"{test.alpha:g}, {test.n} questions): ")
    if regions or cells:
        reg = "; ".join(f"{r.position} {r.difference:+.2f} (p {_p(r.p_holm)})" for r in regions)
        parts = [head + (reg or "no region")]
        tail = f"; {len(cells)} of {test.n_cells} cells"
        named = [f"{cell_name(c)} {c.difference:+.2f} (p {_p(c.p_holm)})" for c in cells]
        options = [tail + (", " + ", ".join(named[:k]) if k else "") + "."
                   for k in range(len(named), -1, -1)]
        return _fit([parts[0] + o for o in options] + [parts[0] + "."])
    best = min(test.regions, key=lambda r: r.p_holm)
    reach = f"smallest reachable Holm p {_p(test.min_holm_cells)}"
    needs = (f"; reaching {test.alpha:g} needs ≥ {test.questions_for_cells} questions"
             if test.min_holm_cells > test.alpha else "")
    lead = f"No region or cell carries the persona beyond the rewording control at Holm {test.alpha:g}"
    best_s = f" (best: {best.position} {best.difference:+.2f}, p {_p(best.p_holm)}"
    return _fit([f"{lead}{best_s}; {test.n} questions, {reach}){needs}.",
                 f"{lead}{best_s}; {test.n} questions){needs}.",
                 f"{lead}{best_s}){needs}.", f"{lead}{needs}."])


def _fit(options: list[str]) -> str:
    """The first option short enough, else the last one cut."""
    for o in options:
        if len(o) <= ANSWER_CHARS:
            return o
    return options[-1][:ANSWER_CHARS - 1] + "…"

"""Test inputs that several test files share: synthetic stores written through the store's own
writer, planted persona geometries, the plain-HF residual reference, a seed layout as other code
writes it, and the command line as the one-line-error tests drive it.

Each builder is the one computation every test using it asserts on: the same data for the same
arguments and seeds, so a change here is a change to all of those tests.
"""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from tlpersona.analyses.kfound import pc_statistic
from tlpersona.analyses.subspace import held_out
from tlpersona.cache import Store, StoreWriter, open_store
from tlpersona.cache.schema import persona_key

#: The assistant-axis data (275 personas, 240 questions), where the checkout has a copy beside it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "assistant_axis"


# --- synthetic stores ---------------------------------------------------------------------------

#: The layers of :func:`write_synthetic` (and the first, of :func:`per_question_store`).
SYNTH_LAYERS = [2, 5]


def write_synthetic(path, n_p=12, n_q=8, d=10, seed=0) -> Store:
    """A store whose recipes share structure: last and prompt_mean are noisy rotations of one
    persona geometry, sys_end is unrelated. prompt_mean/no_last satisfy the B* identity."""
    g = torch.Generator().manual_seed(seed)
    n_l = len(SYNTH_LAYERS)
    base = torch.randn(n_p, 1, n_l, d, generator=g)
    last = base + 0.1 * torch.randn(n_p, n_q, n_l, d, generator=g)
    no_last = 2 * base + 0.1 * torch.randn(n_p, n_q, n_l, d, generator=g)
    n_tok = torch.randint(5, 20, (n_p, n_q), generator=g).float()
    pm = ((n_tok[..., None, None] - 1) * no_last + last) / n_tok[..., None, None]
    sys_end = torch.randn(n_p, n_l, d, generator=g)
    per_q = {"last": last, "prompt_mean": pm, "prompt_mean_no_last": no_last}
    positions = ["last", "prompt_mean", "prompt_mean_no_last", "sys_end"]
    prov = {"personas": [f"p{i}" for i in range(n_p)], "questions": [str(i) for i in range(n_q)],
            "layers": SYNTH_LAYERS, "positions": positions, "prompt_index": 0}
    w = StoreWriter(path, prov, {"d_model": d})
    for i in range(n_p):
        t = {persona_key("sys_end", "centroid"): sys_end[i]}
        for k, v in per_q.items():
            t[persona_key(k, "centroid")] = v[i].mean(0)
            t[persona_key(k, "per_question")] = v[i].half()
            t[persona_key(k, "valid")] = torch.ones(n_q, dtype=torch.uint8)
        t[persona_key("prompt_mean", "n_tokens")] = n_tok[i]
        t[persona_key("prompt_mean_no_last", "n_tokens")] = n_tok[i] - 1
        w.write_part(i, t)
    w.finalize()
    return open_store(path)


def per_question_store(path, recipes) -> Store:
    """A store of per-question positions (``{position: [persona, question, d]}``, one layer)."""
    n, n_q, d = next(iter(recipes.values())).shape
    prov = {"personas": [f"p{i}" for i in range(n)], "questions": [str(q) for q in range(n_q)],
            "layers": SYNTH_LAYERS[:1], "positions": list(recipes), "prompt_index": 0}
    w = StoreWriter(path, prov, {"d_model": d})
    for i in range(n):
        t = {}
        for p, v in recipes.items():
            x = torch.from_numpy(v[i][:, None]).float()  # [question, layer, d]
            t[persona_key(p, "centroid")] = x.mean(0)
            t[persona_key(p, "per_question")] = x
            t[persona_key(p, "valid")] = torch.ones(n_q, dtype=torch.uint8)
        w.write_part(i, t)
    w.finalize()
    return open_store(path)


def centroid_store(path, recipes, layers, questions=("0",)) -> Store:
    """A store of centroids only: ``{position: [persona, layer, d]}``, or ``[persona, d]`` for
    one layer. Personas ``p0 …``; ``questions`` only name what the centroids would average."""
    arrays = {p: torch.as_tensor(x) for p, x in recipes.items()}
    arrays = {p: x[:, None] if x.ndim == 2 else x for p, x in arrays.items()}
    n, _, d = next(iter(arrays.values())).shape
    prov = {"personas": [f"p{i}" for i in range(n)], "questions": list(questions),
            "layers": list(layers), "positions": list(recipes), "prompt_index": 0}
    w = StoreWriter(path, prov, {"d_model": d})
    for i in range(n):
        w.write_part(i, {persona_key(p, "centroid"): x[i].float() for p, x in arrays.items()})
    w.finalize()
    return open_store(path)


def recipes_store(path, recipes) -> Store:
    """``{position: [persona, d]}`` as a store of one layer (4) and one question."""
    return centroid_store(path, recipes, [4])


# --- planted geometries -------------------------------------------------------------------------

#: The three question-invariant recipes the planted subspaces are built for, and their pairs.
PLANTED_POSITIONS = ["last", "sys_end", "sys_end+1"]
PLANTED_PAIRS = list(itertools.combinations(PLANTED_POSITIONS, 2))


def planted_recipes(n, rng, shared_by, k=3, d=16, own=3):
    """Three recipes ``[n, d]``: those in ``shared_by`` share one k-dim persona geometry (std
    2 → 1), the others have their own; 3 own dims (std 1), noise 0.3, an offset and a scale."""
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    std = np.linspace(2, 1, k)
    common = rng.normal(size=(n, k)) * std
    out = {}
    for i, p in enumerate(PLANTED_POSITIONS):
        s = common if p in shared_by else rng.normal(size=(n, k)) * std
        cols = slice(k + i * own, k + (i + 1) * own)
        x = s @ basis[:, :k].T + rng.normal(size=(n, own)) @ basis[:, cols].T
        out[p] = (1 + 3 * i) * (x + 0.3 * rng.normal(size=(n, d)) + 4.0 * rng.normal(size=d))
    return out


def relabel_count(raw: dict[str, np.ndarray], fit: np.ndarray, test: np.ndarray,
                  relabels: list[np.ndarray], level: float) -> int:
    """The shared subspace's replaced test over the planted recipes: leading PCs whose smallest
    r over the pairs beats the relabelled, refitted draws' on the same PC,
    p = (1 + #draws ≥ it) / (draws + 1) < ``level``."""
    pos, pairs = PLANTED_POSITIONS, PLANTED_PAIRS

    def stat(r: dict[str, np.ndarray]) -> np.ndarray:
        return pc_statistic(held_out(r, pos, pairs, fit, test, 50, True, curve=False)[0])

    obs = stat(raw)
    draws = [stat({**raw, pos[-1]: raw[pos[-1]][r]}) for r in relabels]
    width = min([len(obs), *(len(x) for x in draws)])
    p = (1 + np.sum(np.stack([x[:width] for x in draws]) >= obs[:width], axis=0)) / (len(draws) + 1)
    fails = np.flatnonzero(p >= level)
    return int(fails[0]) if fails.size else width


def harder_planted(n, rng, related=True, k=5, d=64):
    """Three recipes with a k-dim invariant subspace of std 2 → 1 beside 3 own dims of std 1
    each and noise 0.3 per coordinate: the weaker shared PCs, fitted on 20 personas, score
    r 0.6–0.9 held out, which a fixed r > 0.9 rule drops."""
    return planted_recipes(n, rng, PLANTED_POSITIONS if related else (), k=k, d=d)


class MemorySource:
    """Recipes held in memory behind the store's read interface: ``{position: [persona,
    question, layer, d]}`` (per-question vectors) or ``[persona, layer, d]`` (centroids only)."""

    provenance: dict = {}
    manifest_hash = "0" * 64

    def __init__(self, recipes: dict[str, np.ndarray], n_layers: int = 1):
        self.r = {p: torch.from_numpy(np.asarray(v, np.float32)) for p, v in recipes.items()}
        first = next(iter(self.r.values()))
        self.personas = [f"p{i}" for i in range(first.shape[0])]
        self.questions = [str(q) for q in range(first.shape[1])] if first.ndim == 4 else ["0"]
        self.layers = list(range(n_layers))
        self.positions = list(recipes)

    def question_invariant(self, position):
        return False

    def has_per_question(self, position):
        return self.r[position].ndim == 4

    def centroids(self, position):
        v = self.r[position]
        return v.mean(1) if v.ndim == 4 else v

    def per_question(self, position, layer=None):
        return self.r[position]

    def per_question_rows(self, position, start, stop):
        return self.r[position][start:stop]

    def valid(self, position):
        return torch.ones(self.r[position].shape[:2], dtype=torch.bool)

    def n_tokens(self, position):
        return None

    def layer_index(self, layer):
        return self.layers.index(layer)


def allowed(level: float, reps: int) -> float:
    """The level plus 2.5 Monte Carlo standard errors of a rate from ``reps`` replicates."""
    return level + 2.5 * math.sqrt(level * (1 - level) / reps)


# --- seed layouts -------------------------------------------------------------------------------

def seed_layout(root: Path, names: list[str], methods: tuple[str, ...] = ("a", "c2", "bstar")) -> Path:
    """A seed layout as the seed experiment's own code writes it (without the mark an export
    writes, so it reads as a layout tlpersona did not write): ``names``, each one draw per persona
    plus small noise per method, 2 layers, d 16."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(len(names), 2, 16, generator=g)
    for m in methods:
        d = root / f"method_{m}"
        d.mkdir(parents=True)
        torch.save({n: base[i] + 0.1 * torch.randn(2, 16, generator=g) for i, n in enumerate(names)},
                   d / "all_centroids.pt")
    return root


# --- plain-HF references ------------------------------------------------------------------------

def hf_resid(hf, ids, layers) -> torch.Tensor:
    """[layer, seq, d] from plain HF: hidden_states[l+1], and a hook for the last block."""
    grabbed = {}
    handle = hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: grabbed.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    rows = [grabbed["last"][0] if layer == len(hf.model.layers) - 1 else hs[layer + 1][0]
            for layer in layers]
    return torch.stack(rows)


# --- real stores --------------------------------------------------------------------------------

def small_store(loaded, out: Path) -> Path:
    """4 personas x 2 questions, last and sys_end at layers 3 and 29 (no raw_system_last)."""
    # imported here: the synthetic builders above need neither the model code nor the CLI
    from tlpersona.chat.positions import parse_positions
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("last,sys_end"), [3, 29], batch_size=8, progress=False)
    return extract_to_store(loaded, cfg, builtin_personas()[:4], builtin_questions()[:2], out)


def copy_store(store: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(store, dst)
    return dst


# --- the command line ---------------------------------------------------------------------------

#: Two personas, two questions: enough for a run to reach what is checked.
SMALL = ["--limit-personas", "2", "--limit-questions", "2"]


def run(*args: str) -> tuple[int, list[str], str]:
    """Exit code, the ``error:`` lines and the whole output of one command."""
    from click.testing import CliRunner

    from tlpersona.cli import main

    res = CliRunner().invoke(main, list(args))
    errors = [x for x in res.output.splitlines() if x.startswith("error:")]
    return res.exit_code, errors, res.output


def fails(message: str, *args: str) -> None:
    """The command stops with exit code 2 and one error line holding ``message``, no traceback."""
    code, errors, output = run(*args)
    assert code == 2, output[-1500:]
    assert len(errors) == 1 and message in errors[0], errors or output[-1500:]
    assert "Traceback" not in output


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

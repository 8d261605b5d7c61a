"""Controls: the split-half noise floor and the B*_no_last algebra check."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tlpersona.analyses import metrics as M


def noise_floor(per_q: np.ndarray, valid: np.ndarray, n_splits: int, seed: int,
                iu: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """How well a recipe agrees with itself across two random halves of the questions.

    ``per_q``: ``[persona, question, d]``; ``valid``: ``[persona, question]``. For each of
    ``n_splits`` seeded splits, the centroids of each half are compared by per-persona cosine and
    by the mean-centred cosine-matrix Pearson r (the same statistics the recipe pairs get).
    """
    n_p, n_q, _ = per_q.shape
    if n_q < 2:
        return {"exact": None, "reason": "fewer than 2 questions"}
    rng = np.random.default_rng(seed)
    masks = np.zeros((2 * n_splits, n_q), dtype=np.float32)
    for k in range(n_splits):
        perm = rng.permutation(n_q)
        masks[2 * k, perm[: n_q // 2]] = 1
        masks[2 * k + 1, perm[n_q // 2:]] = 1
    # One batched product for every half of every split: [persona, 2K, question] @ [.., q, d].
    w = torch.from_numpy(masks)[None] * torch.from_numpy(valid.astype(np.float32))[:, None]
    counts = w.sum(-1, keepdim=True).clamp(min=1)
    halves = torch.bmm(w / counts, torch.from_numpy(np.ascontiguousarray(per_q, dtype=np.float32)))
    h = halves.double().numpy()  # [persona, 2K, d]
    cos_mean, cos_min, rs = [], [], []
    for k in range(n_splits):
        a, b = h[:, 2 * k], h[:, 2 * k + 1]
        c = M.rowwise_cos(a, b)
        cos_mean.append(c.mean())
        cos_min.append(c.min())
        ma = M.cos_matrix(M.mean_centre(a))[iu]
        mb = M.cos_matrix(M.mean_centre(b))[iu]
        rs.append(np.corrcoef(ma, mb)[0, 1])
    return {
        "exact": False,
        "n_splits": n_splits,
        "per_persona_cos_mean": float(np.mean(cos_mean)),
        "per_persona_cos_min": float(np.mean(cos_min)),
        "matrix_mc_pearson_mean": float(np.mean(rs)),
        "matrix_mc_pearson_min": float(np.min(rs)),
    }


def bstar_check(source: Any, layers: list[int]) -> dict[str, Any]:
    """How much of cos(A, B*) is arithmetic: B* averages A's token in.

    Reports cos(A, B*) against cos(A, B*_no_last) per layer (per-persona centroids), and checks
    the identity ``B* = ((n-1)·B*_no_last + A)/n`` per question, where n is the prompt length.
    """
    need = ("last", "prompt_mean", "prompt_mean_no_last")
    if not all(p in source.positions for p in need):
        return {"available": False, "reason": "needs last, prompt_mean and prompt_mean_no_last"}
    out: dict[str, Any] = {"available": True, "layers": {}}
    n_tok = source.n_tokens("prompt_mean")
    exact_n = n_tok is not None and source.provenance.get("prompt_index") != "all"
    for layer in layers:
        li = source.layer_index(layer)
        a, b, c = (source.centroids(p)[:, li].double().numpy() for p in need)
        row: dict[str, Any] = {
            "cos_a_bstar": M.Summary.of(M.rowwise_cos(a, b)).__dict__,
            "cos_a_bstar_no_last": M.Summary.of(M.rowwise_cos(a, c)).__dict__,
        }
        if exact_n and source.has_per_question("last"):
            pa, pb, pc = (source.per_question(p, layer).float() for p in need)
            n = n_tok.float()[..., None]
            rebuilt = ((n - 1) * pc + pa) / n
            valid = source.valid("prompt_mean") & source.valid("last")
            rel = (pb - rebuilt).norm(dim=-1) / pb.norm(dim=-1).clamp(min=1e-12)
            worst = float(rel[valid].max())
            # per-question vectors are stored in fp16 (relative precision ~5e-4)
            row["identity_max_rel_error"] = worst
            row["identity_holds"] = worst < 5e-3
        out["layers"][str(layer)] = row
    if not exact_n:
        out["identity_note"] = ("identity not checked: prompt lengths unknown or averaged over "
                                "several system-prompt phrasings")
    return out

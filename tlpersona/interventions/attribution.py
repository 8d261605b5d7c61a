"""Attribution patching: a first-order estimate of every patching cell from one backward pass.

For a metric ``M`` of the corrupt run and a component activation ``a`` at one position (and
head), patching in the clean value changes ``M`` by approximately
``dM/da · (a_clean - a_corrupt)`` (the gradient taken on the corrupt run). One clean forward
gives every ``a_clean``; one corrupt forward and one backward give every ``a_corrupt`` and every
gradient, for all positions, layers, heads and components at once.

Both metrics of exact patching (:mod:`tlpersona.interventions.patching`) are estimated:
``KL(clean || patched) ≈ KL(clean || corrupt) + dKL/da · Δa`` and
``LD_patched - LD_corrupt ≈ dLD/da · Δa``. The corrupt run is two identical batch rows, row 0
scored by KL and row 1 by LD, so that one backward of their sum yields both gradients.

The estimate is linear in ``Δa``: it is good where patching one cell moves the output a little
and poor where it moves it a lot (patching the residual stream at the last position late in the
model restores the clean output almost fully; KL, quadratic near the clean distribution, is
then over- or under-shot). The report puts its numbers beside exact ones with their Spearman
agreement (:func:`tlpersona.interventions.patching.agree`).
"""

from __future__ import annotations

from typing import Any

import torch

from tlpersona.interventions.cells import align, logit_diff, noop
from tlpersona.interventions.runner import Conversation, Runner, hook_name, kl

Key = tuple[str, str, int, int | None]  # (component, position row, layer, head or None)


def attribute_example(runner: Runner, clean: Conversation, corrupt: Conversation,
                      rows: list[str], layers: list[int], components: list[str],
                      skip_noops: bool = True) -> dict[Key, tuple[float, float, float, float, bool]]:
    """Every (component, row, layer, head) cell for one example, estimated: ``(KL_patched,
    KL_corrupt, LD gain, LD range, no-op)`` as :func:`~tlpersona.interventions.patching.patch_example`
    returns them exactly."""
    names = {(comp, layer): hook_name(comp, layer) for comp in components for layer in layers}
    uniq = list(dict.fromkeys(names.values()))
    clean_acts = runner.cache(clean.ids, uniq, clean.read)
    lp_c = clean_acts.pop("logprobs")
    tc = lp_c.argmax(-1)
    saved: dict[str, torch.Tensor] = {}

    def leaf(act: torch.Tensor, hook: Any) -> torch.Tensor:
        # the graph starts at the embeddings, whatever the parameters' requires_grad flags
        return act.detach().requires_grad_(True)

    def keep(name: str) -> Any:
        # By the name asked for: an alias (``hook_resid_pre``) reports its target's name. The
        # tensor is handed back because ``attn.hook_z`` sees a per-head reshape of the output
        # projection's input that the bridge uses downstream only when a hook returns it.
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            saved[name] = act
            return act

        return fn

    with torch.enable_grad():
        resid = runner.final(corrupt.ids, corrupt.read, rows=2,
                             hooks=[("embed.hook_out", leaf), *[(n, keep(n)) for n in uniq]])
        lp = runner.readout(resid)  # [2, read, vocab]
        lp_y = lp[0].detach()
        ty = lp_y.argmax(-1)
        kl_y = kl(lp_c, lp[0]).sum()
        ld = logit_diff(lp[1], tc, ty)
        grads = torch.autograd.grad(kl_y + ld, [saved[n] for n in uniq])
    grad = dict(zip(uniq, grads, strict=True))
    kl0 = float(kl_y.detach())
    ld_c = float(logit_diff(lp_c, tc, ty))
    ld_range = ld_c - float(logit_diff(lp_y, tc, ty))

    aligned = {row: align(row, clean, corrupt) for row in rows}
    order = [(row, idx) for row, idx in aligned.items() if idx is not None]
    # one gather per hook point for every row at once: (row number, clean index, corrupt index)
    r_ix = torch.tensor([r for r, (_, idx) in enumerate(order) for _ in idx], dtype=torch.long)
    k_ix = torch.tensor([k for _, idx in order for k, _ in idx], dtype=torch.long)
    c_ix = torch.tensor([c for _, idx in order for _, c in idx], dtype=torch.long)
    is_noop = [skip_noops and noop(idx, clean, corrupt) for _, idx in order]
    out: dict[Key, tuple[float, float, float, float, bool]] = {}
    for (comp, layer), name in names.items():
        a_c = clean_acts[name].double()  # [seq_clean, ...]
        dev = a_c.device
        a_y = saved[name][0].detach().double()  # [seq_corrupt, ...]
        c = c_ix.to(dev)
        delta = a_c[k_ix.to(dev)] - a_y[c]  # [n_idx, d] or [n_idx, heads, d_head]
        both = torch.stack([(grad[name][i].double()[c] * delta).sum(-1) for i in (0, 1)])
        per_row = torch.zeros(2, len(order), *both.shape[2:], dtype=both.dtype, device=dev)
        per_row.index_add_(1, r_ix.to(dev), both)  # summed over a row's index pairs
        d_kl, d_ld = per_row.tolist()  # one device-to-host copy per hook point
        for r, (row, _) in enumerate(order):
            heads = [None] if comp != "head" else list(range(len(d_kl[r])))
            for h in heads:
                dk = 0.0 if is_noop[r] else (d_kl[r] if h is None else d_kl[r][h])
                dl = 0.0 if is_noop[r] else (d_ld[r] if h is None else d_ld[r][h])
                out[comp, row, layer, h] = (kl0 + dk, kl0, dl, ld_range, is_noop[r])
    return out

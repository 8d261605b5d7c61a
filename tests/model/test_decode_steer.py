"""Per-row steering inside the static decoder against an independent reference: plain-HF forward
hooks that edit each block's output, and a greedy loop that reruns the whole sequence (no cache)."""

import math

import pytest
import torch

from tlpersona.chat.template import ChatRenderer
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.extraction.generation import eos_ids
from tlpersona.runtime.decode import StaticGreedy
from tlpersona.runtime.edits import RowEdits

N = 16


def reference(model, prompt, edits, eos):
    """Greedy ids of one prompt; ``edits``: (layer, start, fn) with ``fn(h [seq, d]) -> h``."""
    blocks = model.get_decoder().layers

    def hook_for(start, fn):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[0, start:] = fn(h[0, start:])
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    handles = [blocks[la].register_forward_hook(hook_for(st, fn)) for la, st, fn in edits]
    ids = list(prompt)
    try:
        with torch.no_grad():
            for _ in range(N):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
                ids.append(int(logits[0, -1].argmax()))
                if ids[-1] in eos:
                    break
    finally:
        for h in handles:
            h.remove()
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def setup(hf_ref, tokenizer):
    renderer = ChatRenderer(tokenizer)
    qs = builtin_questions()
    prompts = [renderer.prompt(p.system_prompts[0], qs[i].text).ids
               for i, p in enumerate(builtin_personas()[:6])]
    assert len({len(p) for p in prompts}) > 2  # left padding is exercised
    return prompts, eos_ids(hf_ref, tokenizer), tokenizer.pad_token_id


def _vectors(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def test_per_row_steering_equals_hooked_uncached_reference(hf_ref, setup):
    prompts, eos, pad = setup
    d, b = hf_ref.config.hidden_size, len(prompts)
    v = _vectors(d, 8, 0)
    # typical residual norm of this model is ~tens; these alphas move the greedy text
    add = [  # (row, layer, start, alpha, vector): four rows, each its own vector/layer/alpha
        (1, 3, 0, 8.0, v[0]), (2, 10, 5, 20.0, v[1]), (3, 5, 0, 12.0, v[2]), (3, 20, 0, 30.0, v[3]),
        (4, 15, len(prompts[4]) - 1, 40.0, v[4])]
    steer = {}
    for row, la, st, alpha, vec in add:
        steer.setdefault(la, RowEdits.neutral(b, d)).set(row, st, delta=alpha * vec)
    dec = StaticGreedy(hf_ref, N, eos, pad)
    plain = dec(prompts)
    got = dec(prompts, steer)
    for row in range(b):
        mine = [(la, st, (lambda h, a=alpha, x=vec: h + a * x)) for r, la, st, alpha, vec in add
                if r == row]
        assert got[row] == reference(hf_ref, prompts[row], mine, eos), row
    assert got[0] == plain[0] and got[5] == plain[5]  # unsteered rows as without steering
    assert sum(got[r] != plain[r] for r in range(1, 5)) >= 3  # the edits did change the text
    assert dec(prompts) == plain  # a steered batch leaves nothing behind


def test_ablation_and_capping_rows_equal_reference(hf_ref, setup):
    prompts, eos, pad = setup
    d, b = hf_ref.config.hidden_size, len(prompts)
    u = _vectors(d, 3, 1)
    ablate, cap = RowEdits.neutral(b, d), RowEdits.neutral(b, d)
    ablate.set(1, 0, u=u[0], lo=0.0, hi=0.0)
    cap.set(2, 4, u=u[1], lo=6.0)
    cap.set(3, 0, delta=25.0 * u[2])  # an added vector in a batch that also clamps
    got = StaticGreedy(hf_ref, N, eos, pad)(prompts, {8: ablate, 12: cap})
    ref_edits = {
        1: [(8, 0, lambda h: h - (h @ u[0])[:, None] * u[0])],
        2: [(12, 4, lambda h: h + (6.0 - h @ u[1]).clamp(min=0)[:, None] * u[1])],
        3: [(12, 0, lambda h: h + 25.0 * u[2])],
    }
    for row in range(b):
        assert got[row] == reference(hf_ref, prompts[row], ref_edits.get(row, []), eos), row
    assert math.isinf(float(cap.hi[2]))


def test_steering_is_validated(hf_ref, setup):
    prompts, eos, pad = setup
    d = hf_ref.config.hidden_size
    dec = StaticGreedy(hf_ref, 2, eos, pad)
    with pytest.raises(ValueError, match="rows"):
        dec(prompts, {3: RowEdits.neutral(len(prompts) - 1, d)})
    with pytest.raises(ValueError, match="not a block"):
        dec(prompts, {999: RowEdits.neutral(len(prompts), d)})
    late = RowEdits.neutral(len(prompts), d)
    late.start[0] = len(prompts[0]) + 1
    with pytest.raises(ValueError, match="starts after its prompt"):
        dec(prompts, {3: late})

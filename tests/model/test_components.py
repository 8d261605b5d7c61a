"""Component patching, batched sweeps and attribution patching on the embedded default model,
against plain-HF module hooks, one-cell-per-forward sweeps and finite differences."""

import pytest
import torch

from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.interventions.attribution import attribute_example
from tlpersona.interventions.cells import align
from tlpersona.interventions.patching import PatchConfig, patch_example, run_patching
from tlpersona.interventions.runner import HOOKS, Runner, hook_name, kl

Q = "What should I cook tonight?"
CLEAN = "You are a pirate who sails the seven seas."
CORRUPT = "You are a helpful assistant."


@pytest.fixture(scope="module")
def runner(loaded):
    return Runner(loaded)


@pytest.fixture(scope="module")
def sdpa_runner(default_source):
    """The GPU path: HF's own SDPA attention inside the bridge (the bridge's attention hooks
    other than ``attn.hook_z`` do not fire there)."""
    from tlpersona.models.loading import load_model

    return Runner(load_model("default", device="cpu", dtype="fp32", attn="sdpa"))


@pytest.fixture(scope="module")
def hf_sdpa_ref(default_source):
    """Plain HF with its SDPA attention: the like-for-like reference of the SDPA bridge (against
    eager attention the two differ by the order of fp32 sums, ~1e-6 relative per layer)."""
    from tlpersona.models.loading import load_hf

    return load_hf(default_source, "cpu", torch.float32, attn="sdpa")


def _hf_components(hf, ids, layer):
    """Plain-HF reference: each component read by forward hooks on HF's own modules."""
    got = {}
    lay = hf.model.layers[layer]
    n_heads = hf.config.num_attention_heads

    def attn(module, args, out):
        got["attn_out"] = out[0][0].clone()

    def mlp(module, args, out):
        got["mlp_out"] = out[0].clone()

    def o_in(module, args):
        got["head"] = args[0][0].reshape(len(ids), n_heads, -1).clone()

    handles = [lay.self_attn.register_forward_hook(attn), lay.mlp.register_forward_hook(mlp),
               lay.self_attn.o_proj.register_forward_pre_hook(o_in)]
    try:
        with torch.no_grad():
            hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    got["resid_pre"], got["resid_post"] = hs[layer][0], hs[layer + 1][0]
    return got


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["eager", "sdpa"])
def test_component_hooks_equal_plain_hf_module_outputs(mode, request, hf_ref):
    runner = request.getfixturevalue("runner" if mode == "eager" else "sdpa_runner")
    conv = runner.conversation(CLEAN, Q)
    for layer in (0, 11):
        acts = runner.cache(conv.ids, [hook_name(h, layer) for h in HOOKS])
        ref = _hf_components(hf_ref if mode == "eager" else request.getfixturevalue("hf_sdpa_ref"),
                             conv.ids, layer)
        for h in HOOKS:
            got = acts[hook_name(h, layer)]
            assert got.shape == ref[h].shape, h
            torch.testing.assert_close(got, ref[h], rtol=1e-4, atol=1e-5, msg=f"{mode} {h} L{layer}")


def _hf_patched_kl(hf, clean, corrupt, layer, component, k, c, head=None):
    """KL(clean || patched) at the last prompt token, the patch made by plain-HF hooks."""
    lay = hf.model.layers[layer]
    src = _hf_components(hf, clean.ids, layer)[component][k]
    with torch.no_grad():
        ref = hf(torch.tensor([clean.ids])).logits[0, -1]
    if component == "attn_out":
        def hook(module, args, out):
            out[0][0, c] = src
    elif component == "mlp_out":
        def hook(module, args, out):
            out[0, c] = src
    else:  # head: the slice of o_proj's input that is this head's output
        d = src.shape[-1]

        def pre(module, args):
            args[0][0, c, head * d:(head + 1) * d] = src[head]
    handle = (lay.self_attn.o_proj.register_forward_pre_hook(pre) if component == "head" else
              (lay.self_attn if component == "attn_out" else lay.mlp).register_forward_hook(hook))
    try:
        with torch.no_grad():
            patched = hf(torch.tensor([corrupt.ids])).logits[0, -1]
    finally:
        handle.remove()
    return float(kl(torch.log_softmax(ref.double(), -1), torch.log_softmax(patched.double(), -1)))


@pytest.mark.parametrize("mode", ["eager", "sdpa"])
def test_component_patch_equals_plain_hf_hook_patch(mode, request, hf_ref):
    runner = request.getfixturevalue("runner" if mode == "eager" else "sdpa_runner")
    clean = runner.conversation(CLEAN, Q)
    corrupt = runner.conversation(CORRUPT, Q)
    row, layer = "sys_start+5", 4
    (k, c), = align(row, clean, corrupt)
    for component in ("attn_out", "mlp_out", "head"):
        got = patch_example(runner, clean, corrupt, [row], PatchConfig(layers=[layer], hook=component))
        heads = [None] if component != "head" else [0, 5]
        for head in heads:
            ref = _hf_patched_kl(hf_ref, clean, corrupt, layer, component, k, c, head)
            value = got[row, layer, head][0]
            assert value == pytest.approx(ref, rel=1e-3, abs=1e-6), (mode, component, head)
            assert abs(value - got[row, layer, head][1]) > 1e-4  # the patch changed something
    assert runner.hook_free()


@pytest.mark.usefixtures("one_thread")
def test_batched_sweep_equals_one_cell_per_forward_bit_for_bit(runner):
    clean = runner.conversation(CLEAN, Q, [1, 2, 3])
    corrupt = runner.conversation(CORRUPT, Q, [1, 2, 3])
    rows = ["sys_start+3", "sys_start+5", "sys_end", "last"]
    for hook, layers in (("resid_post", [2, 15, 29]), ("head", [9])):
        batched = patch_example(runner, clean, corrupt, rows, PatchConfig(layers=layers, hook=hook))
        single = patch_example(runner, clean, corrupt, rows,
                               PatchConfig(layers=layers, hook=hook, max_rows=1))
        assert batched.keys() == single.keys()
        assert len(batched) == len(rows) * len(layers) * (1 if hook != "head" else 9)
        assert batched == single  # every float equal, not close


def test_attribution_is_the_gradient_times_the_difference(runner):
    """Central finite differences along the clean-minus-corrupt direction, for a residual and a
    head cell, against the attribution estimate of both metrics."""
    clean = runner.conversation(CLEAN, Q)
    corrupt = runner.conversation(CORRUPT, Q)
    row, layer = "sys_start+4", 6
    (k, c), = align(row, clean, corrupt)
    est = attribute_example(runner, clean, corrupt, [row], [layer], ["resid_post", "head"])
    lp_c = runner.logprobs(clean.ids, clean.read)[0]
    lp_y = runner.logprobs(corrupt.ids, corrupt.read)[0]
    tc, ty = lp_c.argmax(-1), lp_y.argmax(-1)
    # steps: small against the curvature along a residual delta (as large as the residual
    # itself), large against fp32 noise in the KL for the head's much smaller effect
    for comp, head, eps in (("resid_post", None, 0.01), ("head", 3, 0.1)):
        name = hook_name(comp, layer)
        a_c = runner.cache(clean.ids, [name])[name][k]
        a_y = runner.cache(corrupt.ids, [name])[name][c]
        sel = (c,) if head is None else (c, head)
        delta = (a_c - a_y) if head is None else (a_c[head] - a_y[head])

        def metrics(eps, name=name, sel=sel, delta=delta):
            def fn(act, hook):
                act[(0, *sel)] = act[(0, *sel)] + eps * delta
                return act

            lp = runner.logprobs(corrupt.ids, corrupt.read, hooks=[(name, fn)])[0]
            return float(kl(lp_c, lp).sum()), float((lp[:, tc] - lp[:, ty]).diagonal().sum())

        (kp, lp_), (km, lm) = metrics(eps), metrics(-eps)
        kl_p, kl_y, gain, _, noop = est[comp, row, layer, head]
        assert not noop
        assert kl_p - kl_y == pytest.approx((kp - km) / (2 * eps), rel=2e-2, abs=1e-5), comp
        assert gain == pytest.approx((lp_ - lm) / (2 * eps), rel=2e-2, abs=1e-5), comp
    assert runner.hook_free()


def test_attribution_ranks_residual_cells_like_exact_patching(runner):
    """Spearman between attribution and exact effects over the residual-stream cells after the
    system text (where a patch is a small change; at system-text tokens, which swap a token's
    identity, the linear estimate breaks down: see the README for the numbers)."""
    cfg = PatchConfig(layers=[0, 5, 10, 15, 20, 25, 29],
                      positions=["sys_end", "sys_end+1", "user_end", "last"],
                      attribution_hooks=["resid_post"], progress=False)
    ps = builtin_personas()
    res = run_patching(runner, [ps[0], ps[1], ps[3], ps[20]], builtin_questions()[:1], cfg)
    for a in res.agreement:
        rho, n = a.by_region["after the system text"]
        assert n == 28 and a.n_cells == 28
        assert rho >= 0.9, (a.metric, rho, a.largest_gaps)
    assert runner.hook_free()

"""The static decoder's fused kernels: where they apply, and that everything else runs HF's
modules unchanged. The kernels themselves need CUDA and Triton: the GPU tests here run only
there (`benchmarks/gpu_kernels.py` measures them against HF's modules on the 7B architecture)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tlpersona.runtime import kernels
from tlpersona.runtime.decode import StaticGreedy

GPU = pytest.mark.skipif(kernels.triton is None or not torch.cuda.is_available(),
                         reason="needs CUDA and Triton")


def tiny(kind: str, dtype: torch.dtype = torch.float32, act: str = "silu", hidden: int = 32
         ) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, hidden_act=act,
                  max_position_embeddings=128)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).to(dtype).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).to(dtype).eval()


def test_fp32_and_cpu_models_keep_hf_modules():
    for kind in ("qwen2", "llama"):
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny(kind, dtype)
            assert not kernels.available(model)  # CPU (and fp32 anywhere)
            forwards = [m.forward for m in model.modules()]
            with kernels.fused_step_kernels(model) as applied:
                assert applied is False
                assert [m.forward for m in model.modules()] == forwards


def test_other_activations_are_not_fused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton", object())
    assert not kernels.available(tiny("llama", torch.bfloat16, act="gelu"))
    # on the CPU the parameters' device still decides
    assert not kernels.available(tiny("llama", torch.bfloat16))


def test_a_model_across_devices_keeps_hf_modules(monkeypatch):
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton", object())
    model = tiny("qwen2", torch.bfloat16)

    def on(*devices: int):
        return lambda: iter([types.SimpleNamespace(device=torch.device("cuda", i), dtype=torch.bfloat16)
                             for i in devices])

    monkeypatch.setattr(model, "parameters", on(0, 0, 0))
    assert kernels.available(model)
    monkeypatch.setattr(model, "parameters", on(0, 1, 1))
    assert not kernels.available(model)


def test_decoder_with_fused_default_equals_hf_modules_on_the_cpu():
    model = tiny("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = StaticGreedy(model, 6, [1], 0, fused=False, layers=[0]).capture(prompts)
    got = StaticGreedy(model, 6, [1], 0, layers=[0]).capture(prompts)
    assert got.ids == want.ids
    assert torch.equal(got.resid, want.resid)


@GPU
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_fused_kernels_are_as_close_to_fp32_as_hf_modules(kind):
    """Fidelity: the fused bf16 forward's error against the same model in fp32 is no larger
    than HF's bf16 modules' own error (root mean square over the logits, up to half more: the
two round at slightly different points)."""
    model = tiny(kind, torch.bfloat16).cuda()
    exact = tiny(kind, torch.float32).cuda()
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert kernels.available(model) and not kernels.available(exact)
    ids = torch.randint(2, 64, (3, 9), device="cuda")
    with torch.no_grad():
        want = exact(ids).logits
        hf = model(ids).logits
        with kernels.fused_step_kernels(model) as applied:
            got = model(ids).logits
        after = model(ids).logits
    assert applied
    def rms(x: torch.Tensor) -> float:
        return (x.float() - want).pow(2).mean().sqrt().item()

    assert rms(got) <= 1.5 * rms(hf), (rms(got), rms(hf))
    assert torch.equal(after, hf)  # HF's modules are back


@GPU
def test_fused_decoder_is_reproducible_on_the_gpu():
    model = tiny("qwen2", torch.bfloat16, hidden=64).cuda()  # head size 16: the attention kernel runs
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    a = StaticGreedy(model, 8, [1], 0, layers=[1]).capture(prompts)
    b = StaticGreedy(model, 8, [1], 0, layers=[1]).capture(prompts)
    assert a.ids == b.ids and torch.equal(a.resid, b.resid)


# The kernels themselves: on a GPU where there is one, else in Triton's interpreter (set up in
# conftest.py), which has no bf16 matrix products: fp32 and fp16 here, bf16 on the GPU.
TRITON = pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_case(dtype: torch.dtype, hq: int = 14, hkv: int = 2, length: int = 150, d: int = 32):
    g = torch.Generator().manual_seed(1)
    # the query in the layout HF's projection leaves it: [B, 1, Hq, D] viewed as [B, Hq, 1, D]
    q = torch.randn((5, 1, hq, d), generator=g).to(dtype).transpose(1, 2)
    k = torch.randn((5, hkv, length, d), generator=g).to(dtype)
    v = torch.randn((5, hkv, length, d), generator=g).to(dtype)
    mask = torch.zeros((5, 1, 1, length), dtype=torch.bool)
    mask[0, ..., 5:100] = True  # left padding, then prompt and response slots
    mask[1, ..., :3] = True  # slots in one block, then a hole, then one more
    mask[1, ..., 70] = True
    mask[2, ..., 130:149] = True  # only the last, partial block
    mask[3, ..., 64] = True  # one slot
    mask[4] = True
    return q, k, v, mask


def _sdpa(q, k, v, mask, dtype=torch.float32):
    """HF's grouped-query attention in ``dtype``: repeat_kv, then SDPA; [B, 1, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
        attn_mask=mask, scale=q.shape[-1] ** -0.5).transpose(1, 2)


@TRITON
@pytest.mark.parametrize("shape", [(14, 2), (4, 4), (8, 1)])
def test_decode_attention_equals_grouped_sdpa_in_fp32(shape):
    hq, hkv = shape
    q, k, v, mask = (t.to(DEV) for t in _attention_case(torch.float32, hq, hkv))
    got = kernels.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    want = _sdpa(q, k, v, mask)
    assert got.shape == (5, 1, hq, 32) and got.is_contiguous()
    # fp32 on a GPU: the kernel's products are TF32's
    tol = 1e-5 if DEV == "cpu" else 5e-3
    assert (got - want).abs().max().item() < tol


@TRITON
def test_decode_attention_never_reads_a_slot_it_may_not_attend_to():
    q, k, v, mask = (t.to(DEV) for t in _attention_case(torch.float32))
    want = kernels.decode_attention(q, k, v, mask, 0.2)
    hidden = ~mask[:, 0, 0, :]  # [B, L]
    k[hidden[:, None, :, None].expand_as(k)] = float("nan")
    v[hidden[:, None, :, None].expand_as(v)] = float("nan")
    got = kernels.decode_attention(q, k, v, mask, 0.2)
    assert torch.equal(got, want)


@TRITON
def test_decode_attention_in_half_precision_is_as_close_as_sdpa():
    q, k, v, mask = (t.to(DEV) for t in _attention_case(torch.float16))
    exact = _sdpa(q, k, v, mask)
    got = kernels.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    assert got.dtype == torch.float16
    # fp16 probabilities against fp16 values: the rounding of one flash-attention pass
    assert (got.float() - exact).abs().max().item() < 4e-3


@TRITON
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_decode_attention_on_the_7b_shapes(dtype):
    """28 query heads over 4 key/value heads of 128 (Qwen2.5-7B): against fp32, no further
    than SDPA in the same dtype is (bf16 only on a GPU: the interpreter has no bf16 products)."""
    q, k, v, mask = (t.to(DEV) for t in _attention_case(dtype, 28, 4, d=128))
    exact = _sdpa(q, k, v, mask)
    got = kernels.decode_attention(q, k, v, mask, 128 ** -0.5)
    same = _sdpa(q, k, v, mask, dtype)
    err, err_sdpa = ((t.float() - exact).abs().max().item() for t in (got, same))
    assert err <= max(2 * err_sdpa, 1e-3), (err, err_sdpa)


@TRITON
def test_decode_attention_reads_a_strided_mask_as_its_values():
    q, k, v, mask = (t.to(DEV) for t in _attention_case(torch.float32))
    wide = torch.zeros(mask.shape[:-1] + (2 * mask.shape[-1],), dtype=torch.bool, device=DEV)
    wide[..., ::2] = mask
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    assert torch.equal(kernels.decode_attention(q, k, v, strided, 0.2),
                       kernels.decode_attention(q, k, v, mask, 0.2))


@TRITON
def test_decode_attention_takes_only_a_mask_per_row_and_slot():
    from tlpersona.runtime.decode import decode_attention, fused_decode_attention

    q, k, v, mask = (t.to(DEV) for t in _attention_case(torch.float32))
    assert kernels.takes_decode_attention(q, k, mask)
    shared = mask[:1]  # one mask for every row
    longer = torch.cat([mask, mask], -1)  # more columns than cache slots
    for bad in (shared, longer, mask.float(), None):
        assert not kernels.takes_decode_attention(q, k, bad)
    # the decoder's attention function hands what the kernel does not take to SDPA
    got, _ = fused_decode_attention(None, q, k, v, shared, scaling=0.2)
    want, _ = decode_attention(None, q, k, v, shared, scaling=0.2)
    assert torch.equal(got, want)


@TRITON
def test_decode_attention_rejects_what_it_cannot_run():
    q, k, v, mask = _attention_case(torch.float32)
    with pytest.raises(ValueError, match="mask torch.float32"):
        kernels.decode_attention(q, k, v, mask.float(), 0.2)
    with pytest.raises(ValueError, match="query"):
        kernels.decode_attention(q.expand(-1, -1, 2, -1), k, v, mask, 0.2)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_elementwise_kernels_equal_hf_modules(dtype):
    from transformers.models.qwen2 import modeling_qwen2 as m

    g = torch.Generator().manual_seed(2)
    x = (torch.randn((3, 4, 96), generator=g) * 3).to(dtype).to(DEV)
    norm = m.Qwen2RMSNorm(96, eps=1e-6).to(DEV)
    norm.weight.data = torch.randn(96, generator=g).to(DEV)
    norm = norm.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (kernels.rmsnorm(x, norm.weight, 1e-6).float() - norm(x).float()).abs().max() < tol
    gate, up = x * 2, x.flip(-1)
    want = torch.nn.functional.silu(gate) * up
    assert (kernels.silu_mul(gate, up).float() - want.float()).abs().max() < tol * 4
    q = torch.randn((3, 4, 6, 16), generator=g).to(dtype).to(DEV).transpose(1, 2)  # [B, H, T, D]
    kk = torch.randn((3, 4, 2, 16), generator=g).to(dtype).to(DEV).transpose(1, 2)
    angle = torch.randn((3, 4, 8), generator=g).to(DEV)
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
    want_q, want_k = m.apply_rotary_pos_emb(q, kk, cos, sin)
    got_q = kernels.rotary(q, cos, sin)
    assert got_q.stride() == q.stride()
    assert (got_q.float() - want_q.float()).abs().max() < tol * 4
    assert (kernels.rotary(kk, cos, sin).float() - want_k.float()).abs().max() < tol * 4


@pytest.mark.skipif(kernels.triton is None or torch.cuda.is_available(),
                    reason="Triton's interpreter on the CPU (a GPU's fp32 products are TF32's)")
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_decoder_through_the_kernels_keeps_hf_ids_and_residuals_in_fp32(kind, monkeypatch):
    """The fused decoder's wiring: with the kernels switched on for an fp32 model (through the
    interpreter), every pass of one query token per row goes through the attention kernel and
    the ids and captured residuals are HF's modules'."""
    model = tiny(kind, hidden=64).to(DEV)  # head size 16: the kernel's least
    prompts = [[5, 6, 7, 8, 9], [9, 10, 11], [12]]
    want = StaticGreedy(model, 6, [1], 0, fused=False, layers=[0, 1]).capture(prompts)
    calls = []
    attend = kernels.decode_attention

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return attend(*args, **kw)

    monkeypatch.setattr(kernels, "available", lambda m: True)
    monkeypatch.setattr(kernels, "decode_attention", counted)
    got = StaticGreedy(model, 6, [1], 0, layers=[0, 1], use_graphs=False).capture(prompts)
    assert got.ids == want.ids
    # 2 blocks x 6 steps (5 new tokens fed back and the last one's residual)
    assert len(calls) == 12 and calls[0] == (3, 4, 1, 16)
    assert (got.resid - want.resid).abs().max().item() < 1e-5
    for a, b in zip(got.prefill, want.prefill, strict=True):
        assert (a - b).abs().max().item() < 1e-5
    # one-token prompts: the prefill is one column wide, so it goes through the kernel too
    calls.clear()
    single = [[5], [9], [12]]
    want = StaticGreedy(model, 6, [1], 0, fused=False, layers=[0, 1]).capture(single)
    got = StaticGreedy(model, 6, [1], 0, layers=[0, 1], use_graphs=False).capture(single)
    assert got.ids == want.ids and len(calls) == 14
    assert (got.resid - want.resid).abs().max().item() < 1e-5

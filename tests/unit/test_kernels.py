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


def tiny(kind: str, dtype: torch.dtype = torch.float32, act: str = "silu") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
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
    model = tiny("qwen2", torch.bfloat16).cuda()
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    a = StaticGreedy(model, 8, [1], 0, layers=[1]).capture(prompts)
    b = StaticGreedy(model, 8, [1], 0, layers=[1]).capture(prompts)
    assert a.ids == b.ids and torch.equal(a.resid, b.resid)

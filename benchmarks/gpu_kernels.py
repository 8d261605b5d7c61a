"""The static decoder's fused kernels (tlpersona.runtime.kernels) on the Qwen2.5-7B architecture
(random bf16 weights): each kernel against the HF module it replaces on the same inputs (largest
difference, share of bit-equal outputs; the decode attention also against fp32, and timed), the
decoder's ids and captured residuals with and without them, the same fused run twice (bit for bit),
and generated tokens/s of both in alternating rounds at one batch size.

    PYTHONPATH=. python benchmarks/gpu_kernels.py --batch 512 --prompt-len 80 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.runtime import kernels
from tlpersona.runtime.decode import StaticGreedy


def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.float() - want.float()).abs()
    same = (got == want).float().mean().item()
    print(f"{name}: max |diff| {diff.max().item():.3g} (max |want| {want.float().abs().max().item():.3g}), "
          f"bit-equal {same:.2%}")


def check_kernels(model: torch.nn.Module, batch: int) -> None:
    from transformers.models.qwen2 import modeling_qwen2 as m

    layer = model.model.layers[3]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((batch, 1, 3584), generator=g, device="cuda", dtype=torch.bfloat16) * 3
    norm = layer.input_layernorm
    compare("rmsnorm", kernels.rmsnorm(x, norm.weight, norm.variance_epsilon), norm(x))
    gate = torch.randn((batch, 1, 18944), generator=g, device="cuda", dtype=torch.bfloat16) * 4
    up = torch.randn_like(gate)
    compare("silu_mul", kernels.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)
    q = torch.randn((batch, 1, 28, 128), generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn((batch, 1, 4, 128), generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.randint(0, 400, (batch, 1), device="cuda")
    cos, sin = model.model.rotary_emb(x, pos)
    want_q, want_k = m.apply_rotary_pos_emb(q, k, cos, sin)
    compare("rotary q", kernels.rotary(q, cos, sin), want_q)
    compare("rotary k", kernels.rotary(k, cos, sin), want_k)
    check_attention(batch, g)


def _ms(fn, reps: int = 50) -> float:
    """Median CUDA time of ``fn()`` in milliseconds."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_attention(batch: int, g: torch.Generator, length: int = 320) -> None:
    """One layer's decode attention over a static cache of ``length`` slots (a prompt of 80 and
    200 new tokens rounded up): the kernel against the grouped SDPA call it replaces
    (tlpersona.runtime.decode.decode_attention, cuDNN/flash over the whole cache) on the same
    inputs, with every row's first 80 slots its prompt (left padding 0-39) and the cache
    filled to 100, 180 and 279 slots; and the same against an fp32 computation."""
    from tlpersona.runtime.decode import decode_attention

    bf = torch.bfloat16
    q = torch.randn((batch, 1, 28, 128), generator=g, device="cuda", dtype=bf).transpose(1, 2)
    k = torch.randn((batch, 4, length, 128), generator=g, device="cuda", dtype=bf)
    v = torch.randn((batch, 4, length, 128), generator=g, device="cuda", dtype=bf)
    pads = torch.randint(0, 40, (batch,), generator=g, device="cuda")
    col = torch.arange(length, device="cuda")
    for filled in (100, 180, 279):
        mask = ((col[None, :] >= pads[:, None]) & (col[None, :] < filled))[:, None, None, :]
        got = kernels.decode_attention(q, k, v, mask, 128 ** -0.5)
        want, _ = decode_attention(None, q, k, v, mask, scaling=128 ** -0.5)
        exact = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(7, 1), v.float().repeat_interleave(7, 1),
            attn_mask=mask, scale=128 ** -0.5).transpose(1, 2)
        compare(f"attention, {filled}/{length} slots", got, want)
        err_k, err_s = ((t.float() - exact).abs().max().item() for t in (got, want))
        t_k = _ms(lambda m=mask: kernels.decode_attention(q, k, v, m, 128 ** -0.5))
        t_s = _ms(lambda m=mask: decode_attention(None, q, k, v, m, scaling=128 ** -0.5))
        print(f"  max |diff| from fp32: kernel {err_k:.3g}, sdpa {err_s:.3g}; "
              f"time per layer: kernel {t_k:.3f} ms, sdpa {t_s:.3f} ms ({t_s / t_k:.2f}x)")
        others = {f"{b}/{w}": _ms(lambda m=mask, b=b, w=w: kernels.decode_attention(
            q, k, v, m, 128 ** -0.5, block=b, warps=w)) for b in (32, 64, 128) for w in (2, 4, 8)}
        print("  kernel ms by block/warps: " + ", ".join(f"{n} {t:.3f}" for n, t in others.items()))
    again = kernels.decode_attention(q, k, v, mask, 128 ** -0.5)
    print("  kernel twice bit-identical:", bool(torch.equal(again, got)),
          "| row 0 alone equals row 0 in the batch:",
          bool(torch.equal(kernels.decode_attention(q[:1], k[:1], v[:1], mask[:1], 128 ** -0.5), got[:1])))


def run(dec: StaticGreedy, prompts: list[list[int]]) -> tuple[float, list[list[int]], torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = dec.capture(prompts)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out.ids, out.resid.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model = qwen7b(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "fused available:",
          kernels.available(model))
    check_kernels(model, args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=g).tolist()
    layers = [7, 14, 21, 27]
    decoders = {"hf": StaticGreedy(model, args.new_tokens, [2], 2, layers=layers, fused=False),
                "fused": StaticGreedy(model, args.new_tokens, [2], 2, layers=layers, fused=True)}
    for dec in decoders.values():
        run(dec, prompts)  # capture
    walls: dict[str, list[float]] = {k: [] for k in decoders}
    outs = {}
    for _ in range(args.rounds):
        for name, dec in decoders.items():
            wall, ids, resid = run(dec, prompts)
            walls[name].append(wall)
            outs.setdefault(name, []).append((ids, resid))
    tokens = args.batch * args.new_tokens
    for name, w in walls.items():
        print(f"{name}: " + ", ".join(f"{x:.2f} s" for x in w) +
              f" per batch; best {tokens / min(w):.0f} generated tok/s")
    print(f"speed-up (best of each): {min(walls['hf']) / min(walls['fused']):.3f}x")
    (ids_a, res_a), (ids_b, res_b) = outs["fused"][0], outs["fused"][-1]
    print("fused twice: ids identical", ids_a == ids_b, "| residuals bit-identical",
          bool(torch.equal(res_a, res_b)))
    ids_h, res_h = outs["hf"][0]
    rows = sum(a == b for a, b in zip(ids_a, ids_h, strict=True))
    print(f"fused vs hf: {rows}/{len(ids_a)} rows with identical ids")
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
             for a, b in zip(ids_a, ids_h, strict=True)]
    diverged = [f for f in first if f is not None]
    if diverged:
        print(f"  first differing token: median {sorted(diverged)[len(diverged) // 2]}, min {min(diverged)}")
    # residuals of the prompt's last token (step 0 of the capture) compared per row
    a, h = res_a[:, :, 0].float(), res_h[:, :, 0].float()
    cos = torch.nn.functional.cosine_similarity(a, h, dim=-1)
    print(f"captured residual at the first response token, fused vs hf: min cosine {cos.min().item():.6f}")


if __name__ == "__main__":
    main()

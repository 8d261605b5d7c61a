"""The static decoder's fused kernels (tlpersona.runtime.kernels) on the Qwen2.5-7B architecture (random
bf16 weights): each kernel against the HF module it replaces on the same inputs (largest
difference, share of bit-equal outputs), the decoder's ids and captured residuals with and without
them, the same fused run twice (bit for bit), and generated tokens/s of both in alternating
rounds at one batch size.

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

"""Fused kernels for the static decoder's step (Triton; Qwen2 and Llama blocks, bf16 or fp16 on
CUDA): RMSNorm, SiLU·mul, the rotary embedding, and one query token's grouped-query attention.

A 7B decode step at a few hundred rows is half GEMMs and half elementwise work: HF's RMSNorm
alone is seven kernels (upcast, square, mean, add, rsqrt, multiply, downcast and the weight), the
rotary embedding ten, SiLU·mul two. Here each is one kernel, written to round where HF's modules
round (the normalised value to the model's dtype before the weight, SiLU before the multiply);
the compiler may fuse the rotary's multiply and add, which skips one rounding of HF's. On the 7B
architecture RMSNorm and SiLU·mul are bit-equal to HF's modules on almost every element and the
rotary on 86 % (`benchmarks/gpu_kernels.py`); a test holds the fused forward at least as close
to fp32 as HF's bf16 modules. The kernels have no autotuning: the same shapes launch the same programs in
every process, so a run, its resume and every torchrun rank decode the same ids.

The decode step's attention (:func:`decode_attention`) is one program per row and key/value head:
it reads each cached key and value once for the query heads that share it, in a fixed order
over the slots, and skips the blocks of slots that the row's mask rules out, so a step reads what
has been written rather than the whole static cache. A row's result depends on its own query,
slots and mask, not on the other rows (its left padding, which the batch's longest prompt sets,
decides where its slots fall in the blocks, and so the rounding). It serves every pass of one
query token per row: each decode step, and a prefill one column wide; wider prefills keep SDPA.

:func:`fused_step_kernels` swaps them into a model's modules for the duration of a ``with``
block; anything else (fp32, the CPU, other architectures, no Triton) runs HF's modules.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

#: the model types whose blocks these kernels reproduce (RMSNorm, SwiGLU MLP, rotate-half rotary)
FAMILIES = ("qwen2", "llama")

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None


def available(model: Any) -> bool:
    """Whether the fused kernels apply to ``model``: a Qwen2/Llama HF model in bf16 or fp16 on
    one CUDA device, with Triton installed. fp32 keeps HF's modules, so it keeps HF's exact ids;
    so does a model spread over devices (a Triton kernel launches on the current device, not
    on its tensors')."""
    if triton is None or not torch.cuda.is_available():
        return False
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return False
    if getattr(config, "hidden_act", None) != "silu":
        return False
    params = list(model.parameters())
    if len({p.device for p in params}) != 1:
        return False
    return params[0].device.type == "cuda" and params[0].dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, x_stride, y_stride, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        keep = cols < n
        x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, n_tokens,
                       xs_b, xs_h, xs_t, cs_b, cs_t, ys_b, ys_h, ys_t, HALF: tl.constexpr):
        pid = tl.program_id(0)
        t = pid % n_tokens
        h = (pid // n_tokens) % n_heads
        b = pid // (n_tokens * n_heads)
        i = tl.arange(0, HALF)
        x = x_ptr + b * xs_b + h * xs_h + t * xs_t
        c = cos_ptr + b * cs_b + t * cs_t
        s = sin_ptr + b * cs_b + t * cs_t
        dt = y_ptr.dtype.element_ty
        x1 = tl.load(x + i).to(tl.float32)
        x2 = tl.load(x + HALF + i).to(tl.float32)
        c1 = tl.load(c + i).to(tl.float32)
        c2 = tl.load(c + HALF + i).to(tl.float32)
        s1 = tl.load(s + i).to(tl.float32)
        s2 = tl.load(s + HALF + i).to(tl.float32)
        # q * cos + rotate_half(q) * sin
        y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        y = y_ptr + b * ys_b + h * ys_h + t * ys_t
        tl.store(y + i, y1.to(dt))
        tl.store(y + HALF + i, y2.to(dt))


    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, n_keys, scale,
                                 qs_b, qs_h, ks_b, ks_h, ks_l, vs_b, vs_h, vs_l, ms_b, os_b, os_h,
                                 GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        # one program: one row's query heads that share key/value head `kvh`, over the whole
        # cache in a fixed order (no split of the keys, so no cross-program reduction)
        # 64-bit offsets: one layer's cache of a large batch passes 2**31 elements
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        real = g < GROUP
        q = tl.load(q_ptr + b * qs_b + heads[:, None] * qs_h + d[None, :], mask=real[:, None], other=0.0)
        top = tl.full((G_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        k_row = k_ptr + b * ks_b + kvh * ks_h
        v_row = v_ptr + b * vs_b + kvh * vs_h
        for start in range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            live = tl.load(m_ptr + b * ms_b + n, mask=n < n_keys, other=0) != 0
            # blocks this row may not attend to (left padding, slots not yet written) are not
            # read; skipping them is also what keeps the softmax finite: a block of dead slots
            # before the first live one would give exp(-inf - -inf)
            if tl.max(live.to(tl.int32), axis=0) > 0:
                k = tl.load(k_row + n[:, None] * ks_l + d[None, :], mask=live[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale
                s = tl.where(live[None, :], s, float("-inf"))
                new_top = tl.maximum(top, tl.max(s, axis=1))
                shrink = tl.exp(top - new_top)
                p = tl.exp(s - new_top[:, None])
                total = total * shrink + tl.sum(p, axis=1)
                v = tl.load(v_row + n[:, None] * vs_l + d[None, :], mask=live[:, None], other=0.0)
                # the probabilities meet the values in the values' dtype, as flash attention's do
                acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
                top = new_top
        out = acc / total[:, None]
        tl.store(o_ptr + b * os_b + heads[:, None] * os_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=real[:, None])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of ``x [..., d]`` (rows contiguous in the last dim) in one kernel."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _rmsnorm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), d, eps,
                                      BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.view(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes, contiguous) in one kernel."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](gate, up, out, n, BLOCK=1024, num_warps=4)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [B, H, T, D]`` (any strides, last dim contiguous)
    with ``cos``/``sin [B or 1, T, D]`` in one kernel; returns ``[B, H, T, D]`` with ``x``'s strides."""
    b, h, t, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    # cos/sin of one position list serve every row ([1, T, D]): a zero batch stride
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # HF's result keeps the projection's [B, T, H, D] memory order; attention kernels are
    # chosen by the layout, so the fused result keeps it too
    out = torch.empty_like(x)
    _rotary_kernel[(b * h * t,)](x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2),
                                 cos.stride(0), cos.stride(1), out.stride(0), out.stride(1),
                                 out.stride(2), HALF=d // 2, num_warps=1)
    return out


def takes_decode_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` runs these shapes: one query token, query heads a
    multiple of key/value heads, a power-of-two head size of at least 16, a bool mask
    ``[B, 1, 1, L]`` with a row per query row and a column per cache slot."""
    b, hq, q, d = query.shape
    return (q == 1 and hq % key.shape[1] == 0 and d >= 16 and not d & (d - 1)
            and mask is not None and mask.dtype == torch.bool
            and tuple(mask.shape) == (b, 1, 1, key.shape[2]))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor, scale: float, block: int = 64, warps: int = 2) -> torch.Tensor:
    """Grouped-query attention of one query token per row over a static cache, in one kernel:
    ``query [B, Hq, 1, D]``, ``key``/``value [B, Hkv, L, D]`` (last dim contiguous), ``mask``
    ``[B, 1, 1, L]`` bool (True: may attend; every row at least one). Query head ``h`` reads
    key/value head ``h // (Hq // Hkv)``, as HF's ``repeat_kv``. Returns ``[B, 1, Hq, D]``
    contiguous, the layout HF's attention functions return.

    Each key/value block is read once for all the query heads that share it, and blocks the
    row's mask rules out entirely (padding, slots not yet written) are skipped; fp32 scores and
    softmax, bf16/fp16 probabilities against the values, as flash attention rounds. ``block``
    (cache slots per step of the loop) and ``warps`` are fixed launch choices, not tuned per
    process: the decoder uses the defaults (``benchmarks/gpu_kernels.py`` times others)."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if not takes_decode_attention(query, key, mask):
        raise ValueError(f"decode_attention: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"mask {mask.dtype} {tuple(mask.shape)}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("decode_attention: the last dim of query, key and value must be contiguous")
    group = hq // hkv
    # the kernel steps through a row's flags one byte at a time
    flags = mask.reshape(b, length).contiguous().view(torch.uint8)
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    _decode_attention_kernel[(b, hkv)](
        query, key, value, flags, out, length, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), flags.stride(0),
        out.stride(0), out.stride(2),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block, num_warps=warps)
    return out


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _rotary_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if unsqueeze_dim != 1 or q.shape[-1] % 2 or cos.dim() != 3:
        raise NotImplementedError("fused rotary takes [B, H, T, D] with cos/sin [B, T, D]")
    return rotary(q, cos, sin), rotary(k, cos, sin)


@contextlib.contextmanager
def fused_step_kernels(model: Any) -> Iterator[bool]:
    """Run ``model``'s RMSNorms, MLPs and rotary embedding through the fused kernels inside the
    block (yields whether they apply; see :func:`available`). Only this model's module
    instances and, for the block, its modeling module's rotary function are replaced."""
    if not available(model):
        yield False
        return
    norm_types = tuple(_family_types(model, "RMSNorm"))
    mlp_types = tuple(_family_types(model, "MLP"))
    patched: list[torch.nn.Module] = []
    for module in model.modules():
        forward = (_norm_forward if isinstance(module, norm_types)
                   else _mlp_forward if isinstance(module, mlp_types) else None)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    modeling = _modeling(model)
    original = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = _rotary_apply
    try:
        yield True
    finally:
        modeling.apply_rotary_pos_emb = original
        for module in patched:
            delattr(module, "forward")


def _modeling(model: Any) -> Any:
    kind = model.config.model_type
    return importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


def _family_types(model: Any, suffix: str) -> list[type]:
    modeling = _modeling(model)
    return [getattr(modeling, name) for name in dir(modeling)
            if name.endswith(suffix) and isinstance(getattr(modeling, name), type)]

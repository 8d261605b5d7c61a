"""Automatic batch sizes (``--batch-size auto``) from free accelerator memory and the model's shape.

Generation: each row of a decode batch holds its KV cache for the whole cache length, the fused
extraction's residual buffers (prompt and response at every captured layer), and, during the
prefill, the MLP activations of its prompt. Extraction: each row of a bridged forward holds its
tokens' MLP activations, the cached layers and their float64 copies for pooling. The batch is the
number of rows that fit in a fraction of the available memory, capped where larger batches stop
paying (the decode step is compute-bound past a few hundred rows). Out-of-memory back-off stays in
place behind this estimate.

Off CUDA there is no memory to measure: the fixed CPU defaults are used.
"""

from __future__ import annotations

from typing import Any

import torch

#: CPU defaults (no memory reading): generation rows, extraction rows
CPU_GENERATE, CPU_EXTRACT = 16, 8
#: Upper limits on a GPU: beyond these the step is compute-bound and the memory that more rows
#: take costs more than they bring (measured on an H100 with a 7B model, fused extraction of
#: 16 personas x 240 questions: 55.0 s at 512 rows, 56.4 s at 1024; on an H200 with the fused
#: decode kernels, 48 personas: 104.0 s at 512, 108.9 s at 1024 for 1.7x the memory).
MAX_GENERATE, MAX_EXTRACT = 512, 256
#: share of the free memory that the estimate may plan for
FILL = 0.8


def free_bytes(device: str | torch.device) -> int | None:
    """Memory a CUDA device can still give this process (free on the card plus what PyTorch's
    allocator holds unused; the cache is not emptied), or None elsewhere."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(torch.cuda.mem_get_info(dev)[0]) + unused


def _dims(config: Any) -> tuple[int, int, int, int, int]:
    """layers, d_model, MLP width, key/value heads, head size of a HF config."""
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    inter = int(getattr(config, "intermediate_size", None) or 4 * d)
    return int(config.num_hidden_layers), d, inter, kv, head_dim


def decode_row_bytes(config: Any, dtype: torch.dtype, prompt_len: int, new_tokens: int,
                     captured_layers: int = 0) -> int:
    """Device bytes one decode row needs: KV cache, capture buffers, prefill activations."""
    n_layers, d, inter, kv, head_dim = _dims(config)
    size = torch.finfo(dtype).bits // 8
    cache_len = prompt_len + new_tokens
    kv_bytes = 2 * n_layers * kv * head_dim * cache_len * size
    capture = captured_layers * (prompt_len + new_tokens + 1) * d * size
    # prefill: gate, up and their product at MLP width, a few residual-width temporaries, and
    # the query copies of grouped-query attention
    prefill = prompt_len * (3 * inter + 8 * d) * size
    step = int(config.vocab_size) * 6  # one row's logits and their argmax temporaries
    return kv_bytes + capture + prefill + step


def extract_row_bytes(config: Any, dtype: torch.dtype, seq_len: int, cached_layers: int) -> int:
    """Device bytes one row of a bridged extraction forward needs."""
    _, d, inter, _, _ = _dims(config)
    size = torch.finfo(dtype).bits // 8
    activations = seq_len * (3 * inter + 10 * d) * size
    cached = cached_layers * seq_len * d * (size + 8)  # the cached layer and its float64 copy
    return activations + cached


def generate_batch(device: str | torch.device, config: Any, dtype: torch.dtype, rows: int,
                   prompt_len: int, new_tokens: int, captured_layers: int = 0) -> int:
    """Decode batch for ``rows`` prompts of at most ``prompt_len`` tokens."""
    free = free_bytes(device)
    most = CPU_GENERATE if free is None else min(
        MAX_GENERATE, int(FILL * free) // decode_row_bytes(config, dtype, prompt_len, new_tokens,
                                                           captured_layers))
    return max(1, min(rows, most))


def extract_batch(device: str | torch.device, config: Any, dtype: torch.dtype, seq_len: int,
                  cached_layers: int) -> int:
    """Extraction batch for sequences of at most ``seq_len`` tokens."""
    free = free_bytes(device)
    if free is None:
        return CPU_EXTRACT
    per_row = extract_row_bytes(config, dtype, seq_len, cached_layers)
    return max(1, min(MAX_EXTRACT, int(FILL * free) // per_row))


def pad_id(tokenizer: Any, eos: list[int] | None = None) -> int:
    """The id that fills padding: the tokenizer's pad token, else the first end-of-turn id,
    else 0. Padded positions are always masked or never read, so the choice never changes a
    result; one rule keeps every batch builder alike."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(eos[0]) if eos else 0


def pad_batch(seqs: list[list[int]], pad: int, side: str = "left"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, W]`` token ids padded with ``pad`` on ``side`` (``left`` or ``right``) and the
    ``[B, W]`` attention mask (1 on real tokens); W is the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask

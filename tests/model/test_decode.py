"""The static-cache decoder against plain HF greedy generation on the embedded model."""

import torch

from tlpersona.chat.template import ChatRenderer
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.extraction.generation import eos_ids, greedy_batch
from tlpersona.runtime.decode import StaticGreedy, decode_attention


def test_static_decoder_gives_the_same_tokens_as_hf_generate(hf_ref, tokenizer):
    renderer = ChatRenderer(tokenizer)
    # different prompt lengths in one batch: left padding is exercised
    prompts = [renderer.prompt(p.system_prompts[0], q.text).ids
               for p in builtin_personas()[:8] for q in builtin_questions()[:3]]
    assert len({len(p) for p in prompts}) > 3
    eos, pad = eos_ids(hf_ref, tokenizer), tokenizer.pad_token_id
    ref = [r.ids for r in greedy_batch(hf_ref, prompts, 32, eos, pad)]
    dec = StaticGreedy(hf_ref, 32, eos, pad)
    assert dec(prompts) == ref
    # a second, shorter batch reuses the engine of the same shape bucket
    assert dec(prompts[:24]) == ref[:24] and len(dec._engines) == 1
    assert hf_ref.config._attn_implementation == "eager"  # restored afterwards


def test_grouped_decode_attention_equals_repeated_heads():
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.3
    mask[..., 0] = True
    got, _ = decode_attention(None, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.25).transpose(1, 2)
    assert got.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_one_padder_left_and_right():
    from tlpersona.runtime.batching import pad_batch, pad_id

    ids, mask = pad_batch([[5, 6, 7], [8]], pad=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]

    class Tok:
        pad_token_id = None

    assert pad_id(Tok(), [2, 3]) == 2 and pad_id(Tok()) == 0
    Tok.pad_token_id = 4
    assert pad_id(Tok(), [2]) == 4

"""The static-cache decoder against plain HF greedy generation on the embedded model."""

import pytest
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


def test_shared_prefixes_prefilled_once_give_the_full_prefills_tokens_and_residuals(hf_ref, tokenizer):
    from factories import hf_resid

    from tlpersona.chat.template import common_prefix_len

    renderer = ChatRenderer(tokenizer)
    personas, questions = builtin_personas()[:3], builtin_questions()[:4]
    prompts = [renderer.prompt(p.system_prompts[0], q.text).ids for p in personas for q in questions]
    # each persona's prompts share its system block: prefilled once per persona
    shared = [common_prefix_len(prompts[i - i % 4: i - i % 4 + 4]) for i in range(len(prompts))]
    assert min(shared) > 10 and len(set(shared)) > 1
    eos, pad, layers = eos_ids(hf_ref, tokenizer), tokenizer.pad_token_id, [3, 29]
    widths: list[tuple[int, int]] = []
    handle = hf_ref.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: widths.append(tuple(a[0].shape)))
    dec = StaticGreedy(hf_ref, 16, eos, pad, layers=layers)
    try:
        got = dec.capture(prompts, shared=shared)
        w = max(len(p) for p in prompts)
        prefill = [s for s in widths if s[1] > 1]
        # the three system blocks in one pass, then every row from where the shortest shared
        # stretch ends: fewer prompt tokens than one full prefill
        assert prefill[0][0] == 3 and prefill[1][0] == len(prompts)
        assert sum(b * n for b, n in prefill) < len(prompts) * w
        ref = [r.ids for r in greedy_batch(hf_ref, prompts, 16, eos, pad)]
        assert got.ids == ref
        resid = got.resid.clone()
        pre = [x.clone() for x in got.prefill]
        # the same engine, unshared: one full prefill (nothing to share saves no tokens)
        widths.clear()
        full = dec.capture(prompts, shared=[0] * len(prompts))
        assert [s for s in widths if s[1] > 1] == [(len(prompts), w)]
        assert full.ids == ref
        torch.testing.assert_close(resid, full.resid, rtol=1e-4, atol=1e-4)
        # and shared again on it, with each row claiming its whole prompt: rows are grouped by
        # their own tokens, so an overstated claim costs tokens, never correctness
        again = dec.capture(prompts, shared=[len(p) for p in prompts])
        assert again.ids == ref
        torch.testing.assert_close(again.resid, full.resid, rtol=1e-4, atol=1e-4)
    finally:
        handle.remove()
    # every prompt position against plain HF's own residuals of the unpadded prompt, to fp32
    # rounding of the layer's scale (a padded batch and a single row sum in other orders)
    for i, p in enumerate(prompts):
        hs = hf_resid(hf_ref, p, layers)
        for li in range(len(layers)):
            torch.testing.assert_close(pre[li][i, got.pads[i]:], hs[li], rtol=1e-4,
                                       atol=1e-5 * float(hs[li].abs().max()))
    with pytest.raises(ValueError, match="shared has 2 rows"):
        StaticGreedy(hf_ref, 4, eos, pad).capture(prompts, shared=[1, 2])

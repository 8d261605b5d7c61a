"""Extraction on the embedded default model against an independent plain-HF computation."""

import pytest
import torch
from factories import hf_resid

from tlpersona.chat.positions import parse_positions
from tlpersona.data import Persona, Question
from tlpersona.extraction import ExtractConfig, Extractor
from tlpersona.extraction.generation import generate_responses

LAYERS = [0, 7, 15, 22, 29]  # 29 is the last block: HF's hidden_states[-1] is after the final norm
PERSONA = Persona("pirate", ("You are a pirate captain who has spent forty years at sea.",
                             "Act as an old buccaneer."))
QUESTIONS = [Question("a", "Why is the sky blue?"),
             Question("b", "What should I cook for dinner tonight, given a tight budget?"),
             Question("c", "Hi!")]


@pytest.fixture(scope="module")
def responses(loaded, hf_ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "responses.jsonl"
    return generate_responses(hf_ref, loaded.tokenizer, [PERSONA], QUESTIONS, "all", path,
                              max_new_tokens=10, batch_size=4, progress=False)


def _reference(hf, tok, system, question, resp_ids):
    """Every recipe computed by hand from HF hidden states: {name: [layer, d]}."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    prompt = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    content = resp_ids[:-1] if resp_ids and resp_ids[-1] == tok.eos_token_id else resp_ids
    h = hf_resid(hf, prompt + content, LAYERS)
    n = len(prompt)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sys_end = prompt.index(im_end)
    raw = tok(system, add_special_tokens=False)["input_ids"]
    return {
        "last": h[:, n - 1],
        "sys_end": h[:, sys_end],
        "sys_end+1": h[:, sys_end + 1],
        "prompt_mean": h[:, :n].double().mean(1).float(),
        "prompt_mean_no_last": h[:, : n - 1].double().mean(1).float(),
        "prompt_mean_no_first": h[:, 1:n].double().mean(1).float(),
        "first": h[:, 0],
        "response_mean": h[:, n:].double().mean(1).float(),
        "raw_system_last": hf_resid(hf, raw, LAYERS)[:, -1],
    }


def test_every_recipe_matches_hf_hidden_states(loaded, hf_ref, responses):
    cfg = ExtractConfig(parse_positions("all6,first,prompt_mean_no_first"), LAYERS, prompt_index=0,
                        batch_size=2, progress=False)
    res = Extractor(loaded, cfg).persona(PERSONA, QUESTIONS, responses)
    system = PERSONA.system_prompts[0]
    for qi, q in enumerate(QUESTIONS):
        ref = _reference(hf_ref, loaded.tokenizer, system, q.text, responses[("pirate", 0, q.id)].ids)
        for name, want in ref.items():
            got = res.per_question[name][qi] if name in res.per_question else res.centroid[name]
            assert got.shape == (len(LAYERS), loaded.info.d_model)
            # float32 rounding relative to the tensor's largest entry (residuals run to ~10^2-10^3,
            # where padded batches and the reference's unpadded forward differ by a few ulps):
            # 2e-6 of it, never looser than 1e-4 below it
            diff = (got - want).abs().max().item()
            tol = max(1e-4, 2e-6 * want.abs().max().item())
            assert diff <= tol, (name, q.id, diff, tol)
    # centroids are the mean over questions
    torch.testing.assert_close(res.centroid["last"], res.per_question["last"].mean(0))
    # question-invariant positions store no per-question rows
    assert "sys_end" not in res.per_question and "raw_system_last" not in res.per_question


@pytest.mark.usefixtures("one_thread")
def test_prompt_index_all_averages_phrasings(loaded, hf_ref, responses):
    pos = parse_positions("sys_end,last")
    both = Extractor(loaded, ExtractConfig(pos, LAYERS, prompt_index="all", progress=False))
    res = both.persona(PERSONA, QUESTIONS[:2])
    want = torch.stack([
        Extractor(loaded, ExtractConfig(pos, LAYERS, prompt_index=k, progress=False))
        .persona(PERSONA, QUESTIONS[:2]).centroid["sys_end"] for k in (0, 1)
    ]).mean(0)
    torch.testing.assert_close(res.centroid["sys_end"], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batching_does_not_change_results(loaded, responses, side):
    pos = parse_positions("all6,user_end,sys_start")
    one = Extractor(loaded, ExtractConfig(pos, LAYERS, batch_size=1, padding_side=side, progress=False))
    many = Extractor(loaded, ExtractConfig(pos, LAYERS, batch_size=3, padding_side=side, progress=False))
    r1 = one.persona(PERSONA, QUESTIONS, responses)
    rn = many.persona(PERSONA, QUESTIONS, responses)
    for name, a in r1.per_question.items():
        cos = torch.nn.functional.cosine_similarity(a, rn.per_question[name], dim=-1)
        assert cos.min().item() >= 0.9999, (name, side, cos.min().item())
    for name, a in r1.centroid.items():
        cos = torch.nn.functional.cosine_similarity(a, rn.centroid[name], dim=-1)
        assert cos.min().item() >= 0.9999, (name, side)


def test_prompt_mean_identity(loaded):
    cfg = ExtractConfig(parse_positions("a,bstar,bstar_no_last"), LAYERS, progress=False)
    res = Extractor(loaded, cfg).persona(PERSONA, QUESTIONS)
    tok = loaded.tokenizer
    for qi, q in enumerate(QUESTIONS):
        msgs = [{"role": "system", "content": PERSONA.system_prompts[0]},
                {"role": "user", "content": q.text}]
        n = len(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
        pm = res.per_question["prompt_mean"][qi]
        rebuilt = ((n - 1) * res.per_question["prompt_mean_no_last"][qi] + res.per_question["last"][qi]) / n
        torch.testing.assert_close(pm, rebuilt, atol=1e-4, rtol=1e-5)


def test_greedy_generation_matches_step_by_step_argmax(loaded, hf_ref, responses):
    """Catches transformers releases whose generate() breaks greedy decoding."""
    from tlpersona.chat.template import ChatRenderer

    r = ChatRenderer(loaded.tokenizer)
    for q in QUESTIONS:
        ids = r.prompt(PERSONA.system_prompts[1], q.text).ids
        got = responses[("pirate", 1, q.id)]
        out = []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(hf_ref(torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
                if nxt == loaded.tokenizer.eos_token_id:
                    break
        assert got.ids == out
        assert got.finished == (out[-1] == loaded.tokenizer.eos_token_id)


def test_sdpa_bridge_matches_plain_hf_sdpa(default_source):
    """attn="sdpa" hands attention to HF's own module: residuals match plain HF (sdpa)."""
    from tlpersona.models.loading import load_hf, load_model

    fast = load_model("default", device="cpu", dtype="fp32", attn="sdpa")
    ref = load_hf(default_source, "cpu", torch.float32)  # HF's default attention: sdpa
    assert ref.config._attn_implementation == "sdpa"
    cfg = ExtractConfig(parse_positions("last,sys_end,prompt_mean"), LAYERS, batch_size=3, progress=False)
    res = Extractor(fast, cfg).persona(PERSONA, QUESTIONS)
    for qi, q in enumerate(QUESTIONS):
        want = _reference(ref, fast.tokenizer, PERSONA.system_prompts[0], q.text, [])
        # SDPA's CPU kernel rounds differently for another sequence length or padding (a
        # shorter prefix run, a padded batch), so compare relative to each vector's size.
        for name in ("last", "prompt_mean", "sys_end"):
            got = res.per_question[name][qi] if name in res.per_question else res.centroid[name]
            rel = (got - want[name]).norm(dim=-1) / want[name].norm(dim=-1)
            assert rel.max().item() < 1e-5, name


def test_bridge_attention_hooks_still_fire_in_eager_mode(default_source):
    from tlpersona.models.loading import load_model

    eager = load_model("default", device="cpu", dtype="fp32", attn="eager")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        _, cache = eager.bridge.run_with_cache(ids, names_filter=lambda n: n == "blocks.0.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"].shape[-2:] == (4, 4)


def test_unembedding_is_skipped(loaded):
    calls = []
    handle = loaded.bridge.unembed.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            loaded.bridge(torch.tensor([[1, 2, 3]]))
        assert len(calls) == 1  # control: a plain forward does reach the unembedding
        for layers in ([29], [3, 7]):
            ex = Extractor(loaded, ExtractConfig(parse_positions("last"), layers, progress=False))
            ex.run([[1, 2, 3]], [torch.tensor([[0.0, 0.0, 1.0]])])
        assert len(calls) == 1
    finally:
        handle.remove()


@pytest.mark.usefixtures("one_thread")
def test_out_of_memory_halves_the_batch_and_loses_nothing(loaded, monkeypatch):
    cfg = ExtractConfig(parse_positions("last,prompt_mean"), LAYERS, batch_size=3, progress=False)
    want = Extractor(loaded, cfg).persona(PERSONA, QUESTIONS)
    ex = Extractor(loaded, cfg)
    real_run = ex.run
    sizes = []

    def flaky(seqs, weights):
        sizes.append(len(seqs))
        if len(seqs) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real_run(seqs, weights)

    monkeypatch.setattr(ex, "run", flaky)
    got = ex.persona(PERSONA, QUESTIONS)
    assert ex.batch_size == 1 and sizes[:3] == [3, 1, 1]
    for name in want.per_question:
        torch.testing.assert_close(got.per_question[name], want.per_question[name], atol=1e-4, rtol=1e-6)

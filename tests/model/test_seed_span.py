"""response_mean_seed: the seed experiment's response span (content, then the template's closing
tokens), against plain HF hidden states over the templated conversation."""

import pytest
from factories import hf_resid
from test_extract import LAYERS, PERSONA, QUESTIONS

from tlpersona.chat.positions import parse_position, parse_positions
from tlpersona.chat.template import ChatRenderer
from tlpersona.data.responses import Response
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, Extractor
from tlpersona.extraction.generation import generate_responses
from tlpersona.extraction.preflight import check_prompts, check_responses


@pytest.fixture(scope="module")
def mixed(loaded, hf_ref, tmp_path_factory):
    """Greedy responses of the default model, plus a finished one and an empty finished one."""
    path = tmp_path_factory.mktemp("gen") / "responses.jsonl"
    out = generate_responses(hf_ref, loaded.tokenizer, [PERSONA], QUESTIONS[:2], 0, path,
                             max_new_tokens=8, batch_size=2, progress=False)
    eos = loaded.tokenizer.eos_token_id
    cut = out[("pirate", 0, "a")]
    out[("pirate", 0, "a")] = Response(cut.ids[:5] + [eos], True)
    out[("pirate", 0, "c")] = Response([eos], True)
    return out


def test_turn_close_is_im_end_then_newline(tokenizer):
    tok = tokenizer
    assert ChatRenderer(tok).turn_close() == [tok.convert_tokens_to_ids("<|im_end|>"),
                                              *tok("\n", add_special_tokens=False)["input_ids"]]


@pytest.mark.usefixtures("one_thread")
def test_seed_span_matches_hf_over_the_templated_conversation(loaded, hf_ref, mixed):
    """The seed's rule, computed independently: render the conversation with the response as an
    assistant message, tokenise it whole, and average every token after the generation prompt."""
    tok = loaded.tokenizer
    cfg = ExtractConfig(parse_positions("response_mean_seed,response_mean"), LAYERS, prompt_index=0,
                        batch_size=2, progress=False)
    res = Extractor(loaded, cfg).persona(PERSONA, QUESTIONS, mixed)
    system = PERSONA.system_prompts[0]
    for qi, q in enumerate(QUESTIONS):
        r = mixed[("pirate", 0, q.id)]
        content = r.ids[:-1] if r.finished else r.ids
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q.text}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": tok.decode(content)}],
                                       add_generation_prompt=False, return_dict=True)["input_ids"]
        full = list(full)
        # the generated ids are the canonical tokenisation here, so the re-rendered text has them
        assert full[: len(prompt)] == list(prompt) and full[len(prompt):-2] == content
        assert tok.convert_ids_to_tokens(full[-2:]) == ["<|im_end|>", "Ċ"]  # Ċ: byte-level "\n"
        h = hf_resid(hf_ref, full, LAYERS)
        want = h[:, len(prompt):].double().mean(1).float()
        got = res.per_question["response_mean_seed"][qi]
        assert (got - want).abs().max().item() <= 1e-4, q.id
        assert res.n_tokens["response_mean_seed"][qi] == len(full) - len(prompt)
        if content:  # response_mean is unchanged by the closing tokens that follow it
            plain = h[:, len(prompt):len(prompt) + len(content)].double().mean(1).float()
            assert (res.per_question["response_mean"][qi] - plain).abs().max().item() <= 1e-4
    # the empty response has a seed span (the closing tokens) and no response_mean
    assert res.valid["response_mean_seed"].all()
    assert res.valid["response_mean"].tolist() == [True, True, False]


def test_seed_span_refuses_a_foreign_end_token_that_another_position_reads(tokenizer):
    """A response ending with another end token than the template's: the seed span puts
    <|im_end|> in its place, so response_mean with the end-of-turn token would read the wrong
    token; refused before any forward pass. Without include_eot nothing reads it."""
    other_eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert other_eos != tokenizer.eos_token_id
    qs = QUESTIONS[:1]
    resp = {("pirate", 0, "a"): Response([28, 29, other_eos], True)}
    pos = parse_positions("response_mean_seed,response_mean")
    checked = check_prompts(tokenizer, pos, [PERSONA], qs, 0)
    assert next(iter(checked.values())).close == (tokenizer.eos_token_id, 198)
    check_responses(checked, pos, resp, 50000, False, "r")
    with pytest.raises(TlpersonaError, match="ends with token 0, not the template's end-of-turn"):
        check_responses(checked, pos, resp, 50000, True, "r")
    with pytest.raises(TlpersonaError, match="closing tokens .* exceed the model's context"):
        check_responses(checked, pos, resp, 50000, False, "r", context=next(iter(checked.values()))
                        .prompt_len + 3)


def test_seed_span_is_a_named_position_that_the_fused_pass_leaves_to_two_passes():
    from tlpersona.extraction.fused import FusedConfig, fusable, fused_extract_to_store

    p = parse_position("b_seed")
    assert p.name == "response_mean_seed" and p.needs_response and not p.question_invariant
    cfg = ExtractConfig(parse_positions("last,b_seed"), [3], progress=False)
    assert not fusable(cfg) and fusable(ExtractConfig(parse_positions("last,b"), [3]))
    with pytest.raises(TlpersonaError, match="response_mean_seed .* second pass"):
        fused_extract_to_store(None, None, None, cfg, FusedConfig(4), [PERSONA], QUESTIONS, "x", "y")


def test_compare_takes_both_spans_as_separate_positions_by_default():
    from tlpersona.analyses.compare import default_positions
    from tlpersona.analyses.compare.verdicts import pair_tag

    got = default_positions(["response_mean_seed", "last", "response_mean"])
    assert got == ["last", "response_mean", "response_mean_seed"]
    # the seed's recipe B was this span: it is load-bearing as B, under its own name
    assert pair_tag("last", "response_mean_seed") == "load-bearing"

"""Position resolution on three template styles, asserting the decoded token at each anchor."""

import copy

import pytest

from tlpersona.chat.positions import parse_position
from tlpersona.chat.template import ChatRenderer, common_prefix_len
from tlpersona.errors import TlpersonaError

SYSTEM = "You are a pirate captain."
QUESTION = "Where is the treasure?"

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _variant(tokenizer, template, specials):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def _token_at(tok, spans, name):
    start, stop = parse_position(name).resolve(spans)
    assert stop == start + 1
    return tok.convert_ids_to_tokens(spans.ids[start])


def test_chatml(tokenizer):
    r = ChatRenderer(tokenizer)
    s = r.prompt(SYSTEM, QUESTION)
    assert r.supports_system_role
    expect = {"sys_start": "You", "sys_last": ".", "sys_end": "<|im_end|>", "sys_end+1": "Ċ",
              "sys_end+2": "<|im_start|>", "user_start": "Where", "user_last": "?",
              "user_end": "<|im_end|>", "last": "Ċ", "last-1": "istant"}
    for name, token in expect.items():
        assert _token_at(tokenizer, s, name) == token, name
    assert s.anchors["user_end"] > s.anchors["sys_end"]


def test_llama3_header_style(tokenizer):
    tok = _variant(tokenizer, LLAMA3_STYLE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    r = ChatRenderer(tok)
    s = r.prompt(SYSTEM, QUESTION)
    assert r.supports_system_role
    expect = {"sys_start": "You", "sys_end": "<|eot_id|>", "sys_end+1": "<|start_header_id|>",
              "user_start": "Where", "user_end": "<|eot_id|>", "last": "ĊĊ",
              "last-1": "<|end_header_id|>"}
    for name, token in expect.items():
        assert _token_at(tok, s, name) == token, name


def test_gemma_style_without_system_role(tokenizer):
    tok = _variant(tokenizer, GEMMA_STYLE, ["<start_of_turn>", "<end_of_turn>"])
    r = ChatRenderer(tok)
    assert not r.supports_system_role
    s = r.prompt(SYSTEM, QUESTION)
    assert _token_at(tok, s, "sys_start") == "You"
    assert _token_at(tok, s, "sys_last") == "."
    assert _token_at(tok, s, "user_end") == "<end_of_turn>"
    assert _token_at(tok, s, "last") == "Ċ"
    # the system text sits inside the user turn, before the question
    assert s.anchors["sys_last"] < s.anchors["user_start"]
    with pytest.raises(TlpersonaError, match="no system role"):
        parse_position("sys_end").resolve(s)


def test_offset_past_sequence_is_an_error(tokenizer):
    s = ChatRenderer(tokenizer).prompt(SYSTEM, QUESTION)
    with pytest.raises(TlpersonaError, match="outside the sequence"):
        parse_position("last+1").resolve(s)
    with pytest.raises(TlpersonaError, match="outside the sequence"):
        parse_position("sys_start-10").resolve(s)


def test_response_ids_are_appended_not_retokenised(tokenizer):
    r = ChatRenderer(tokenizer)
    resp = [1000, 2000, 3000, 2]
    s = r.prompt(SYSTEM, QUESTION, resp)
    assert s.ids[s.prompt_len:] == resp
    assert parse_position("resp_start").resolve(s) == (s.prompt_len, s.prompt_len + 1)
    assert parse_position("response_mean").resolve(s) == (s.prompt_len, s.seq_len)


def test_raw_system_has_no_template_and_no_bos(tokenizer):
    ids = ChatRenderer(tokenizer).raw_system(SYSTEM)
    assert tokenizer.decode(ids) == SYSTEM


def test_system_block_is_shared_prefix(tokenizer):
    r = ChatRenderer(tokenizer)
    a, b = r.prompt(SYSTEM, "Why?"), r.prompt(SYSTEM, "How are you today?")
    n = common_prefix_len([a.ids, b.ids])
    assert a.anchors["sys_end"] + 1 < n
    assert a.ids[:n] == b.ids[:n] and a.ids[n] != b.ids[n]


def test_empty_system_prompt_is_an_error(tokenizer):
    with pytest.raises(TlpersonaError, match="empty system prompt"):
        ChatRenderer(tokenizer).prompt("  ", QUESTION)

"""Fused generation + extraction against the two-pass path, on the embedded model in fp32."""

import json

import pytest
import torch
from click.testing import CliRunner

from tlpersona.cache import open_store
from tlpersona.chat.positions import parse_positions
from tlpersona.chat.template import template_hash
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.data.provenance import header as response_header
from tlpersona.data.responses import read_responses
from tlpersona.extraction import ExtractConfig, extract_to_store
from tlpersona.extraction.fused import MARK, FusedConfig, fused_extract_to_store
from tlpersona.runtime.batching import decode_row_bytes, generate_batch

LAYERS = [3, 29]  # 29: the last block, read before the final norm


def test_fused_store_equals_two_pass_store(loaded, hf_ref, tmp_path):
    personas, questions = builtin_personas()[:2], builtin_questions()[:3]
    cfg = ExtractConfig(parse_positions("all6,resp_start,user_end"), LAYERS, batch_size=4,
                        progress=False)
    fused = tmp_path / "fused"
    fused.mkdir()
    # A saved response that the decoder will not reproduce (as after a resumed run on other
    # hardware): the store must hold the vectors of the saved tokens, read teacher-forced.
    planted = [int(t) for t in loaded.tokenizer("Arr, the sea!", add_special_tokens=False)["input_ids"]]
    planted.append(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    line = {"persona": personas[1].name, "prompt_index": 0, "question_id": questions[2].id,
            "response_ids": planted, "finished": True, "text": "Arr, the sea!"}
    # the file a killed earlier run of this store left: our header, then its responses
    head = response_header(loaded.info.identity, template_hash(loaded.tokenizer), "float32", 8)
    (fused / "responses.jsonl").write_text(json.dumps(head) + "\n" + json.dumps(line) + "\n")
    fused_extract_to_store(hf_ref, loaded.tokenizer, loaded.info, cfg, FusedConfig(8, 4),
                           personas, questions, fused, fused / "responses.jsonl")
    responses = read_responses(fused / "responses.jsonl")
    assert len(responses) == 6 and responses[(personas[1].name, 0, questions[2].id)].ids == planted
    two = extract_to_store(loaded, cfg, personas, questions, tmp_path / "two", responses)

    a, b = open_store(fused, verify=True), open_store(two, verify=True)
    # same provenance, responses digest included: the store cannot tell how it was made
    assert a.provenance == b.provenance and a.provenance["responses_hash"] != MARK
    for pos in b.positions:
        if b.has_per_question(pos):
            assert torch.equal(a.valid(pos), b.valid(pos))
            x, y = a.per_question(pos).float(), b.per_question(pos).float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            assert float(cos.min()) >= 0.99999, pos
        cos = torch.nn.functional.cosine_similarity(a.centroids(pos), b.centroids(pos), dim=-1)
        assert float(cos.min()) >= 0.99999, pos
    # the planted response really was read (not the decoder's own continuation)
    assert a.n_tokens("response_mean")[1, 2] == len(planted) - 1


def test_auto_batch_sizes_shrink_with_memory(monkeypatch):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    # KV cache alone: 2 (k, v) x 28 layers x 4 heads x 128 x 300 slots x 2 bytes
    assert decode_row_bytes(cfg, torch.bfloat16, 100, 200) > 2 * 28 * 4 * 128 * 300 * 2
    assert generate_batch("cpu", cfg, torch.bfloat16, 1920, 100, 200) == 16
    assert generate_batch("cpu", cfg, torch.bfloat16, 5, 100, 200) == 5
    import tlpersona.runtime.batching as batching

    monkeypatch.setattr(batching, "free_bytes", lambda device: 64 * 2**30)
    big = generate_batch("cuda", cfg, torch.bfloat16, 1920, 100, 200, captured_layers=4)
    monkeypatch.setattr(batching, "free_bytes", lambda device: 16 * 2**30)
    small = generate_batch("cuda", cfg, torch.bfloat16, 1920, 100, 200, captured_layers=4)
    assert 1 <= small < big <= 512
    # the fixed-size parts of a row: its KV cache grows with the cache length, its capture
    # buffers with the number of captured layers
    row = decode_row_bytes(cfg, torch.bfloat16, 100, 200, 4)
    assert decode_row_bytes(cfg, torch.bfloat16, 100, 400, 4) > row
    assert decode_row_bytes(cfg, torch.bfloat16, 100, 200, 8) > row


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_batch_size_is_one_line_exit_2(value, tmp_path):
    from tlpersona.cli import main

    res = CliRunner().invoke(main, ["extract", "--batch-size", value, "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--batch-size" in res.output
    assert not (tmp_path / "s").exists()


def test_killed_fused_run_resumes_to_the_same_store(loaded, hf_ref, tmp_path, monkeypatch):
    """Killed after a group's responses were appended but before its store part was written:
    the rerun decodes that group again, appends nothing twice, and finishes the same store."""
    import tlpersona.extraction.fused as fused_mod
    from tlpersona.cache.writer import StoreWriter

    monkeypatch.setattr(fused_mod, "GROUP_PASSES", 2)  # one persona per group
    personas, questions = builtin_personas()[:2], builtin_questions()[:2]
    cfg = ExtractConfig(parse_positions("last,response_mean,sys_end"), LAYERS, progress=False)

    def run(out):
        return fused_extract_to_store(hf_ref, loaded.tokenizer, loaded.info, cfg,
                                      FusedConfig(6, 2), personas, questions, out,
                                      out / "responses.jsonl")

    whole = run(tmp_path / "whole")
    write_group = StoreWriter.write_group

    def dies_on_second(self, start, results):
        if start == 1:
            raise KeyboardInterrupt
        write_group(self, start, results)

    monkeypatch.setattr(StoreWriter, "write_group", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    assert len(read_responses(tmp_path / "killed" / "responses.jsonl")) == 4  # both groups'
    monkeypatch.setattr(StoreWriter, "write_group", write_group)
    resumed = run(tmp_path / "killed")
    lines = lambda p: (p / "responses.jsonl").read_text().splitlines()  # noqa: E731
    # one provenance header, then each response once
    assert len(lines(resumed)) == 5 and sorted(lines(resumed)) == sorted(lines(whole))
    assert lines(resumed)[0].startswith('{"tlpersona_responses"')
    a, b = open_store(whole, verify=True), open_store(resumed, verify=True)
    assert a.provenance == b.provenance
    for pos in a.positions:
        assert torch.equal(a.centroids(pos), b.centroids(pos))


def test_fused_refuses_saved_responses_of_another_prompt(loaded, hf_ref, tmp_path):
    """A saved response that records another prompt (a question reworded since) is refused
    before the store is created, as generation refuses it: never read teacher-forced under the
    new prompt."""
    from tlpersona.errors import TlpersonaError

    personas, questions = builtin_personas()[:1], builtin_questions()[:2]
    cfg = ExtractConfig(parse_positions("response_mean"), LAYERS, progress=False)
    out = tmp_path / "s"
    out.mkdir()
    head = response_header(loaded.info.identity, template_hash(loaded.tokenizer), "float32", 4)
    line = {"persona": personas[0].name, "prompt_index": 0, "question_id": questions[1].id,
            "response_ids": [400, 500], "finished": False, "prompt_sha": "0" * 20}
    (out / "responses.jsonl").write_text(json.dumps(head) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(TlpersonaError, match=f"question '{questions[1].id}' continues a "
                                             "different prompt"):
        fused_extract_to_store(hf_ref, loaded.tokenizer, loaded.info, cfg, FusedConfig(4, 2),
                               personas, questions, out, out / "responses.jsonl")
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl"]


def test_out_of_memory_while_pooling_retries_the_batch_from_where_it_began(loaded, hf_ref, tmp_path,
                                                                            monkeypatch):
    """An out-of-memory error after a batch has decoded (while its rows are pooled) halves the
    batch and decodes it again from the state it started in: a saved response the decoder does
    not reproduce is still read once, over its own tokens."""
    from tlpersona.runtime.decode import StaticGreedy

    personas, questions = builtin_personas()[:2], builtin_questions()[:3]
    cfg = ExtractConfig(parse_positions("last,response_mean,sys_end"), LAYERS, progress=False)
    planted = [int(t) for t in loaded.tokenizer("Arr, the sea!", add_special_tokens=False)["input_ids"]]
    planted.append(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    line = {"persona": personas[1].name, "prompt_index": 0, "question_id": questions[2].id,
            "response_ids": planted, "finished": True, "text": "Arr, the sea!"}
    head = response_header(loaded.info.identity, template_hash(loaded.tokenizer), "float32", 8)

    def run(out):
        out.mkdir()
        (out / "responses.jsonl").write_text(json.dumps(head) + "\n" + json.dumps(line) + "\n")
        return open_store(fused_extract_to_store(
            hf_ref, loaded.tokenizer, loaded.info, cfg, FusedConfig(8, 6), personas, questions,
            out, out / "responses.jsonl"), verify=True)

    whole = run(tmp_path / "whole")
    real = StaticGreedy.capture
    failed = []

    class OneFailure(list):
        def __getitem__(self, i):
            if not failed:
                failed.append(i)
                raise torch.OutOfMemoryError("simulated")
            return super().__getitem__(i)

    def capture(self, prompts, steer=None, shared=None):
        cap = real(self, prompts, steer, shared)
        cap.prefill = OneFailure(cap.prefill)
        return cap

    monkeypatch.setattr(StaticGreedy, "capture", capture)
    retried = run(tmp_path / "retried")
    assert failed
    assert read_responses(tmp_path / "retried" / "responses.jsonl") == \
        read_responses(tmp_path / "whole" / "responses.jsonl")
    # the planted response is read once over its own tokens, as without the failure
    assert retried.n_tokens("response_mean")[1, 2] == whole.n_tokens("response_mean")[1, 2] \
        == len(planted) - 1
    for pos in whole.positions:
        if whole.has_per_question(pos):
            x, y = whole.per_question(pos).float(), retried.per_question(pos).float()
            assert float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min()) >= 0.99999, pos

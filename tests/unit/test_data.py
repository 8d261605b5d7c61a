import json

import pytest
from factories import SHARED_DATA

from tlpersona.data import (
    builtin_personas,
    builtin_questions,
    indexed_prompts,
    load_assistant_axis_personas,
    load_questions_jsonl,
)
from tlpersona.errors import TlpersonaError


def test_builtin_set_is_varied():
    personas, questions = builtin_personas(), builtin_questions()
    assert len(personas) >= 24 and len(questions) >= 24
    assert all(len(p.system_prompts) >= 3 for p in personas)
    assert "assistant" in [p.name for p in personas]
    assert len({q.text for q in questions}) == len(questions)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared assistant-axis copy not present")
def test_assistant_axis_copy_loads():
    personas = load_assistant_axis_personas(SHARED_DATA)
    questions = load_questions_jsonl(SHARED_DATA / "extraction_questions.jsonl")
    assert len(personas) == 275 and len(questions) == 240
    assert personas[0].name == "assistant" and len(personas[0].system_prompts) == 5
    assert questions[0].id == "0"


def _write_dir(tmp_path, roles, files):
    (tmp_path / "instructions").mkdir()
    (tmp_path / "role_list.json").write_text(json.dumps(roles))
    for name, content in files.items():
        (tmp_path / "instructions" / f"{name}.json").write_text(content)
    return tmp_path


@pytest.mark.parametrize("files, message", [
    ({"a": json.dumps({"instruction": [{"pos": "Be A."}]})}, "role 'b' has no file"),
    ({"a": "{nope", "b": "{}"}, "invalid JSON"),
    ({"a": json.dumps({"instruction": [{"neg": "x"}]}), "b": "{}"}, "has no 'pos'"),
    ({"a": json.dumps({"instruction": [{"pos": " "}]}), "b": "{}"}, "empty system prompt"),
])
def test_bad_persona_dirs_name_the_offender(tmp_path, files, message):
    d = _write_dir(tmp_path, {"a": "A", "b": "B"}, files)
    with pytest.raises(TlpersonaError, match=message):
        load_assistant_axis_personas(d)


def test_duplicate_question_ids(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "x?", "id": 1}\n{"question": "y?", "id": 1}\n')
    with pytest.raises(TlpersonaError, match="duplicate question id '1'"):
        load_questions_jsonl(p)


def test_empty_question_file(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n")
    with pytest.raises(TlpersonaError, match="no questions"):
        load_questions_jsonl(p)


def test_prompt_index():
    p = builtin_personas()[0]
    assert indexed_prompts(p, 1) == [(1, p.system_prompts[1])]
    assert indexed_prompts(p, "all") == list(enumerate(p.system_prompts))
    with pytest.raises(TlpersonaError, match="out of range"):
        indexed_prompts(p, 9)

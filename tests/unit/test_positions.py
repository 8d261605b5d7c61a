import pytest

from tlpersona.chat.positions import RECIPES, canonical, parse_position, parse_positions
from tlpersona.errors import TlpersonaError


def test_aliases_map_to_canonical_names():
    assert canonical("c3") == "sys_end+1"
    assert canonical("A") == "last"
    assert canonical("B*") == "prompt_mean"
    assert canonical("bstar_no_last") == "prompt_mean_no_last"
    assert canonical("c1") == "raw_system_last"
    assert canonical("sys_end+0") == "sys_end"
    assert canonical("last-2") == "last-2"


def test_all6_expands_to_the_seven_recipes_once():
    names = [p.name for p in parse_positions("all6,last,c2")]
    assert names == list(RECIPES.values())
    assert len(names) == 7


def test_invariance_and_response_flags():
    assert parse_position("sys_end+1").question_invariant
    assert parse_position("raw_system_last").question_invariant
    assert not parse_position("last").question_invariant
    assert not parse_position("prompt_mean").question_invariant
    assert parse_position("response_mean").needs_response
    assert parse_position("resp_start+2").needs_response
    assert not parse_position("user_end").needs_response


@pytest.mark.parametrize("bad", ["sys_middle", "last+", "prompt_mean+1", "", "c9"])
def test_unknown_positions_raise(bad):
    with pytest.raises(TlpersonaError):
        parse_positions(bad)


def test_sink_positions_parse():
    assert canonical("bstar_no_first") == "prompt_mean_no_first"
    assert parse_position("first").question_invariant
    assert not parse_position("prompt_mean_no_first").question_invariant
    assert "first" not in [p.name for p in parse_positions("all6")]

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerolm.infer.stop import StopStrings, find_stop


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    """Feed all deltas; return (all emitted text including flush, stopped)."""
    ss = StopStrings(stops)
    out = []
    for d in deltas:
        text, stopped = ss.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(ss.flush())
    return "".join(out), False


def test_stop_split_across_deltas():
    ss = StopStrings(["STOP"])
    assert ss.feed("Hel") == ("Hel", False)
    assert ss.feed("lo ST") == ("lo ", False)  # "ST" held back: could start "STOP"
    assert ss.feed("OP more") == ("", True)
    assert ss.feed("anything") == ("", True)
    assert ss.flush() == ""


def test_overlapping_prefix():
    ss = StopStrings(["abcabd"])
    assert ss.feed("abcab") == ("", False)
    assert ss.feed("cabd") == ("abc", True)  # text "abcabcabd": stop starts at 3


def test_no_stop_flush_returns_remainder():
    ss = StopStrings(["STOP"])
    emitted = [ss.feed(d)[0] for d in ("a ST", "ORY S", "T")]
    assert emitted == ["a ", "STORY ", ""]
    assert ss.flush() == "ST"
    assert "".join(emitted) + "ST" == "a STORY ST"


def test_multiple_stops_earliest_wins():
    assert run(["world", "lo"], ["hello wor", "ld"]) == ("hel", True)
    assert run(["</s>", "\nUser:"], ["Sure.\nUs", "er: hi</s>"]) == ("Sure.", True)
    assert find_stop("hello world", ["world", "lo", "zz"]) == 3
    assert find_stop("hello", ["zz"]) is None


def test_first_completed_stop_wins_independent_of_chunking():
    assert find_stop("aca", ["c", "aca"]) == 1  # "c" completes first, although "aca" starts earlier
    assert find_stop("xab", ["b", "ab"]) == 1  # same end: the longer one
    for deltas in (["aca"], ["ac", "a"], ["a", "c", "a"]):
        assert run(["c", "aca"], deltas) == ("a", True)


def test_chinese_stop():
    assert run(["。\n\n"], ["你好", "。", "\n", "\n下一段"]) == ("你好", True)
    assert run(["。\n\n"], ["你好。\n", "世界"]) == ("你好。\n世界", False)


def test_empty_stop_rejected_and_no_stops_passthrough():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["ok", ""])
    assert run([], ["a", "b"]) == ("ab", False)


@given(
    text=st.text(alphabet="abc。\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc。\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_property_emitted_equals_prefix_before_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    i = find_stop(text, stops)
    assert run(stops, deltas) == ((text, False) if i is None else (text[:i], True))

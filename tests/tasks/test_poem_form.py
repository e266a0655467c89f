import json
import lzma
from collections import Counter

import pytest

from zerolm.data.sources import corpus_path
from zerolm.tasks.poems.form import FORMS, form_of, is_cjk, judge, lines, score

JUEJU5 = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
LUSHI7 = (
    "风急天高猿啸哀，渚清沙白鸟飞回。\n无边落木萧萧下，不尽长江滚滚来。\n"
    "万里悲秋常作客，百年多病独登台。\n艰难苦恨繁霜鬓，潦倒新停浊酒杯。"
)


def corpus_sample(n=2000):
    """~n poems spread evenly over the bundled Tang corpus (every k-th row)."""
    with lzma.open(corpus_path("tang"), "rt", encoding="utf-8") as f:
        rows = f.readlines()
    step = max(1, len(rows) // n)
    return [json.loads(r) for r in rows[::step][:n]]


def test_lines_splits_on_fullwidth_ascii_and_newlines():
    assert lines(JUEJU5) == ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]
    assert lines("床前明月光, 疑是地上霜. \n 举头望明月！低头思故乡？") == [
        "床前明月光",
        "疑是地上霜",
        "举头望明月",
        "低头思故乡",
    ]
    assert lines("春眠不觉晓；处处闻啼鸟、夜来风雨声;花落知多少!") == [
        "春眠不觉晓",
        "处处闻啼鸟",
        "夜来风雨声",
        "花落知多少",
    ]
    assert lines("  \u3000床前明月光\u3000，，\n\n。") == ["床前明月光"]
    assert lines("") == [] and lines("。\n，") == [] and lines(None) == []


def test_is_cjk():
    assert all(is_cjk(c) for c in "床前䜩𬬻")  # basic, extension A, extension E
    assert not any(is_cjk(c) for c in "a1，□○《 ")


def test_form_of_named_forms():
    assert form_of(JUEJU5) == {"lines": 4, "chars": 5, "name": "五言绝句"}
    assert form_of(LUSHI7) == {"lines": 8, "chars": 7, "name": "七言律诗"}
    assert form_of(
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    ) == {"lines": 8, "chars": 5, "name": "五言律诗"}
    assert (
        form_of("朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。")["name"]
        == "七言绝句"
    )
    assert set(FORMS) == {"五言绝句", "七言绝句", "五言律诗", "七言律诗"}


def test_form_of_other_regular_and_irregular():
    assert form_of("床前明月光，疑是地上霜。") == {"lines": 2, "chars": 5, "name": None}
    assert form_of((JUEJU5 + "\n") * 3) == {"lines": 12, "chars": 5, "name": None}  # 排律-like
    assert form_of("关关雎鸠，在河之洲。窈窕淑女，君子好逑。") == {
        "lines": 4,
        "chars": 4,
        "name": None,
    }
    assert form_of("床前明月光，疑是地上霜。\n举头望明月。") is None  # odd count
    assert form_of("床前明月光，疑是地上霜。\n举头望明月，低头思故乡啊。") is None  # mixed lengths
    assert form_of("床前明月光，疑是地上□。\n举头望明月，低头思故乡。") is None  # lost character
    assert form_of("床前明月a，疑是地上霜。\n举头望明月，低头思故乡。") is None
    assert form_of("天地玄黄宇宙洪荒日，月盈昃辰宿列张寒。") is None  # 9 characters
    assert form_of("") is None and form_of("。") is None


def test_judge_correct_forms():
    r = judge(JUEJU5, 4, 5)
    assert r == {
        "ok": True,
        "line_count": 4,
        "chars_per_line": [5, 5, 5, 5],
        "punct_ok": True,
        "reasons": [],
    }
    assert judge(LUSHI7, 8, 7)["ok"]
    assert judge(JUEJU5 + "\n", 4, 5)["ok"]
    assert not judge(JUEJU5, 4, 7)["ok"] and not judge(LUSHI7, 4, 7)["ok"]


def test_judge_wrong_line_count():
    r = judge("床前明月光，疑是地上霜。\n举头望明月。", 4, 5)
    assert not r["ok"] and r["line_count"] == 3 and r["punct_ok"]
    assert r["reasons"] == ["expected 4 lines, got 3"]


def test_judge_wrong_chars_in_one_line():
    r = judge("床前明月光，疑是地上霜。\n举头望明月，低头思故乡里。", 4, 5)
    assert not r["ok"] and r["chars_per_line"] == [5, 5, 5, 6]
    assert r["reasons"] == ["line 4 has 6 characters, expected 5"]


def test_judge_missing_final_punctuation():
    for text in (
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡",
        JUEJU5[:-1] + "，",
        JUEJU5[:-1] + ".",
    ):
        r = judge(text, 4, 5)
        assert not r["ok"] and not r["punct_ok"] and r["line_count"] == 4
        assert r["reasons"] == ["does not end with 。！？"]
    assert judge(JUEJU5[:-1] + "！", 4, 5)["ok"] and judge(JUEJU5[:-1] + "？", 4, 5)["ok"]


def test_judge_latin_digits_and_special_tokens():
    r = judge("床前明月光，疑是地上霜。\n举头望明a，低头思故乡。", 4, 5)
    assert not r["ok"] and r["chars_per_line"] == [5, 5, 5, 5]
    assert r["reasons"] == ["line 3 contains non-CJK characters 'a'"]
    assert not judge("床前明月光，疑是地上霜。\n举头望明月，低头思故3。", 4, 5)["ok"]
    assert not judge(JUEJU5 + "<|im_end|>", 4, 5)["ok"]
    assert not judge("Roses are red，violets are blue。", 2, 5)["ok"]


def test_judge_empty():
    for text in ("", "   ", "。", None):
        r = judge(text, 4, 5)
        assert not r["ok"] and r["line_count"] == 0 and r["chars_per_line"] == []
        assert r["reasons"] == ["no verse lines"]


def test_score():
    assert score(JUEJU5, 4, 5) == 1.0 and score(LUSHI7, 8, 7) == 1.0
    assert score("", 4, 5) == 0.0 and score("abc。", 4, 5) == 0.0
    assert score("床前明月光，疑是地上霜。\n举头望明月。", 4, 5) == pytest.approx(
        0.75
    )  # a line missing
    assert score("床前明月光，疑是地上霜。\n举头望明月，低头思故乡里。", 4, 5) == pytest.approx(
        0.75
    )  # one bad line
    assert score(JUEJU5[:-1], 4, 5) == pytest.approx(0.8)  # no final 。
    assert score(JUEJU5 + "\n" + JUEJU5, 4, 5) == pytest.approx(0.5)  # twice as long
    assert score(JUEJU5, 8, 5) == pytest.approx(0.5)
    assert score(JUEJU5, 4, 7) == 0.0
    with pytest.raises(ValueError):
        score(JUEJU5, 0, 5)


def test_score_is_one_exactly_when_judge_ok():
    texts = [
        JUEJU5,
        LUSHI7,
        JUEJU5[:-1],
        JUEJU5 + "x",
        "床前明月光，疑是地上霜。",
        JUEJU5 * 2,
        "",
        "a，b。",
    ]
    for text in texts:
        for shape in FORMS.values():
            s = score(text, *shape)
            assert 0.0 <= s <= 1.0
            assert (s == 1.0) == judge(text, *shape)["ok"]


def test_corpus_form_shares():
    docs = corpus_sample()
    assert len(docs) >= 1900
    shares = Counter()
    for d in docs:
        f = form_of(d["text"])
        shares["irregular" if f is None else f["name"] or "other regular"] += 1
        if (
            f is not None
        ):  # a regular poem passes judge for its own shape whenever it ends with 。！？
            r = judge(d["text"], f["lines"], f["chars"])
            assert r["ok"] == r["punct_ok"]
    share = {k: v / len(docs) for k, v in shares.items()}
    print({k: round(v, 3) for k, v in sorted(share.items())})
    # the whole corpus: 五律 25 %, 七绝 18 %, 七律 14 %, 五绝 7 %, other regular 20 %,
    # irregular 16 %
    assert 0.18 < share["五言律诗"] < 0.33
    assert 0.12 < share["七言绝句"] < 0.25
    assert 0.08 < share["七言律诗"] < 0.20
    assert 0.03 < share["五言绝句"] < 0.12
    assert 0.08 < share["irregular"] < 0.25
    assert 0.55 < sum(share[k] for k in FORMS) < 0.75

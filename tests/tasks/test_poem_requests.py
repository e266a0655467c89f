import json
import lzma
from collections import Counter

import pytest

from zerolm.data.sources import corpus_path
from zerolm.tasks.poems.form import FORMS, form_of, judge
from zerolm.tasks.poems.requests import (
    TEMPLATES,
    clean_author,
    clean_title,
    eval_requests,
    make_instruction,
    poem_instructions,
    split_opening,
)

JUEJU5 = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
LUSHI5 = (
    "秦川雄帝宅，函谷壮皇居。\n绮殿千寻起，离宫百雉余。\n"
    "连甍遥接汉，飞观迥凌虚。\n云日隐层阙，风烟出绮疏。"
)


@pytest.fixture(scope="module")
def corpus():
    """~2,000 poems spread evenly over the bundled Tang corpus (every k-th row)."""
    with lzma.open(corpus_path("tang"), "rt", encoding="utf-8") as f:
        rows = f.readlines()
    return [json.loads(r) for r in rows[:: len(rows) // 2000][:2000]]


def check_item(item):
    msgs = item["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] and msgs[1]["content"]
    assert item["kind"] in TEMPLATES and item["poem"] in FORMS
    form = item["form"]
    assert judge(msgs[1]["content"], form["lines"], form["chars"])["ok"], item
    if item["kind"] == "continue":
        assert form["name"] is None and form["lines"] == FORMS[item["poem"]][0] - 2
        assert item["poem"] in msgs[0]["content"]
    else:
        assert (form["lines"], form["chars"]) == FORMS[form["name"]] and form["name"] == item[
            "poem"
        ]
        assert form_of(msgs[1]["content"]) == form


def test_clean_title():
    assert clean_title("帝京篇十首 一") == "帝京篇"
    assert clean_title("秋兴八首 其一") == "秋兴"
    assert clean_title("杂曲歌辞 长干行") == "长干行"
    assert clean_title("骊山怀古（五首） 一") == "骊山怀古"
    assert (
        clean_title("静夜思") == "静夜思"
        and clean_title("九日") == "九日"
        and clean_title("柳") == "柳"
    )
    for bad in (
        "",
        None,
        "句",
        "句 三",
        "失题",
        "无题",
        "诗三百三首 五十六",
        "岳阳别张[祜]",
        "湘中纪行十首 云母溪",
        "和吏部李侍郎见示秋夜望月忆诸侍郎之什其卒章有前后行之戏",
    ):
        assert clean_title(bad) is None, bad


def test_clean_author():
    assert clean_author("李白") == "李白" and clean_author("太宗皇帝") == "太宗皇帝"
    for bad in ("", None, "无名氏", "不详", "杨□", "贺知章、源乾曜", "敦煌人作品[一]"):
        assert clean_author(bad) is None, bad


def test_split_opening():
    assert split_opening(LUSHI5) == ("秦川雄帝宅，函谷壮皇居。", LUSHI5.split("\n", 1)[1])
    assert split_opening("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。") == (
        "白日依山尽，黄河入海流。",
        "欲穷千里目，更上一层楼。",
    )
    assert (
        split_opening("白日依山尽，黄河入海流，欲穷千里目，更上一层楼。") is None
    )  # couplet ends with a comma
    assert split_opening("床前明月光，疑是地上霜。") is None  # nothing follows


def test_each_kind_by_hand():
    doc = {"text": LUSHI5, "title": "帝京篇十首 一", "author": "太宗皇帝"}
    seen = {}
    for seed in range(60):
        item = make_instruction(doc, seed)
        check_item(item)
        seen.setdefault(item["kind"], item)
    assert set(seen) == {"title", "author", "continue"}
    assert (
        "《帝京篇》" in seen["title"]["messages"][0]["content"]
        and "五言律诗" in seen["title"]["messages"][0]["content"]
    )
    assert seen["title"]["messages"][1]["content"] == LUSHI5
    assert "太宗皇帝" in seen["author"]["messages"][0]["content"]
    assert seen["author"]["form"] == {"lines": 8, "chars": 5, "name": "五言律诗"}
    cont = seen["continue"]
    assert "秦川雄帝宅，函谷壮皇居。" in cont["messages"][0]["content"]
    assert cont["messages"][1]["content"] == LUSHI5.split("\n", 1)[1]
    assert cont["form"] == {"lines": 6, "chars": 5, "name": None} and cont["poem"] == "五言律诗"


def test_kinds_follow_metadata_and_skip_irregular():
    kinds = {
        make_instruction({"text": JUEJU5, "title": "句", "author": "无名氏"}, s)["kind"]
        for s in range(20)
    }
    assert kinds == {"continue"}
    assert make_instruction({"text": JUEJU5}, 0)["kind"] == "continue"
    flat = (
        "白日依山尽，黄河入海流，欲穷千里目，更上一层楼。"  # no usable opening, no title, no author
    )
    assert make_instruction({"text": flat}, 0) is None
    assert make_instruction({"text": flat, "title": "登鹳雀楼"}, 0)["kind"] == "title"
    for text in (
        "床前明月光，疑是地上霜。",
        JUEJU5[:-1],
        JUEJU5 + "\n" + JUEJU5 + "\n" + JUEJU5,
        "",
        "关关雎鸠，在河之洲。",
    ):
        assert make_instruction({"text": text, "title": "静夜思", "author": "李白"}, 0) is None
    assert list(
        poem_instructions([{"text": "hello world"}, {"text": JUEJU5, "author": "李白"}])
    ) == [make_instruction({"text": JUEJU5, "author": "李白"})]


def test_corpus_instructions(corpus):
    items = list(poem_instructions(corpus, seed=0))
    n_forms = sum(1 for d in corpus if (f := form_of(d["text"])) and f["name"])
    assert 0.9 * n_forms <= len(items) <= n_forms
    for item in items:
        check_item(item)
    kinds = Counter(i["kind"] for i in items)
    print(
        len(corpus),
        "docs ->",
        len(items),
        "items",
        dict(kinds),
        dict(Counter(i["poem"] for i in items)),
    )
    assert set(kinds) == {"title", "author", "continue"} and min(kinds.values()) > 0.2 * len(items)
    templates = Counter(i["messages"][0]["content"][:4] for i in items)
    assert len(templates) > 9  # all wordings are used


def test_deterministic_and_seeded(corpus):
    docs = corpus[:600]
    a = list(poem_instructions(docs, seed=0))
    assert a == list(poem_instructions(docs, seed=0))
    assert a == list(poem_instructions(iter(docs)))  # default seed 0, any iterable
    b = list(poem_instructions(docs, seed=1))
    assert len(a) == len(b)  # same poems, other requests
    changed = sum(x != y for x, y in zip(a, b))
    assert changed > 0.3 * len(a)
    # per-document: the choice does not depend on the other documents or their order
    assert list(poem_instructions(docs[::-1], seed=0)) == a[::-1]


def test_eval_requests(corpus):
    corpus = corpus[:800]
    ev = eval_requests(corpus, seed=0, limit=50)
    assert len(ev) == 50
    assert ev == eval_requests(corpus[::-1], seed=0, limit=50)  # independent of input order
    assert ev != eval_requests(corpus, seed=1, limit=50)
    assert eval_requests(corpus, seed=0, limit=10) == ev[:10]
    all_items = {
        json.dumps(i, ensure_ascii=False, sort_keys=True) for i in poem_instructions(corpus)
    }
    assert all(json.dumps(i, ensure_ascii=False, sort_keys=True) in all_items for i in ev)
    for item in ev:
        check_item(item)
    assert len({i["kind"] for i in ev}) == 3
    assert eval_requests([], limit=5) == []

import json

import pytest

from zerolm.data.prefs import read_builtin_pairs, read_pairs


def write(tmp_path, rows):
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        )
    )
    return p


def test_both_forms_and_identical_pairs_skipped_and_counted(tmp_path):
    rows = [
        {
            "prompt": "写一首五言绝句",
            "chosen": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
            "rejected": "我不会。",
        },
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
            ],
            "chosen": {"role": "assistant", "content": "Hello!"},
            "rejected": "Go away.",
        },
        {"prompt": "same", "chosen": "x ", "rejected": "x"},
    ]
    pairs, skipped = read_pairs(write(tmp_path, rows))
    assert skipped == 1 and len(pairs) == 2
    assert (
        pairs[0].messages == ({"role": "user", "content": "写一首五言绝句"},)
        and pairs[0].rejected == "我不会。"
    )
    assert pairs[1].messages[0]["role"] == "system" and pairs[1].chosen == "Hello!"
    assert pairs[1].where.endswith("pairs.jsonl:2")


@pytest.mark.parametrize(
    "row, match",
    [
        ("{bad json", r"pairs.jsonl:2: invalid JSON"),
        ({"prompt": "p", "chosen": "a"}, r":2: expected .*got keys \['chosen', 'prompt'\]"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, r":2: 'rejected' is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, r":2: 'chosen' must be a string"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "chosen": "a",
                "rejected": "b",
            },
            r":2: 'messages' must end with a user message",
        ),
        ({"prompt": "p", "messages": [], "chosen": "a", "rejected": "b"}, r":2: expected"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, match):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=match):
        read_pairs(write(tmp_path, [good, row]))


def test_all_identical_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no usable preference pairs"):
        read_pairs(write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "a"}]))
    with pytest.raises(ValueError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")


def test_bundled_hhh_pairs():
    pairs = read_builtin_pairs("hhh")
    assert len(pairs) == 221
    by_source = {}
    for p in pairs:
        by_source[p.where.split(":")[1].split("-")[0]] = (
            by_source.get(p.where.split(":")[1].split("-")[0], 0) + 1
        )
    assert by_source == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    assert all(p.chosen != p.rejected and p.messages[-1]["role"] == "user" for p in pairs)
    with pytest.raises(ValueError, match="bundled: hhh"):
        read_builtin_pairs("nope")

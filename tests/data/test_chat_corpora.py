"""The bundled chat corpora: readable, well-formed, and as documented in their LICENSES.md."""

import re
from importlib import resources

import pytest

from zerolm.data.chat_corpora import CHAT_CORPORA, chat_corpus_path, read_chat_corpus

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def corpora():
    return {name: list(read_chat_corpus(name)) for name in CHAT_CORPORA}


def documented_counts() -> dict[str, tuple[int, int]]:
    """{file name: (conversations, messages)} from the '**Counts...:**' lines of LICENSES.md."""
    md = (resources.files("zerolm.data") / "chat" / "LICENSES.md").read_text(encoding="utf-8")
    counts = {}
    # "## `chitchat.jsonl.xz`: ..." then "- **Counts:** N conversations, M messages"
    for m in re.finditer(
        r"^## `([\w.]+)`.*?^- \*\*Counts:\*\* ([\d,]+) conversations, ([\d,]+) messages",
        md,
        re.M | re.S,
    ):
        counts[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    # "- **Counts (`chatterbot_en.jsonl.xz`):** N conversations, M messages"
    for m in re.finditer(
        r"\*\*Counts \(`([\w.]+)`\):\*\* ([\d,]+) conversations, ([\d,]+) messages", md
    ):
        counts[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    return counts


def test_counts_match_licenses_md(corpora):
    counts = documented_counts()
    assert set(counts) == {chat_corpus_path(n).name for n in CHAT_CORPORA}
    for name, convs in corpora.items():
        got = (len(convs), sum(len(c["messages"]) for c in convs))
        assert got == counts[chat_corpus_path(name).name], name


@pytest.mark.parametrize("name", list(CHAT_CORPORA))
def test_conversations_alternate_user_assistant(corpora, name):
    convs = corpora[name]
    assert convs, name
    ids = set()
    for c in convs:
        assert set(c) == {"messages", "source", "id"}
        msgs = c["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0, c["id"]
        for i, m in enumerate(msgs):
            assert set(m) == {"role", "content"}
            assert m["role"] == ("user" if i % 2 == 0 else "assistant"), c["id"]
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != "", c[
                "id"
            ]
        assert msgs[-1]["role"] == "assistant"
        prefix = "chitchat" if name == "chitchat" else name + "/"
        assert c["source"].startswith(prefix)
        ids.add(c["id"])
    assert len(ids) == len(convs)  # ids are unique within a corpus


def test_chinese_corpus_is_chinese(corpora):
    texts = [m["content"] for c in corpora["chatterbot-zh"] for m in c["messages"]]
    assert sum(bool(CJK.search(t)) for t in texts) > 0.9 * len(texts)
    assert not any(
        CJK.search(m["content"]) for c in corpora["chatterbot-en"][:200] for m in c["messages"]
    )


def test_unknown_name_lists_valid_ones():
    with pytest.raises(
        ValueError, match="unknown chat corpus 'nope'.*chitchat, chatterbot-en, chatterbot-zh"
    ):
        chat_corpus_path("nope")
    with pytest.raises(ValueError, match="chitchat"):
        next(read_chat_corpus("tang"))  # a pretraining corpus is not a chat corpus

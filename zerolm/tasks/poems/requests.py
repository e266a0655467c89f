"""Poem requests for chat fine-tuning and evaluation, derived from real poems only (no generated
text).

Every document (a dict with ``text`` and optionally ``title`` / ``author``, as in a run's
``docs/train.jsonl`` / ``docs/val.jsonl``) whose text is a regular 五言/七言 绝句/律诗 (see
`zerolm.tasks.poems.form.form_of` and `FORMS`; the text must also pass `judge` for that form, i.e.
end with 。！？) gives one chat example; every other document is skipped:

    {"messages": [{"role": "user", "content": request},
                  {"role": "assistant", "content": answer}],
     "kind": "title" | "author" | "continue",
     "form": {"lines": n, "chars": c, "name": name or None},   # what the answer must have
     "poem": "五言律诗"}                                          # the form of the whole poem

Request kinds (one per poem; which one, and which wording template, is a pure function of the seed
and a hash of the text - no global RNG, independent of the order of the documents):

* ``title`` - "以《{title}》为题写一首{form}" and two variants; only for a usable title (below).
  The answer is the poem text exactly as in the document; ``form`` is the poem's form.
* ``author`` - "写一首{author}风格的{form}" and two variants; only when the author is known: pure
  CJK, at most 6 characters, and not a placeholder such as 无名氏 / 不详 (`UNKNOWN_AUTHORS`).
* ``continue`` - the first two verse lines exactly as written (normally the first text line, e.g.
  "秦川雄帝宅，函谷壮皇居。") are given and the answer is the rest of the text (without that opening
  couplet and its line break). ``form`` describes the answer: ``lines`` = the poem's verse lines
  - 2, ``chars`` = c, ``name`` = None (2 or 6 lines are not a complete named form); the full
  poem's form is in ``poem``. The request names the form ("续写这首五言律诗：...") because
  without it the answer length (绝句 or 律诗) would be undetermined. Only when the opening
  couplet ends with 。！？ (so the answer starts at a sentence boundary).

Usable titles: the title is cleaned by dropping editors' notes in full-width parentheses
("骊山怀古（五首） 一", "……（题拟）"), a leading music-bureau category ("杂曲歌辞 长干行"
-> "长干行"), a trailing sequence number (" 一", " 其二", "其三") and then a trailing count of the
set ("帝京篇十首" -> "帝京篇"). The result must be 1-14 CJK characters (no spaces, brackets,
notes or lost-character marks) and not a generic non-title (`GENERIC_TITLES`: 句, 失题, 无题, 诗,
偈 ...). 无题 is excluded although some are famous, because "以《无题》为题" asks for nothing.

Where a poem qualifies for several kinds, the kind is chosen uniformly among them; every poem at
least qualifies for ``continue`` unless its opening couplet ends with a comma.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

from zerolm.tasks.poems.form import FINAL_PUNCT, FORMS, SEPARATORS, form_of, is_cjk_line, judge

KINDS = ("title", "author", "continue")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "title": (
        "以《{title}》为题写一首{form}",
        "请以《{title}》为题，写一首{form}。",
        "写一首{form}，题目是《{title}》。",
    ),
    "author": (
        "写一首{author}风格的{form}",
        "请模仿{author}的风格，写一首{form}。",
        "仿照{author}的诗风，作一首{form}。",
    ),
    "continue": (
        "续写这首{form}：{first}",
        "下面是一首{form}的开头两句，请续写完整：\n{first}",
        "{first}\n请续写这首{form}的其余诗句。",
    ),
}

GENERIC_TITLES = frozenset(
    {
        "句",
        "诗",
        "偈",
        "颂",
        "歌",
        "题",
        "又",
        "失题",
        "无题",
        "缺题",
        "阙题",
        "佚题",
        "逸题",
        "断句",
        "残句",
        "逸句",
        "佚句",
        "联句",
        "绝句",
        "五言",
        "七言",
        "五绝",
        "七绝",
        "杂言",
        "偈颂",
        "诗偈",
        "逸诗",
        "佚诗",
        "失调名",
        "古诗",
        "律诗",
    }
)
UNKNOWN_AUTHORS = frozenset(
    {"", "无名氏", "不详", "佚名", "失名", "缺名", "阙名", "无名", "未详", "无考"}
)
MAX_TITLE_CHARS = 14
MAX_AUTHOR_CHARS = 6

_NUM = "一二三四五六七八九十百千零〇两"
_NOTE = re.compile(r"（[^（）]*）")  # editors' notes: （题拟）, （五首）
_CATEGORY = re.compile(r"^\S*[歌曲]辞\s+")  # 杂曲歌辞 / 相和歌辞 / 横吹曲辞 ...
_SEQ_SUFFIX = re.compile(rf"(?:\s+其?|其)[{_NUM}]+$")  # " 一", " 其二", "其三"
_COUNT_SUFFIX = re.compile(rf"[{_NUM}]+首$")  # "十首", "二首"


def clean_title(title: str | None) -> str | None:
    """The title usable in a request, or None (see the module docstring)."""
    t = _NOTE.sub("", title or "").strip()
    t = _CATEGORY.sub("", t)
    t = _SEQ_SUFFIX.sub("", t)
    t = _COUNT_SUFFIX.sub("", t)
    if not t or len(t) > MAX_TITLE_CHARS or t in GENERIC_TITLES or not is_cjk_line(t):
        return None
    return t


def clean_author(author: str | None) -> str | None:
    """The author usable in a request, or None when unknown or not a plain name."""
    a = (author or "").strip()
    if a in UNKNOWN_AUTHORS or len(a) > MAX_AUTHOR_CHARS or not is_cjk_line(a):
        return None
    return a


def split_opening(text: str) -> tuple[str, str] | None:
    """(the first two verse lines with their punctuation as written, the rest of the text), or None
    when the opening couplet does not end with 。！？ or nothing follows it."""
    seen, i, n = 0, 0, len(text)
    while i < n and seen < 2:
        while i < n and (text[i] in SEPARATORS or text[i].isspace()):  # skip to the next verse line
            i += 1
        if i == n:
            break
        while i < n and text[i] not in SEPARATORS:  # the verse line itself
            i += 1
        seen += 1
        while i < n and text[i] in SEPARATORS and text[i] not in "\n\r":  # its closing punctuation
            i += 1
    head, rest = text[:i].strip(), text[i:].strip()
    if seen < 2 or not rest or not head or head[-1] not in FINAL_PUNCT:
        return None
    return head, rest


def _hash(seed: int, text: str, salt: str = "") -> int:
    data = f"{seed}\x00{salt}\x00{text}".encode()
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, person=b"zerolm-poems").digest(), "big"
    )


def make_instruction(doc: dict, seed: int = 0) -> dict | None:
    """The chat example for one document, or None when its text is not one of `FORMS`."""
    text = doc.get("text") or ""
    form = form_of(text)
    if (
        form is None
        or form["name"] not in FORMS
        or not judge(text, form["lines"], form["chars"])["ok"]
    ):
        return None
    name = form["name"]
    options: dict[str, dict] = {}
    if title := clean_title(doc.get("title")):
        options["title"] = {"title": title}
    if author := clean_author(doc.get("author")):
        options["author"] = {"author": author}
    if opening := split_opening(text):
        options["continue"] = {"first": opening[0], "rest": opening[1]}
    if not options:
        return None
    h = _hash(seed, text)
    kinds = [k for k in KINDS if k in options]
    kind = kinds[h % len(kinds)]
    templates = TEMPLATES[kind]
    request = templates[(h >> 20) % len(templates)].format(form=name, **options[kind])
    if kind == "continue":
        answer = options[kind]["rest"]
        answer_form = {"lines": form["lines"] - 2, "chars": form["chars"], "name": None}
    else:
        answer, answer_form = text, dict(form)
    return {
        "messages": [
            {"role": "user", "content": request},
            {"role": "assistant", "content": answer},
        ],
        "kind": kind,
        "form": answer_form,
        "poem": name,
    }


def poem_instructions(docs: Iterable[dict], seed: int = 0) -> Iterator[dict]:
    """One chat example per qualifying document, in document order (see the module docstring)."""
    for doc in docs:
        if (item := make_instruction(doc, seed)) is not None:
            yield item


def eval_requests(docs: Iterable[dict], seed: int = 0, limit: int = 200) -> list[dict]:
    """Held-out examples for measuring form adherence: the items of `poem_instructions` for `docs`
    (normally docs/val.jsonl), ordered by a seeded hash of the poem text (so the sample does not
    depend on file order) and cut to the first `limit`. The prompt is ``messages[0]``, the
    reference answer ``messages[1]`` and the form to judge against ``form``."""
    keyed = []
    for doc in docs:
        if (item := make_instruction(doc, seed)) is not None:
            keyed.append((_hash(seed, doc["text"], "eval"), item))
    keyed.sort(key=lambda kv: kv[0])
    return [item for _, item in keyed[:limit]]

"""The PPO stage's prompts: poem requests, the bundled pair sets' conversations and align.data
rows, split into train and held-out."""

from __future__ import annotations

from zerolm.data.prefs import BUILTIN_PAIRS, read_builtin_pairs, read_prompts
from zerolm.data.split import split_by_hash
from zerolm.tasks import TASKS
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import prompt_ids


def _conversation(row: dict) -> str:
    """The text a prompt row is split by (its messages, as the pairs' hash includes them)."""
    return str(row["messages"])


def load_prompts(cfg, tok: Tokenizer, window: int) -> tuple[list[dict], list[dict], dict]:  # noqa: C901 (one branch per prompt source)
    """(train, val) prompts: poem requests (align.builtin=poems: the run's training / held-out
    documents), the conversations of the other bundled pair sets, and align.data rows (split by
    a hash, as the pairs are). Prompts leaving under 8 tokens of room to reply are dropped."""

    a = cfg.align
    if not a.data and not a.builtin:
        raise ValueError(
            "no prompts: give --align.builtin=poems and/or --align.data=FILE.jsonl (rows with "
            "'prompt')"
        )
    train: list[dict] = []
    val: list[dict] = []
    counts: dict[str, int] = {}
    for name in a.builtin:
        if name in TASKS:
            for split, out in (("train", train), ("val", val)):
                got = [
                    {"messages": q["messages"][:-1], "form": q["form"], "kind": q["kind"]}
                    for q in TASKS[name].requests(cfg, split)
                ]
                out += got
                counts[f"{name} ({split})"] = len(got)
        elif name in BUILTIN_PAIRS:
            rows = [
                {"messages": list(p.messages), "where": p.where} for p in read_builtin_pairs(name)
            ]
            rows = list({_conversation(r): r for r in rows}.values())  # one per conversation
            t, v = split_by_hash(rows, _conversation, a.val_fraction)
            train += t
            val += v
            counts[name] = len(rows)
        else:
            raise ValueError(
                f"unknown prompt set {name!r}; bundled: poems, {', '.join(BUILTIN_PAIRS)}"
            )
    for path in a.data:
        rows = read_prompts(path)
        t, v = split_by_hash(rows, _conversation, a.val_fraction)
        train += t
        val += v
        counts[str(path)] = len(rows)

    def fits(p):
        try:
            return len(prompt_ids(tok, p["messages"])) <= window - 8
        except ValueError as e:  # e.g. a role its chat template refuses: name the row
            raise ValueError(f"{p.get('where', 'a prompt')}: {e}") from None

    n = len(train) + len(val)
    train, val = [p for p in train if fits(p)], [p for p in val if fits(p)]
    if dropped := n - len(train) - len(val):
        counts["too long (dropped)"] = dropped
    if not train:
        raise ValueError(f"no training prompts fit the {window}-token window with room to reply")
    if a.reward == "poem-form" and (bad := next((p for p in train + val if "form" not in p), None)):
        raise ValueError(
            f"align.reward='poem-form' scores poem requests, but {bad.get('where', 'a prompt')} is "
            "not one: use --align.builtin=poems alone, or another reward (a reward model, "
            "module:function)"
        )
    return train, val, counts

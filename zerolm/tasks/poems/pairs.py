"""Poem preference pairs from the bundled Tang corpus, judged by the rule-based form judge.

For each poem request (zerolm/tasks/poems/requests.py: title / author / continuation, in a named
form) the model under training samples `samples` answers. Then:

- *reference* pairs: every sample the judge (zerolm/tasks/poems/form.py) fails becomes
  rejected, with the real poem as chosen;
- *ranked* pairs: two samples with different partial-credit scores (`score`: line count,
  characters per line, final punctuation) become chosen (higher) and rejected (lower).

A sample that passes and ties with the other gives no pair. Held-out pairs come from the run's
held-out documents, so a reward model is measured on poems it never saw.
"""

from __future__ import annotations

from collections import Counter

from zerolm.data.prefs import Preference
from zerolm.dist import group
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.model.protocol import LanguageModel
from zerolm.tasks.poems.form import judge, score


def poem_pairs(
    model: LanguageModel,
    tok,
    items: list[dict],
    *,
    samples: int = 2,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 32,
) -> tuple[list[Preference], dict]:
    """(pairs, counts) for the request items (as made by requests.poem_instructions). Under
    torchrun each rank samples every world-size-th batch and all of them get every answer: the
    pairs of one process, in 1/N of its time (each batch is seeded on its own)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    req = chat_request(tok, max_new_tokens, SamplingParams(temperature=temperature), seed)
    asks = [it["messages"][:-1] for it in items for _ in range(samples)]
    starts = range(0, len(asks), batch_size)
    rank, world = group.rank(), group.world_size()
    ours = {i: replies(model, tok, asks[i : i + batch_size], req) for i in starts[rank::world]}
    done = {i: got for part in group.all_gather(ours) for i, got in part.items()}
    answers = [a for i in starts for a in done[i]]
    pairs: list[Preference] = []
    counts: Counter[str] = Counter()
    for j, it in enumerate(items):
        msgs, real, form = tuple(it["messages"][:-1]), it["messages"][-1]["content"], it["form"]
        mine = answers[j * samples : (j + 1) * samples]
        graded = [(score(a, form["lines"], form["chars"]), a) for a in mine]
        for a in mine:
            counts["samples"] += 1
            if not judge(a, form["lines"], form["chars"])["ok"]:
                counts["failed"] += 1
                if a.strip() != real.strip():
                    pairs.append(Preference(msgs, real, a, "poems:reference"))
                    counts["reference"] += 1
        graded.sort(key=lambda g: g[0], reverse=True)
        (hi, best), (lo, worst) = graded[0], graded[-1]
        if hi > lo and best.strip() != worst.strip():
            pairs.append(Preference(msgs, best, worst, "poems:ranked"))
            counts["ranked"] += 1
    return pairs, dict(counts)

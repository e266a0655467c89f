"""BERT pretraining data: masking statistics, sentence splitting, NSP pairs, resumable batches."""

import dataclasses

import numpy as np
import pytest
import torch

from zerolm.data.mlm import IGNORE, BertIds, collate_pairs, mask_tokens, pair_ids
from zerolm.data.mlm_batches import PairBatches, fixed_batches
from zerolm.data.nsp import SentenceCorpus, make_pairs, split_sentences

V = 1000
# zerolm's own layout (test_bert_ids_by_role checks it against a tokenizer): 16 specials first
IDS = BertIds(pad=0, cls=8, sep=9, mask=10, special=frozenset(range(16)), vocab_size=V)
N_SPECIAL = len(IDS.special)
PAD_ID, CLS_ID, SEP_ID, MASK_ID = IDS.pad, IDS.cls, IDS.sep, IDS.mask
# a BERT vocabulary's: specials where bert-base puts them ([PAD] 0, [UNK] 100, [CLS] 101, ...)
# and one far up
FOREIGN = BertIds(
    pad=0, cls=101, sep=102, mask=103, special=frozenset({0, 100, 101, 102, 103, 700}), vocab_size=V
)


def test_masking_statistics_on_a_large_sample():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(N_SPECIAL, V, (400, 500), generator=gen)
    ids[:, 0], ids[:, 250] = CLS_ID, SEP_ID  # specials inside the rows
    ids[:, 450:] = PAD_ID  # padding
    maskable = (ids >= N_SPECIAL) & (ids != PAD_ID)
    inputs, labels = mask_tokens(ids, maskable, IDS, generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE
    assert not selected[~maskable].any()  # specials and padding are never selected ...
    assert torch.equal(inputs[~maskable], ids[~maskable])  # ... nor changed
    assert torch.equal(inputs[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    n = int(maskable.sum())  # 400 * 448 = 179,200: sd of the share ~0.0008
    assert abs(selected.sum().item() / n - 0.15) < 0.004
    s = int(selected.sum())
    to_mask = (inputs[selected] == MASK_ID).sum().item() / s
    changed = ((inputs[selected] != MASK_ID) & (inputs[selected] != ids[selected])).sum().item() / s
    kept = (inputs[selected] == ids[selected]).sum().item() / s
    assert abs(to_mask - 0.8) < 0.01 and abs(changed - 0.1) < 0.008 and abs(kept - 0.1) < 0.008
    randoms = inputs[selected & (inputs != MASK_ID) & (inputs != ids)]
    assert (
        randoms.min() >= N_SPECIAL and randoms.max() < V
    )  # random replacements are never special tokens
    assert len(randoms.unique()) > 0.9 * (V - N_SPECIAL)  # and spread over the vocabulary
    again = mask_tokens(ids, maskable, IDS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(
        again[1], labels
    )  # the generator decides everything


def test_sentence_splitting_zh_and_en():
    assert split_sentences("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。") == [
        "床前明月光，疑是地上霜。",
        "举头望明月，低头思故乡。",
    ]
    assert split_sentences("他说：“归去！”又问：何时？答曰；明日") == [
        "他说：“归去！”",
        "又问：何时？",
        "答曰；",
        "明日",
    ]
    assert split_sentences('To be, or not to be. That is the question!  Is it? "Yes." Fine') == [
        "To be, or not to be.",
        "That is the question!",
        "Is it?",
        '"Yes."',
        "Fine",
    ]
    assert split_sentences("line one\n\nline two\n") == ["line one", "line two"]
    assert split_sentences("  \n ") == []


def _corpus(sentence_lens: list[list[int]]) -> SentenceCorpus:
    """Documents of sentences with the given token counts; every token id is unique (its corpus
    position + N_SPECIAL), so a pair's tokens say where they came from."""
    flat = [n for doc in sentence_lens for n in doc]
    tokens = np.arange(sum(flat), dtype=np.int32) + N_SPECIAL
    return SentenceCorpus(
        tokens,
        np.concatenate([[0], np.cumsum(flat)]),
        np.concatenate([[0], np.cumsum([len(d) for d in sentence_lens])]),
    )


def _docs(n_docs: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 15, size=rng.integers(1, 9))) for _ in range(n_docs)]


def test_nsp_pairs_real_next_random_other_and_lengths():
    docs = _docs(2000)
    corpus = _corpus(docs)
    doc_of = np.repeat(np.arange(len(docs)), [sum(d) for d in docs])  # token position -> document
    max_len = 40
    pairs = make_pairs(corpus, max_len, np.random.default_rng(0))
    labels = np.array([p[2] for p in pairs])
    assert len(pairs) > 2000 and abs(labels.mean() - 0.5) < 0.03  # a fair coin
    for a, b, label in pairs:
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= max_len - 3
        pa, pb = a - N_SPECIAL, b - N_SPECIAL
        assert (np.diff(pa) == 1).all() and (np.diff(pb) == 1).all()  # contiguous spans of text
        assert len(set(doc_of[pa])) == 1 and len(set(doc_of[pb])) == 1
        if label == 0:  # B is what really follows A (truncation keeps the boundary)
            assert pb[0] == pa[-1] + 1 and doc_of[pb[0]] == doc_of[pa[0]]
        else:  # B comes from another document
            assert doc_of[pb[0]] != doc_of[pa[0]]
    singles = {i for i, d in enumerate(docs) if len(d) == 1}  # no real next span: never an A
    assert singles and not any(doc_of[a[0] - N_SPECIAL] in singles for a, _, _ in pairs)
    no_nsp = make_pairs(corpus, max_len, np.random.default_rng(0), nsp=False)
    assert all(p[2] == 0 for p in no_nsp)


def test_pair_layout_segments_and_padding():
    ids, seg = pair_ids([20, 21, 22], [30, 31], IDS)
    assert ids == [CLS_ID, 20, 21, 22, SEP_ID, 30, 31, SEP_ID] and seg == [0, 0, 0, 0, 0, 1, 1, 1]
    pairs = [(np.array([20, 21, 22]), np.array([30, 31]), 0), (np.array([40]), np.array([50]), 1)]
    inputs, segments, att, labels, nsp = collate_pairs(
        pairs, IDS, generator=torch.Generator().manual_seed(0), prob=0.5
    )
    assert inputs.shape == (2, 8) and nsp.tolist() == [0, 1]
    assert att.tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert segments[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert inputs[1, 5:].tolist() == [PAD_ID] * 3
    specials = (inputs == CLS_ID) | (inputs == SEP_ID) | (att == 0)
    assert (labels[specials] == IGNORE).all()


def _equal(b1, b2):
    return all(torch.equal(x, y) for x, y in zip(b1, b2))


def test_batches_deterministic_and_resume_exact_across_epochs():
    corpus = _corpus(_docs(60, seed=1))

    def make(seed=7):
        return PairBatches(corpus, batch_size=8, max_seq_len=32, bert_ids=IDS, seed=seed)

    it = make()
    n_pairs, per_epoch = it.epoch_size()
    assert per_epoch == n_pairs // 8 and per_epoch >= 3
    first = [next(it) for _ in range(per_epoch + 2)]  # into the second epoch
    state = it.state_dict()
    rest = [next(it) for _ in range(per_epoch)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(_equal(a, b) for a, b in zip(rest, [next(resumed) for _ in range(per_epoch)]))
    fresh = make()
    assert all(_equal(a, next(fresh)) for a in first)  # deterministic given the seed
    assert not _equal(first[0], next(make(seed=8)))
    epoch0 = torch.cat([b[4] for b in first[:per_epoch]])
    assert len(epoch0) == 8 * per_epoch
    for ids, _, att, _, _ in first:
        assert ids.shape[1] <= 32 and ids.shape[1] % 8 == 0 and (att.sum(1) >= 5).all()


def test_fixed_batches_and_errors():
    corpus = _corpus(_docs(50, seed=2))
    a = fixed_batches(corpus, batch_size=4, max_seq_len=32, bert_ids=IDS, seed=3)
    b = fixed_batches(corpus, batch_size=4, max_seq_len=32, bert_ids=IDS, seed=3, limit=2)
    assert len(b) == 2 and all(_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="documents need at least two sentences"):
        PairBatches(_corpus([[5]] * 30), batch_size=4, max_seq_len=32, bert_ids=IDS)
    with pytest.raises(ValueError, match="at least 2 documents"):
        make_pairs(_corpus([[5, 5]]), 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no room for a sentence pair"):
        make_pairs(corpus, 4, np.random.default_rng(0))


def test_sentence_corpus_from_texts_with_a_wordpiece_tokenizer(tiny_tokenizer):
    texts = [
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
        "白日依山尽。",
        "<|pad|>[MASK] 春眠不觉晓！处处闻啼鸟。",
    ]
    tok = tiny_tokenizer("wordpiece", texts, vocab_size=200)
    corpus = SentenceCorpus.from_texts(texts, tok)
    assert corpus.n_docs == 3 and [len(corpus.doc(d)) for d in range(3)] == [2, 1, 2]
    assert tok.decode(corpus.doc(0)[1].tolist()).replace(" ", "") == "举头望明月，低头思故乡。"
    assert (
        MASK_ID not in corpus.tokens and PAD_ID not in corpus.tokens
    )  # text spelling a special token stays text


def test_length_batches_cover_each_epoch_with_little_padding_and_resume():
    from zerolm.data.mlm_batches import LengthBatches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 1000)
    it = LengthBatches(list(range(1000)), lengths, batch_size=10, seed=3, bucket=8)
    epoch = [next(it) for _ in range(100)]
    assert sorted(i for b in epoch for i in b) == list(range(1000))  # every item once per epoch
    spread = np.mean([np.ptp(lengths[b]) for b in epoch])
    assert spread < 15  # sorted within windows of 80 rows: similar lengths in a batch (random: ~85)
    state = it.state_dict()
    rest = [next(it) for _ in range(30)]
    again = LengthBatches(list(range(1000)), lengths, batch_size=10, seed=3, bucket=8)
    again.load_state_dict(state)
    assert [next(again) for _ in range(30)] == rest and rest[0] != epoch[0]
    with pytest.raises(ValueError, match="fewer than one batch"):
        LengthBatches([1, 2], [1, 1], batch_size=4)


def test_bert_ids_by_role(tiny_tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from zerolm.tokenizer import Tokenizer

    tok = tiny_tokenizer("wordpiece")  # zerolm's own: the reserved ids
    assert BertIds.of(tok) == dataclasses.replace(IDS, vocab_size=tok.vocab_size)
    vocab = ["a", "b", "[UNK]", "c", "[MASK]", "[PAD]", "d", "[SEP]", "[CLS]", "e"]
    hf = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    foreign = BertIds.of(Tokenizer.load(tmp_path))  # a BERT vocabulary: found by name
    assert (foreign.pad, foreign.cls, foreign.sep, foreign.mask) == (5, 8, 7, 4)
    assert foreign.special == {2, 4, 5, 7, 8} and foreign.normal.tolist() == [0, 1, 3, 6, 9]


def test_masking_a_foreign_layout_never_touches_or_draws_its_specials():
    gen = np.random.default_rng(0)
    normal = FOREIGN.normal.numpy()
    assert len(normal) == V - 6 and not set(normal.tolist()) & FOREIGN.special
    text = [np.concatenate([gen.choice(normal, 60), [100, 700]]) for _ in range(1000)]  # [UNK] too
    pairs = [(a, b, 0) for a, b in zip(text[::2], text[1::2])]
    inputs, _, att, labels, _ = collate_pairs(
        pairs, FOREIGN, generator=torch.Generator().manual_seed(0), prob=1.0
    )
    ids, _ = pair_ids(pairs[0][0], pairs[0][1], FOREIGN)
    assert ids[0] == 101 and ids[63] == 102 and ids[-1] == 102
    special, first = torch.isin(torch.tensor(ids), FOREIGN.special_tensor), labels[0, : len(ids)]
    assert (first[special] == IGNORE).all() and (first[~special] != IGNORE).all()
    assert (labels[att == 0] == IGNORE).all()  # padding (id 0, [PAD]) is never selected
    selected = labels != IGNORE
    randoms = inputs[selected & (inputs != FOREIGN.mask) & (inputs != labels)]
    assert not set(randoms.tolist()) & FOREIGN.special  # replacements are never special tokens
    assert len(randoms.unique()) > 0.95 * len(normal)  # and drawn across the normal ids
    assert abs(float((inputs[selected] == 103).float().mean()) - 0.8) < 0.03

import hashlib

import torch

from zerolm.data.collate import IGNORE, length_mask, pad_right
from zerolm.data.split import split_by_hash, split_key


def test_split_by_hash_keeps_order_and_holds_out_by_the_key():
    items = [{"text": f"document {i}"} for i in range(400)]
    train, val = split_by_hash(items, lambda d: d["text"], 0.25)
    assert sorted(map(id, train + val)) == sorted(map(id, items))
    assert train == [d for d in items if split_key(d["text"]) >= 0.25]
    assert val == [d for d in items if split_key(d["text"]) < 0.25]  # in input order
    assert 60 < len(val) < 140
    again = split_by_hash(reversed(items), lambda d: d["text"], 0.25)  # order-independent
    assert sorted(d["text"] for d in again[1]) == sorted(d["text"] for d in val)


def test_split_key_unsalted_is_the_plain_blake2b():
    h = hashlib.blake2b(b"a verse", digest_size=8).digest()  # the seq2seq pairs' split
    assert split_key("a verse", person=b"") == int.from_bytes(h, "big") / 2**64
    assert split_key("a verse") != split_key("a verse", person=b"")


def test_pad_right_and_length_mask():
    seqs = [[5, 6, 7], [8], []]
    ids = pad_right(seqs, value=IGNORE)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, IGNORE, IGNORE], [IGNORE] * 3]
    assert pad_right(seqs, 4, length=5).tolist()[1] == [8, 4, 4, 4, 4]
    assert length_mask(seqs).tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert length_mask(seqs, 4).shape == (3, 4)

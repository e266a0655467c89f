import json

import pytest
import torch
import torch.nn.functional as F

from zerolm.data.sft import SFTBatches, encode_conversations, fill_rate, pack, read_conversations

TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Hello there! How are you today? I am fine, thanks.",
] * 20


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer("bpe", TEXT, vocab_size=400)


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


CONVS = [
    conv("写诗", "床前明月光，疑是地上霜。"),
    conv("Hello there!", "Hi.", "How are you?", "I am fine, thanks."),
    conv("举头", "望明月"),
    conv("How are you today?", "Fine."),
]


def test_reads_both_forms_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"messages": CONVS[0]}, ensure_ascii=False)
        + "\n\n"
        + json.dumps({"instruction": "Say hi", "input": "to Ann", "output": "Hi Ann."})
        + "\n"
    )
    convs = read_conversations(good)
    assert convs[0] == CONVS[0]
    assert convs[1] == conv("Say hi\n\nto Ann", "Hi Ann.")
    for line, err in [
        ("{not json", "invalid JSON"),
        ('{"text": "x"}', "expected"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": CONVS[2]}, ensure_ascii=False) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{err}"):
            read_conversations(bad)


def test_too_long_is_cut_at_a_turn_boundary_or_skipped(tok):
    ids, mask = encode_conversations(tok, [CONVS[1]], 10_000)[0][0]
    first_answer_end = len(encode_conversations(tok, [CONVS[1][:2]], 10_000)[0][0][0])
    examples, stats = encode_conversations(tok, [CONVS[1]], len(ids) - 2)
    assert (
        stats["truncated"] == 1 and examples[0][0] == ids[:first_answer_end]
    )  # second exchange dropped whole
    assert examples[0][1] == mask[:first_answer_end]
    examples, stats = encode_conversations(tok, [CONVS[1]], first_answer_end - 2)
    assert examples == [] and stats["skipped_too_long"] == 1


@pytest.mark.parametrize("preset", ["llama", "gpt2", "simple"])
def test_packed_rows_give_each_conversation_its_own_loss(tok, preset, tiny_model):
    model = tiny_model(preset, tok.vocab_size, dropout=0.0).eval()
    examples, _ = encode_conversations(tok, CONVS, 64)
    rows = pack(examples, range(len(examples)), 64, packing=True)
    assert len(rows) < len(examples)  # several conversations share a row
    x, y, mask, pos, seg = torch.stack(rows, 1)
    packed = F.cross_entropy(
        model(x, positions=pos, segments=seg).flatten(0, 1), y.flatten(), reduction="none"
    )
    packed = packed.view(y.shape)
    for r in range(len(rows)):
        for s in range(int(seg[r].max()) + 1):
            span = seg[r] == s
            ids = x[r][span][None]  # the conversation alone, from position 0
            alone = F.cross_entropy(model(ids)[0], y[r][span], reduction="none")
            torch.testing.assert_close(packed[r][span], alone, atol=1e-5, rtol=1e-5)
    n_masked = sum(sum(m[1:]) for _, m in examples)
    assert int(mask.sum()) == n_masked  # every assistant token counted once, padding never


def test_batches_cover_every_conversation_and_resume_exactly(tok):
    examples, _ = encode_conversations(tok, CONVS * 8, 32)  # more than 4 full batches of rows
    it = SFTBatches(examples, batch_size=3, seq_len=32, seed=1)
    first = [next(it) for _ in range(4)]
    state = it.state_dict()
    more = [next(it) for _ in range(5)]
    again = SFTBatches(examples, batch_size=3, seq_len=32, seed=1)
    again.load_state_dict(state)
    for a, b in zip(more, [next(again) for _ in range(5)]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    epoch = SFTBatches(examples, batch_size=1000, seq_len=32, seed=1)
    x, _, _, pos, seg = next(epoch)
    assert int((pos == 0).logical_and(seg >= 0).sum()) == len(
        examples
    )  # each conversation once per epoch
    assert x.shape[1] == 32 and all(b[0].shape == (3, 32) for b in first)
    assert fill_rate(examples, 32, True) > fill_rate(examples, 32, False)


def test_invalid_utf8_names_file_and_line_with_a_fix_that_applies(tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_bytes(
        json.dumps({"messages": CONVS[2]}).encode() + b'\n{"instruction": "\xc3(", "output": "x"}\n'
    )
    with pytest.raises(
        ValueError,
        match=r"chat.jsonl: invalid UTF-8 at byte offset \d+ \(line 2\); convert the file "
        r"to UTF-8$",
    ):  # no --data.encoding_errors: SFT data does not read it
        read_conversations(bad)


def test_every_conversation_too_long_is_a_clear_error_not_a_division_by_zero():
    assert fill_rate([], 64, True) == 0.0
    with pytest.raises(
        ValueError, match=r"every first answer is longer than the window \(64 tokens\).*max_seq_len"
    ):
        SFTBatches([], batch_size=2, seq_len=64)

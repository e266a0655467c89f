"""`zerolm sft` on an imported HF model: its own tokenizer and chat template give the loss mask,
packing and truncation; bad conversations fail with file:line before anything is written; the
merged model loads in transformers with the same logits."""

import json
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from zerolm.cli import main
from zerolm.config import load_config
from zerolm.data.sft import encode_conversations, pack
from zerolm.finetune.sft import located_sources, sft_eval
from zerolm.interop.hf import export_hf, import_hf
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.transforms.lora import load_adapters

ARCHS = ("llama", "qwen2")


def msgs(*turns, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": r, "content": c} for r, c in zip(("user", "assistant") * 9, turns)]


CONVS = [
    msgs("What colour does Ann like?", "Ann likes red."),
    msgs("Hi!", "Hello.", "How are you?", "Fine, thanks.", system="You answer briefly."),
    msgs("写一句诗", "床前明月光。"),
    msgs("2 + 2?", "4"),
]


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, hf_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"imported-{request.param}") / "model"
    import_hf(hf_decoder(request.param), out)
    return out


def with_template(model_dir, tmp_path, template: str):
    """A copy of the imported model whose chat template is `template`."""
    out = tmp_path / "templated"
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def chatml(header: str = "", system: str = "", assistant: str = "") -> str:
    """ChatML (SmolLM2's, without its default system prompt), with hooks to break it."""
    turn = "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    return (
        header + "{% for m in messages %}" + system + (assistant or turn) + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def test_only_assistant_tokens_carry_loss_by_hand(model_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.load(model_dir)
    end = tok.token_str(tok.turn_end)
    assert end == "<|im_end|>" and tok.template is not None
    hf = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_conversations(tok, CONVS, 256)
    for conv, (ids, mask) in zip(CONVS, examples):
        assert ids == hf.apply_chat_template(conv, tokenize=True)["input_ids"]
        want = "".join(m["content"] + end for m in conv if m["role"] == "assistant")
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == want
        text = tok.decode(ids)  # the template text: the default system prompt where none is given
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
    # packed rows: the labels (y where the mask is 1) of each segment are its assistant turns
    rows = pack(examples, range(len(examples)), 256, packing=True)
    assert len(rows) < len(examples)
    found = []
    for x, y, mask, pos, seg in rows:
        for s in range(int(seg.max()) + 1):
            span = seg == s
            assert pos[span][0] == 0 and x[span][0] == examples[len(found)][0][0]
            found.append(tok.decode(y[span][mask[span] == 1].tolist()))
    assert found == [
        "".join(m["content"] + end for m in c if m["role"] == "assistant") for c in CONVS
    ]


def test_packed_rows_give_each_conversation_its_own_loss(model_dir):
    tok, model = Tokenizer.load(model_dir), load_model(model_dir)
    examples, _ = encode_conversations(tok, CONVS, 256)
    x, y, _, pos, seg = torch.stack(pack(examples, range(len(examples)), 256, True), 1)
    with torch.no_grad():
        packed = F.cross_entropy(
            model(x, positions=pos, segments=seg).flatten(0, 1), y.flatten(), reduction="none"
        ).view(y.shape)
        for r in range(len(x)):
            for s in range(int(seg[r].max()) + 1):
                span = seg[r] == s
                alone = F.cross_entropy(model(x[r][span][None])[0], y[r][span], reduction="none")
                torch.testing.assert_close(packed[r][span], alone, atol=1e-4, rtol=1e-4)


def test_truncation_cuts_at_a_turn_boundary_or_skips_where_the_template_has_none(
    model_dir, tmp_path
):
    tok = Tokenizer.load(model_dir)
    conv = CONVS[1]
    full, mask, ends = tok.template.render(conv)
    examples, stats = encode_conversations(tok, [conv], len(full) - 2)
    assert stats["truncated"] == 1
    ids, cut_mask = examples[0]
    assert ids == full[: ends[2]] and cut_mask == mask[: ends[2]]  # after the first answer
    assert tok.decode(ids).endswith("Hello.<|im_end|>\n")
    # a prefix-unstable template with {% generation %} blocks: no boundary to cut at (-1)
    gen = (
        "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    )
    header = "{{ 'turns: ' + messages|length|string + '\\n' }}"
    odd = Tokenizer.load(with_template(model_dir, tmp_path, chatml(header, assistant=gen)))
    ids, mask, ends = odd.template.render(conv)
    assert ends[:-1] == [-1] * (len(conv) - 1)
    assert (
        odd.decode([i for i, m in zip(ids, mask) if m]) == "Hello.<|im_end|>Fine, thanks.<|im_end|>"
    )
    examples, stats = encode_conversations(odd, [conv], len(ids) - 2)
    assert examples == [] and stats["skipped_too_long"] == 1


def _data(path, n: int = 120, seed: int = 0):
    rng = random.Random(seed)
    names, colours = ["Ann", "Bob", "Cai", "Dee", "Eve", "Fay"], ["red", "blue", "green", "gold"]
    with open(path, "w") as f:
        for i in range(n):
            who, what = rng.choice(names), rng.choice(colours)
            turns = [f"What colour does {who} like?", f"{who} likes {what}."]
            system = "You answer briefly." if i % 3 == 0 else None
            f.write(json.dumps({"messages": msgs(*turns, system=system)}) + "\n")
    return path


@pytest.mark.parametrize(
    "template, error",
    [
        (
            chatml(
                system="{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
            ),
            r"my\.jsonl:1: the chat template of .* cannot render this conversation \(roles: "
            r"system, user, assistant\): System role not supported; change the conversation",
        ),
        (
            chatml("{{ 'turns: ' + messages|length|string + '\\n' }}"),
            r"my\.jsonl:1: cannot find assistant turn 2 in the chat template of .*: its rendering "
            r"is not a token prefix .* add them around the assistant content",
        ),
    ],
    ids=["role-refused", "prefix-unstable"],
)
def test_a_conversation_the_template_refuses_names_file_line_and_writes_nothing(
    model_dir, tmp_path, capsys, template, error
):
    base = with_template(model_dir, tmp_path, template)
    data = _data(tmp_path / "my.jsonl", n=6)
    out = tmp_path / "out"
    assert main(["sft", "--model", str(base), "--sft.data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("zerolm: error: ") and len(err.splitlines()) == 1
    assert re.search(error, err), err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 8])
def test_sft_lowers_held_out_loss_and_the_merged_model_loads_in_transformers(
    model_dir, tmp_path, capsys, rank
):
    from transformers import AutoModelForCausalLM

    data, out = _data(tmp_path / "my.jsonl"), tmp_path / "out"
    args = ["sft", "--model", str(model_dir), "--sft.data", str(data), "--out", str(out)]
    keys = dict(steps=16, batch_size=2, lr=3e-3 if rank == 0 else 2e-2, warmup_steps=0)
    keys |= dict(eval_every=0, precision="fp32", log_every=4, ckpt_every=0)
    args += [f"--train.{k}={v}" for k, v in keys.items()]
    args += ["--sft.val_fraction=0.2", "--sft.max_seq_len=128", f"--lora.rank={rank}"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = load_config(
        None, {"sft": {"base_model": str(model_dir), "data": [str(data)], "val_fraction": 0.2}}
    )
    tok = Tokenizer.load(model_dir)
    _, val, _ = located_sources(cfg)
    val_ex, _ = encode_conversations(tok, [c for _, c in val], 128)
    before = sft_eval(load_model(model_dir), val_ex, seq_len=128)["val_loss"]
    tuned = load_model(out / "model")
    after = sft_eval(tuned, val_ex, seq_len=128)["val_loss"]
    assert tuned.cfg.max_seq_len == 256  # the packed rows were 128 long; the model keeps its own
    print(f"rank {rank}: held-out SFT loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.3
    assert (out / "adapters.safetensors").is_file() == (rank > 0)
    if rank:  # the adapters know their tokenizer: another one is refused
        with pytest.raises(ValueError, match="trained with another tokenizer"):
            load_adapters(load_model(model_dir), out / "adapters.safetensors", "0" * 64)
    hf_dir = export_hf(tuned, tmp_path / "hf", Tokenizer.load(out / "model"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([val_ex[0][0]])
    with torch.no_grad():
        diff = (hf(ids).logits - tuned(ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_pretraining_shards_of_another_tokenizer_are_refused(
    model_dir, tiny_corpus, tmp_path, capsys
):
    data, out = _data(tmp_path / "my.jsonl", n=6), tmp_path / "out"
    mix = ["--sft.pt_weight=0.1", f"--sft.pt_shards={tiny_corpus / 'run' / 'shards'}"]
    args = ["sft", "--model", str(model_dir), "--sft.data", str(data), "--out", str(out), *mix]
    assert main(args) == 2
    assert "hold another tokenizer's ids than the base model" in capsys.readouterr().err
    assert not out.exists()

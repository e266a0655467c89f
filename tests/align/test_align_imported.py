"""`zerolm reward`, `dpo` and `ppo` on an imported HF model, through its own chat template: the
reply spans end at the template's end of turn, the stages run on user preference JSONL, and a
model with another tokenizer or a row the template refuses is a one-line error that writes
nothing."""

import json
import re
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer

from zerolm.align.dpo import encode_dpo_pair
from zerolm.align.reward import HEAD_FILE, encode_pair
from zerolm.cli import main
from zerolm.data.prefs import Preference
from zerolm.eval.replies import response_batch
from zerolm.interop.hf import import_hf
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import prompt_ids

ARCHS = ("llama", "qwen2")
NAMES, COLOURS = ["Ann", "Bob", "Cai", "Dee", "Eve", "Fay"], ["red", "blue", "green", "gold"]

REWARD = '''
def score(prompt, reply):
    """Likes replies that name a colour, and short ones."""
    return float(any(c in reply for c in ("red", "blue", "green", "gold"))) - len(reply) / 200
'''


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, hf_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"imported-{request.param}") / "model"
    import_hf(hf_decoder(request.param), out)
    return out


def prefs(path, n: int = 24, bad_line: str | None = None):
    with open(path, "w") as f:
        for i in range(n):
            who, what = NAMES[i % 6], COLOURS[i % 4]
            row = {"chosen": f"{who} likes {what}.", "rejected": "No idea, sorry."}
            question = f"What colour does {who} like?"
            if i % 2:
                row["prompt"] = question
            else:
                system = {"role": "system", "content": "You answer briefly."}
                row["messages"] = [system, {"role": "user", "content": question}]
            f.write(json.dumps(row) + "\n")
        if bad_line:
            f.write(bad_line + "\n")
    return path


def test_reply_spans_end_at_the_templates_end_of_turn(model_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.load(model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir)
    pair = Preference(({"role": "user", "content": "Hi"},), "Hello.", "Go away.")
    chosen, rejected = encode_pair(tok, pair, 256)
    for ids, reply in ((chosen, pair.chosen), (rejected, pair.rejected)):
        conv = [*pair.messages, {"role": "assistant", "content": reply}]
        full = hf.apply_chat_template(conv, tokenize=True)["input_ids"]
        # the reward head reads <|im_end|>, not the newline ChatML puts after it
        assert ids == full[: len(ids)] and ids[-1] == tok.turn_end
        assert tok.decode(full[len(ids) :]) == "\n"
    c, r, start = encode_dpo_pair(tok, pair, 256)
    assert c[:start] == r[:start] == prompt_ids(tok, pair.messages)
    _, y, mask = response_batch([c, r], [start, start])
    assert tok.decode(y[0][mask[0] == 1].tolist()) == "Hello.<|im_end|>"
    assert tok.decode(y[1][mask[1] == 1].tolist()) == "Go away.<|im_end|>"
    assert encode_pair(tok, pair, len(chosen) - 1) is None  # does not fit: skipped and counted


def _other_tokenizer(model_dir, tmp_path):
    """A copy of the model whose tokenizer has one more token."""
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    hf = HFTokenizer.from_file(str(other / "tokenizer.json"))
    hf.add_tokens(["<|extra|>"])
    hf.save(str(other / "tokenizer.json"))
    return other


@pytest.mark.parametrize("stage", ["dpo", "ppo", "ppo-reward-model", "role-refused"])
def test_another_tokenizer_or_a_refused_row_is_one_line_and_writes_nothing(
    model_dir, tmp_path, capsys, stage
):
    data, out = prefs(tmp_path / "prefs.jsonl", 6), tmp_path / "out"
    base = ["--model", str(model_dir), "--align.data", str(data), "--out", str(out)]
    other = str(_other_tokenizer(model_dir, tmp_path))
    args, error = {
        "dpo": (["dpo", *base, "--align.reference", other], "the reference model .* different"),
        "ppo": (
            ["ppo", *base, "--align.reference", other, "--align.reward", "x.py:f"],
            "the reference model .* different tokenizer",
        ),
        "ppo-reward-model": (
            ["ppo", *base, "--align.reward", other],
            "the reward model .* different tokenizer .* use a reward model fine-tuned from",
        ),
        "role-refused": (["dpo", *base], ""),
    }[stage]
    if stage == "role-refused":  # a template without a system role; line 6 has one
        strict = tmp_path / "strict"
        shutil.copytree(model_dir, strict)
        template = (strict / "chat_template.jinja").read_text()
        refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
        (strict / "chat_template.jinja").write_text(refuse + "{% endif %}" + template)
        args[args.index(str(model_dir))] = str(strict)
        rows = data.read_text().splitlines()
        data.write_text("\n".join([r for r in rows if '"prompt"' in r] + rows[:1] * 3) + "\n")
        error = r"prefs\.jsonl:4: the chat template .* cannot render .*: no system; change"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zerolm: error: ") and re.search(error, err[-1]), err[-1]
    assert not out.exists()


@pytest.mark.slow
def test_reward_dpo_and_ppo_run_on_the_imported_model(model_dir, tmp_path, capsys):
    data = prefs(tmp_path / "prefs.jsonl")
    (tmp_path / "rewards.py").write_text(REWARD)
    common = ["--model", str(model_dir), "--align.data", str(data), "--align.val_fraction=0.25"]
    train = ["--train.batch_size=2", "--train.warmup_steps=0", "--train.precision=fp32"]
    train += ["--train.eval_every=0", "--train.ckpt_every=0", "--train.log_every=2"]
    runs = {
        "reward": ["--train.steps=6", "--train.lr=1e-3"],
        "dpo": ["--train.steps=6", "--train.lr=1e-3", "--lora.rank=8"],
        "ppo": [
            "--train.steps=4",
            "--train.lr=1e-4",
            f"--align.reward={tmp_path / 'rewards.py'}:score",
            "--align.rollout_prompts=4",
            "--align.max_new_tokens=12",
            "--align.ppo_epochs=1",
        ],
    }
    printed = {}
    for stage, extra in runs.items():
        out = tmp_path / stage
        assert main([stage, *common, "--out", str(out), *train, *extra]) == 0, capsys.readouterr()
        printed[stage] = capsys.readouterr().out
        print(printed[stage])
        tok = Tokenizer.load(out / "model")
        assert tok.template is not None and tok.sha256 == Tokenizer.load(model_dir).sha256
        load_model(out / "model")
    assert (tmp_path / "reward" / "model" / HEAD_FILE).is_file()
    assert (tmp_path / "dpo" / "adapters.safetensors").is_file()
    accuracy = re.search(r"held-out pairwise accuracy ([\d.]+)%", printed["reward"])
    assert accuracy and float(accuracy[1]) > 50  # the head starts at 0: every pair a tie
    margin = re.search(r"accuracy ([\d.]+)%, margin (-?[\d.]+)", printed["dpo"])
    assert margin and float(margin[1]) > 50 and float(margin[2]) > 0
    assert re.search(r"\d+ rollouts \(0 skipped\): mean reward", printed["ppo"])

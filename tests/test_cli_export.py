"""`zerolm export --format hf` (and the failures of `zerolm import`): transformers loads what it
writes, with the model's tokenizer, chat template and special-token ids, and a failed command
leaves no partial directory."""

import json

import pytest
import torch

from zerolm.cli import main
from zerolm.interop.hf import import_hf
from zerolm.model import save_model
from zerolm.tokenizer.chat import prompt_ids

transformers = pytest.importorskip("transformers")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "How are you today?"},
    {"role": "user", "content": "床前明月光"},
]


def _ids(hf_tok, messages) -> list[int]:
    return list(
        hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_an_imported_model_exports_back_as_transformers_had_it(hf_decoder, tmp_path, capsys):
    src = hf_decoder("llama")
    import_hf(src, tmp_path / "z")
    assert (
        main(["export", str(tmp_path / "z"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    )
    line = capsys.readouterr().out
    assert "as LlamaForCausalLM" in line and "(bos 1, eos 2, pad 2)" in line
    assert "chat template included" in line
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, orig(ids).logits, atol=1e-5)
    tok_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok_orig = transformers.AutoTokenizer.from_pretrained(src)
    assert _ids(tok_back, CHAT) == _ids(tok_orig, CHAT)
    assert tok_back.chat_template == tok_orig.chat_template
    gen_back = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    gen_orig = transformers.GenerationConfig.from_pretrained(src)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(gen_back, k) == getattr(gen_orig, k)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_a_zerolm_model_exports_with_zerolm_s_template_and_ids(
    tiny_model, tiny_tokenizer, tmp_path
):
    tok = tiny_tokenizer()
    save_model(tiny_model("llama", vocab_size=tok.vocab_size), tmp_path / "z", tok)
    assert main(["export", "--model", str(tmp_path / "z"), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert _ids(hf_tok, CHAT) == prompt_ids(tok, CHAT)  # zerolm's own format, rendered by HF
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == list(tok.stop_ids)  # generate stops at <|end|>, as zerolm chat
    assert tok.turn_end in gen.eos_token_id and tok.eos_id in gen.eos_token_id
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == tok.vocab_size


def test_a_failed_export_leaves_no_directory_and_never_replaces_user_files(
    tiny_model, tiny_tokenizer, tmp_path, capsys
):
    tok = tiny_tokenizer()
    post = tiny_model("simple", vocab_size=tok.vocab_size)  # post-norm: no HF architecture
    save_model(post, tmp_path / "post", tok)
    assert main(["export", str(tmp_path / "post"), "--out", str(tmp_path / "a" / "hf")]) == 2
    assert "cannot export" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # not even the parent it would have made
    save_model(tiny_model("llama", vocab_size=tok.vocab_size), tmp_path / "z", tok)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "z"), "--out", str(tmp_path / "mine")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_failed_import_leaves_no_output(hf_decoder, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_decoder("llama").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for name in ("tokenizer_config.json", "generation_config.json"):  # every eos role
        config = json.loads((src / name).read_text())
        for key in ("eos_token", "eos_token_id"):
            config.pop(key, None)
        (src / name).write_text(json.dumps(config))
    hf_config = json.loads((src / "config.json").read_text())
    hf_config.pop("eos_token_id", None)
    (src / "config.json").write_text(json.dumps(hf_config))
    capsys.readouterr()  # what building the fixture printed (transformers' progress bars)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no eos token" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
    assert main(["import", str(src), "--out", str(src)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err

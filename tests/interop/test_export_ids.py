"""An HF export writes the special ids its tokenizer has by role (a foreign vocabulary puts them
anywhere), and none when exported without a tokenizer: never zerolm's numbers."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from zerolm.interop.hf import export_hf
from zerolm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _foreign(path, specials: list[str], config: dict, model=models.WordLevel) -> Tokenizer:
    """A foreign tokenizer directory whose special tokens (the first one: unk) sit between
    ordinary words, ids 3.., with `config` as its tokenizer_config.json."""
    vocab = [*WORDS[:3], *specials, *WORDS[3:]]
    hf = HFTokenizer(model({t: i for i, t in enumerate(vocab)}, unk_token=specials[0]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.load(path)


ROLES = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
DECODER = (list(ROLES.values()), ROLES)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_decoder_export_writes_the_tokenizers_role_ids(preset, tmp_path, tiny_model):
    tok = _foreign(tmp_path / "tok", *DECODER)
    assert tok.layout == "hf" and (tok.pad_id, tok.bos_id, tok.eos_id) == (6, 4, 5)
    model = tiny_model(preset, tok.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (6, 4, 5)
    export_hf(model, tmp_path / "bare")
    raw = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert [raw[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")] == [None] * 3


def test_marian_export_writes_the_tokenizers_role_ids(tmp_path, tiny_model):
    tok = _foreign(tmp_path / "tok", *DECODER)
    model = tiny_model("transformer", tok.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    ids = (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.decoder_start_token_id)
    assert ids == (6, 4, 5, 4)  # the decoder starts from bos, as zerolm's seq2seq does
    with pytest.raises(ValueError, match="export an encdec model with its tokenizer"):
        export_hf(model, tmp_path / "bare")  # Marian's config must name the decoder start
    assert not (tmp_path / "bare").exists()


def test_bert_export_writes_the_vocabularys_pad_id(tmp_path, tiny_model):
    names = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = _foreign(tmp_path / "tok", names, {}, model=models.WordPiece)
    assert tok.layout == "bert" and tok.pad_id == 6 and (tok.cls_id, tok.sep_id) == (4, 5)
    assert tok.mask_id == 7
    model = tiny_model("bert", tok.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == 6
    export_hf(model, tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["pad_token_id"] is None

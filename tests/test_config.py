import dataclasses

import pytest

from zerolm.config import (
    RECIPES,
    Config,
    DataConfig,
    load_config,
    parse_overrides,
    recipe_path,
    save_config,
)


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.val_fraction == 0.05 and cfg.tokenizer.kind == "bpe"


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    recipe = write(
        tmp_path,
        'seed = 7\n[data]\nval_fraction = 0.2\nmin_chars = 9\n[tokenizer]\nkind = "char"\n',
    )
    cfg = load_config(
        recipe,
        parse_overrides(["--data.val_fraction=0.3", "--tokenizer.vocab_size", "500"]),
        base={"data": {"min_chars": 3, "max_chars": 77}},
    )
    assert cfg.seed == 7  # toml over default
    assert cfg.data.val_fraction == 0.3  # cli over toml
    assert cfg.data.min_chars == 9  # toml over command default
    assert cfg.data.max_chars == 77  # command default over config default
    assert cfg.tokenizer.kind == "char" and cfg.tokenizer.vocab_size == 500
    assert cfg.data.shingle_chars == DataConfig().shingle_chars


def test_types_are_converted():
    cfg = load_config(
        None,
        parse_overrides(
            [
                "--data.corpus=tang,shakespeare",
                "--tokenizer.lowercase=true",
                "--data.shard_tokens=1e6",
            ]
        ),
    )
    assert cfg.data.corpus == ("tang", "shakespeare")
    assert cfg.tokenizer.lowercase is True
    assert cfg.data.shard_tokens == 1_000_000 and isinstance(cfg.data.shard_tokens, int)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.val_fration=0.1"], "Did you mean 'val_fraction'"),
        (
            ["--dat.val_fraction=0.1"],
            "Valid keys here: align, calib, classify, data, dist, inspect, lora, mlm, model, "
            "out_dir, poems, prune, quant, sample, seed, seq2seq, serve, sft, tokenizer, train, "
            "translate",
        ),
        (["--data.min_chars=abc"], "data.min_chars: expected int"),
        (["--tokenizer.kind=sentencepiece"], "not one of 'bpe', 'wordpiece', 'char'"),
        (["--tokenizer.lowercase=maybe"], "expected true or false"),
        (["--data.val_fraction=1.5"], "val_fraction must be in [0, 1)"),
        (["--data=3"], "data: is a section"),
        (["--dist.strategy=zero"], "not one of '', 'none', 'ddp', 'fsdp'"),
        (["--dist.timeout=0"], "dist.timeout must be > 0"),
    ],
)
def test_bad_keys_and_values(args, message):
    with pytest.raises(ValueError) as e:
        load_config(None, parse_overrides(args))
    assert message in str(e.value)


def test_unknown_key_in_toml_is_an_error(tmp_path):
    recipe = write(tmp_path, "[tokenizer]\nvocab = 10\n")
    with pytest.raises(ValueError, match="unknown config key 'tokenizer.vocab'.*vocab_size"):
        load_config(recipe)


def test_missing_or_invalid_toml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(write(tmp_path, "seed = = 3"))


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--seed"])
    with pytest.raises(ValueError, match="overrides look like"):
        parse_overrides(["seed=3"])


def test_config_is_frozen_and_keyword_only():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    with pytest.raises(TypeError):
        DataConfig(("a.txt",))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        None,
        parse_overrides(
            [
                "--data.corpus=tang",
                '--data.inputs=a b.txt,c"q".jsonl',
                "--out_dir=x",
                "--data.near_threshold=0.75",
            ]
        ),
    )
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg


def test_bundled_recipes_load():
    recipes = sorted(RECIPES.glob("*.toml"))
    assert recipes, "zerolm/recipes/ is empty"
    for r in recipes:
        load_config(r)


def test_recipe_by_name_or_path(tmp_path, monkeypatch):
    assert recipe_path("speedrun") == recipe_path("speedrun.toml") == RECIPES / "speedrun.toml"
    assert load_config("speedrun") == load_config(RECIPES / "speedrun.toml")
    own = write(tmp_path, "seed = 5\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("r.toml").seed == 5  # a file here wins over a bundled name
    with pytest.raises(ValueError, match="does not exist; give a TOML path or a bundled recipe"):
        load_config("speedrunn")
    with pytest.raises(ValueError, match="does not exist"):  # a path is never a name
        load_config(own.parent / "speedrun.toml")

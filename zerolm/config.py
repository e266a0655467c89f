"""One frozen, keyword-only dataclass tree for every zerolm run.

Precedence: CLI (`--data.val_fraction=0.1`) > TOML recipe (`--config x.toml`, or a bundled one by
name: `--config speedrun`) > defaults.
Unknown keys and ill-typed values raise ValueError naming the valid keys or the expected type.
Each stage receives only its own sub-config (`cfg.data`, `cfg.tokenizer`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zerolm.files import atomic_write_text


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where text comes from and how it is cleaned, filtered, de-duplicated and split."""

    inputs: tuple[str, ...] = ()  # .txt/.jsonl/.parquet files or directories of them
    corpus: tuple[str, ...] = ()  # bundled corpora by name: tang, shakespeare
    text_field: str = "text"  # field holding the text in .jsonl/.parquet rows
    txt_unit: Literal["file", "paragraph", "line"] = "file"  # what one document is in a .txt file
    encoding_errors: Literal["strict", "replace"] = "strict"  # undecodable bytes: error, or U+FFFD
    min_chars: int = 1
    max_chars: int = 0  # 0: no upper limit
    min_letter_frac: float = 0.0  # drop documents whose share of letters/digits is below this
    dedup: Literal["none", "exact", "near"] = "near"  # near = exact + MinHash near-duplicates
    near_threshold: float = (
        0.8  # estimated Jaccard similarity of shingles at which a doc is a duplicate
    )
    shingle_chars: int = 5
    num_perm: int = 128
    val_fraction: float = 0.05  # by document hash: deterministic and order-independent
    shard_tokens: int = 100_000_000  # tokens per shard file (documents are never split)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """Which tokenizer to train, or an existing one to use (`path`)."""

    kind: Literal["bpe", "wordpiece", "char"] = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    lowercase: bool = False  # wordpiece only (uncased BERT)
    path: str = ""  # an existing tokenizer.json (or its directory): skip training


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture. `arch` picks the model class (decoder-only, BERT encoder, encoder-decoder) and
    `preset` the block choices; any field left at its "" / "preset" / None / 0 value takes the
    preset's choice (zerolm/model/presets.py), anything set explicitly overrides it."""

    arch: Literal["", "decoder", "bert", "encdec"] = (
        ""  # "": the preset's (bert -> bert, transformer -> encdec)
    )
    preset: Literal["", "simple", "gpt2", "llama", "bert", "transformer"] = (
        ""  # "": the arch's (llama, bert, transformer)
    )
    vocab_size: int = 0  # 0: the tokenizer's
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: n_heads (no grouped-query attention)
    d_ff: int = (
        0  # 0: 4*d_model (relu/gelu) or ~8/3*d_model rounded up to a multiple of 32 (swiglu)
    )
    max_seq_len: int = 256
    norm: Literal["preset", "layernorm", "rmsnorm"] = "preset"
    norm_placement: Literal["preset", "pre", "post"] = "preset"
    position: Literal["preset", "learned", "sinusoidal", "rope"] = "preset"
    ffn: Literal["preset", "relu", "gelu", "gelu_erf", "swiglu"] = (
        "preset"  # gelu: tanh approximation (GPT-2); gelu_erf: exact (BERT)
    )
    bias: bool | None = None  # biases in linear layers and norms
    tie_embeddings: bool | None = None  # output head shares the token embedding
    dropout: float | None = None
    norm_eps: float | None = None
    rope_theta: float = 10000.0
    sliding_window: int = 0  # 0: full causal attention; w: each token sees the last w positions
    embed_norm: bool | None = None  # a norm right after the embeddings (BERT)
    embed_scale: bool | None = (
        None  # token embeddings times sqrt(d_model) (the original Transformer)
    )
    type_vocab_size: int = 2  # bert: segment (sentence A/B) embeddings
    n_decoder_layers: int = 0  # encdec: decoder blocks (0: n_layers); n_layers counts the encoder's
    n_labels: int = 0  # bert: classes of the sequence-classification head (0: no such head)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The one training loop's settings (every stage: pretrain, sft, reward, dpo, ppo)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1  # on matrices only; norms, biases and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where measured faster
    compile: bool = False
    eval_every: int = 100  # 0: only after the last step (likewise ckpt_every, log_every)
    eval_batches: int = 20
    sample_every: int = 0  # 0: at every evaluation
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    resume_changed: bool = (
        False  # resume even if the data, tokenizer, model or settings changed (recorded)
    )
    threads: int = 0  # torch intra-op threads; 0: torch's default
    # a NaN/inf loss or grad norm: skip the update, stop at once, or reload the last checkpoint at a
    # lower lr
    nonfinite: Literal["skip", "stop", "rollback"] = "skip"
    nonfinite_limit: int = (
        5  # skip: consecutive bad steps before stopping; rollback: rollbacks before stopping
    )
    nonfinite_lr_factor: float = 0.5  # rollback: lr multiplier per rollback


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning (`zerolm sft`): which base model, which conversations."""

    base_model: str = ""  # a zerolm model directory (e.g. runs/speedrun/model)
    data: tuple[
        str, ...
    ] = ()  # JSONL files: {"messages": [...]} or {"instruction", "input", "output"}
    builtin: tuple[str, ...] = ()  # bundled sets: poems, chitchat, chatterbot-en, chatterbot-zh
    max_per_source: int = 0  # cap on conversations taken from each builtin set (0: all)
    val_fraction: float = 0.05  # held-out share of each source (poems: the docs' own val split)
    packing: bool = True  # several conversations per row (attention kept within each)
    pt_weight: float = 0.0  # lambda in L = L_sft + lambda * L_pretrain (0: off)
    pt_shards: str = ""  # token shards for L_pretrain; "": next to base_model


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters (zerolm/transforms/lora.py); rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (
        "q",
        "k",
        "v",
        "o",
    )  # module names: q k v o (attention), up gate down (FFN), lm_head


@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    """Learning from preferences: `zerolm reward`, `zerolm dpo`, `zerolm ppo`."""

    base_model: str = (
        ""  # the SFT model: the reward model's starting point, DPO's policy and reference
    )
    data: tuple[
        str, ...
    ] = ()  # preference JSONL files: {"prompt" or "messages", "chosen", "rejected"}
    builtin: tuple[
        str, ...
    ] = ()  # bundled: poems (pairs made here with the form judge), hhh (221 human pairs)
    val_fraction: float = 0.1  # held-out share of the files and of hhh
    reference: str = (
        ""  # the frozen reference of DPO and PPO's KL; "": base_model (must share its tokenizer)
    )
    # DPO (`zerolm dpo`)
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    reference_logprobs: Literal["cached", "live"] = (
        "cached"  # computed once before training, or at every step
    )
    # PPO / GRPO (`zerolm ppo`)
    # a reward model directory, "poem-form" (the form judge's score), or module:function
    reward: str = "poem-form"
    advantage: Literal["gae", "group"] = (
        "gae"  # PPO with a value head, or GRPO's group-relative (no critic)
    )
    rollout_prompts: int = 32  # prompts per rollout (each sampled `group` times)
    group: int = 1  # samples per prompt (GRPO needs >= 2)
    max_new_tokens: int = 96  # rollout reply length limit
    temperature: float = 1.0  # rollout sampling temperature
    ppo_epochs: int = 2  # passes over each rollout (in minibatches of train.batch_size)
    kl_coef: float = 0.05  # per-token KL penalty to the reference, in the reward
    target_kl: float = (
        0.05  # stop a rollout's epochs once a minibatch's approximate KL exceeds it (0: never)
    )
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip (around the rollout's values)
    value_coef: float = 0.5  # weight of the value loss
    gamma: float = 1.0
    # GAE lambda (1: Monte-Carlo returns minus the value baseline; measured better than 0.95 here)
    lam: float = 1.0


@dataclass(frozen=True, kw_only=True)
class PoemsConfig:
    """The Tang-poem task (zerolm/tasks/poems/): `--sft.builtin=poems`, `--align.builtin=poems`,
    `--align.reward=poem-form`."""

    docs: str = ""  # prepared docs/ (train.jsonl, val.jsonl); "": next to the stage's base_model
    requests: int = 512  # align: training poem requests (to sample answers for, or to prompt)
    val_requests: int = 128  # align: held-out poem requests (from the docs' val split)
    samples: int = 2  # align pairs: sampled answers per poem request


@dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig:
    """Sequence-to-sequence pairs for an encdec model (`zerolm pretrain --model.arch=encdec`)."""

    builtin: str = ""  # bundled pairs: bible (King James -> World English Bible, 31,099 verses)
    data: tuple[str, ...] = ()  # JSONL files of {source_field, target_field} rows
    source: str = ""  # or two line-aligned text files: one source per line ...
    target: str = ""  # ... and its target on the same line
    source_field: str = "source"
    target_field: str = "target"
    val_books: tuple[str, ...] = (
        "Ruth",
        "Jonah",
        "Mark",
        "Philippians",
        "James",
    )  # bible: held out by book
    val_fraction: float = 0.05  # files: held-out share, by a hash of the source
    too_long: Literal["error", "drop"] = "error"  # a pair longer than the model window
    label_smoothing: float = 0.1
    beam: int = 4  # decoding of the final held-out evaluation
    length_penalty: float = 1.0
    eval_pairs: int = 0  # held-out pairs translated for BLEU / chrF at the end (0: all)


@dataclass(frozen=True, kw_only=True)
class MLMConfig:
    """BERT pretraining (`zerolm pretrain --model.arch=bert`): masked-token corruption and sentence
    pairs."""

    objective: Literal["mlm+nsp", "mlm"] = (
        "mlm+nsp"  # mlm: no next-sentence loss, B always the real continuation
    )
    mask_prob: float = (
        0.15  # share of real tokens predicted (of those 80 % [MASK], 10 % random, 10 % kept)
    )
    short_seq_prob: float = (
        0.1  # share of documents paired at a random shorter length (BERT's recipe)
    )


@dataclass(frozen=True, kw_only=True)
class ClassifyConfig:
    """Sequence classification with a bert model (`zerolm finetune-classify`): a head on the pooled
    [CLS]."""

    base_model: str = ""  # a bert model directory (e.g. runs/bert-tang/model)
    data: tuple[str, ...] = ()  # JSONL files of {text_field, label_field} rows (+ text_pair_field)
    val_data: tuple[
        str, ...
    ] = ()  # held-out JSONL files; none: val_fraction of `data`, by a hash of the text
    text_field: str = "text"
    text_pair_field: str = ""  # a second text per row (sentence-pair tasks): [CLS] a [SEP] b [SEP]
    label_field: str = "label"
    builtin: Literal["", "tang-authors"] = (
        ""  # tang-authors: who wrote each poem (the prepared Tang docs)
    )
    authors: int = 10  # tang-authors: the N most prolific poets of the training split
    docs: str = ""  # tang-authors: prepared docs/ (train.jsonl, val.jsonl); "": next to base_model
    val_fraction: float = 0.1
    max_seq_len: int = 0  # 0: the model's window
    truncation: Literal["longest_first", "error"] = (
        "longest_first"  # a text (pair) longer than the window
    )
    epochs: float = 0.0  # > 0: train.steps = epochs over the training rows
    freeze: Literal["none", "embeddings", "encoder"] = (
        "none"  # encoder: train the pooler and head only
    )
    baselines: bool = (
        True  # also measure the majority class and a bag-of-characters logistic regression
    )


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Decoding in `zerolm generate`, `chat`, `eval-poems` and `translate`
    (`--sample.temperature=0`, or the short flags `--temperature 0`). Each command sets its own
    defaults: chat 0.7 and 96 tokens, eval-poems greedy and 96 tokens, translate greedy and the
    decoder window."""

    max_new_tokens: int = 64  # translate: 0 = as many as the decoder window holds
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # fixes the sampling randomness; None: fresh each run
    stop: tuple[str, ...] = ()  # generate: stop strings (not part of the output)
    context: Literal["truncate", "error"] = "truncate"  # a prompt longer than the window
    compile: bool = False  # decode with an ahead-of-time compiled step (generate, chat)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """`zerolm serve`: where it listens and the limits that protect it (serve/limits.py Limits)."""

    host: str = "127.0.0.1"  # this machine only
    port: int = 8000
    name: str = ""  # model id in the API; "": the directory's name (its parent's for .../model)
    api_key: str = ""  # require 'Authorization: Bearer KEY' on /v1; "": $ZEROLM_API_KEY, else none
    max_batch: int = 16  # sequences decoded together (KV-cache slots)
    max_queue: int = 64  # waiting sequences before 503 + Retry-After
    max_tokens: int = 512  # limit (and default) for max_tokens per choice
    max_n: int = 8  # choices per request
    max_messages: int = 256  # messages per chat request
    max_prompt_tokens: int | None = None  # None: the window - 1
    max_body_bytes: int = 1 << 20  # 413 above
    max_inspect: int = 2  # inspector calls at once (503 above)
    max_connections: int = 512  # open sockets, lowered to fit the fd limit
    header_timeout: float = 10.0  # seconds for a request head to arrive whole
    body_timeout: float = 30.0  # seconds for a request body to arrive (408)
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    shutdown_timeout: int = 10  # on SIGTERM/Ctrl-C, seconds before running requests are cancelled
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # uvicorn's
    compile: bool = False  # decode through the compiled all-slot step (fastest at many clients)


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    """`zerolm inspect`: the shape the FLOPs and memory figures are computed for."""

    context: int = 0  # context length; 0: the model's window
    batch: int = 1  # batch size of the KV-cache figure


@dataclass(frozen=True, kw_only=True)
class TranslateConfig:
    """`zerolm translate` with an encdec model (sampling: the [sample] section, temperature > 0)."""

    beam: int = 4  # beam width; 1: greedy
    length_penalty: float = 1.0  # beam scores are log-prob / length**this
    batch_size: int = 32
    too_long: Literal["error", "truncate"] = "error"  # a source longer than the encoder window


@dataclass(frozen=True, kw_only=True)
class Config:
    """The stages' sections (data ... classify) and the commands' (sample ... translate)."""

    out_dir: str = "runs/default"
    seed: int = 1337
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    poems: PoemsConfig = field(default_factory=PoemsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)


# ---------------------------------------------------------------- building from dicts


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(
        f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}"
    )


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a TOML value or CLI string to `tp`, or raise ValueError naming `name`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return tuple(
            _coerce(v.strip("'\"") if isinstance(v, str) else v, item, name) for v in value
        )
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value in ("none", "None"):
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")
        if isinstance(value, str):
            try:
                return tp(float(value)) if tp is int and value.lower().count("e") else tp(value)
            except ValueError:
                raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}: expected int, got {value!r}")
        if isinstance(value, (int, float)):
            return tp(value)
        raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} for {name}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, prefix, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(
                    f"{prefix}{key}: is a section; set its keys, e.g. --{prefix}{key}.<key>=..."
                )
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_overrides(args: list[str]) -> dict:
    """['--data.val_fraction=0.1', '--seed', '3'] ->
    {'data': {'val_fraction': '0.1'}, 'seed': '3'}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(
                f"unexpected argument {arg!r}: overrides look like --section.key=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override --{key} needs a value: --{key}=VALUE")
            value = args[i + 1]
            i += 1
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: '{p}' is set both as a value and as a section")
        node[leaf] = value
        i += 1
    return out


RECIPES = Path(__file__).resolve().parent / "recipes"  # package data, found by name


def recipe_path(name_or_path: str | Path) -> Path:
    """A TOML file by path, or a bundled recipe by name (`speedrun` ->
    zerolm/recipes/speedrun.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if len(path.parts) == 1 and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
    raise ValueError(
        f"config file {str(path)!r} does not exist; give a TOML path or a bundled recipe: {names}"
    )


def load_config(
    toml_path: str | Path | None = None, overrides: dict | None = None, base: dict | None = None
) -> Config:
    """Resolve defaults < base (a command's own defaults) < TOML file < overrides (nested dicts,
    e.g. from parse_overrides)."""
    values: dict = {}
    if toml_path:
        path = recipe_path(toml_path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    values = merge_dicts(merge_dicts(base or {}, values), overrides or {})
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


_Check = tuple[bool, str]  # (holds, the error message when it does not)


def _data_checks(d: DataConfig, t: TokenizerConfig) -> list[_Check]:
    return [
        (0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (
            0.0 < d.near_threshold <= 1.0,
            f"data.near_threshold must be in (0, 1], got {d.near_threshold}",
        ),
        (d.shingle_chars >= 1, f"data.shingle_chars must be >= 1, got {d.shingle_chars}"),
        (
            d.num_perm >= 8 and d.num_perm % 8 == 0,
            f"data.num_perm must be a multiple of 8, got {d.num_perm}",
        ),
        (d.min_chars >= 0 and d.max_chars >= 0, "data.min_chars and data.max_chars must be >= 0"),
        (
            d.max_chars == 0 or d.max_chars >= d.min_chars,
            "data.max_chars must be 0 (no limit) or >= min_chars",
        ),
        (
            0.0 <= d.min_letter_frac <= 1.0,
            f"data.min_letter_frac must be in [0, 1], got {d.min_letter_frac}",
        ),
        (d.shard_tokens >= 1, "data.shard_tokens must be >= 1"),
        (t.min_frequency >= 1, "tokenizer.min_frequency must be >= 1"),
    ]


def _train_checks(tr: TrainConfig, sft: SFTConfig, lora: LoRAConfig) -> list[_Check]:
    return [
        (
            tr.steps >= 1 and tr.batch_size >= 1 and tr.grad_accum >= 1,
            "train.steps, train.batch_size and train.grad_accum must be >= 1",
        ),
        (
            tr.lr > 0 and 0 <= tr.min_lr_ratio <= 1,
            "train.lr must be > 0, train.min_lr_ratio in [0, 1]",
        ),
        (0 < tr.decay_fraction <= 1, "train.decay_fraction must be in (0, 1]"),
        (tr.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (
            tr.nonfinite_limit >= 1 and 0 < tr.nonfinite_lr_factor < 1,
            "train.nonfinite_limit must be >= 1 and train.nonfinite_lr_factor in (0, 1)",
        ),
        (
            min(tr.eval_every, tr.ckpt_every, tr.log_every, tr.sample_every) >= 0,
            "train.eval_every, ckpt_every, log_every and sample_every must be >= 0",
        ),
        (
            0.0 <= sft.val_fraction < 1.0 and sft.pt_weight >= 0 and sft.max_per_source >= 0,
            "sft.val_fraction must be in [0, 1), sft.pt_weight and sft.max_per_source >= 0",
        ),
        (
            lora.rank >= 0 and lora.alpha > 0 and 0 <= lora.dropout < 1,
            "lora.rank must be >= 0 (0: full fine-tuning), lora.alpha > 0, lora.dropout in [0, 1)",
        ),
    ]


def _align_checks(a: AlignConfig) -> list[_Check]:
    return [
        (a.beta > 0, f"align.beta must be > 0 (typical 0.05-0.5), got {a.beta}"),
        (
            a.rollout_prompts >= 1 and a.group >= 1 and a.ppo_epochs >= 1 and a.max_new_tokens >= 1,
            "align.rollout_prompts, group, ppo_epochs and max_new_tokens must be >= 1",
        ),
        (
            a.advantage != "group" or a.group >= 2,
            "align.advantage='group' compares samples of one prompt: "
            f"set align.group >= 2 (got {a.group})",
        ),
        (a.temperature > 0, "align.temperature must be > 0 (rollouts sample from the policy)"),
        (
            min(a.kl_coef, a.target_kl, a.clip, a.value_clip, a.value_coef) >= 0
            and 0 <= a.gamma <= 1
            and 0 <= a.lam <= 1,
            "align.kl_coef, target_kl, clip, value_clip, value_coef must be >= 0, "
            "gamma and lam in [0, 1]",
        ),
    ]


def _encoder_checks(s2s: Seq2SeqConfig, mlm: MLMConfig, c: ClassifyConfig) -> list[_Check]:
    return [
        (
            0 <= s2s.label_smoothing < 1 and 0 <= s2s.val_fraction < 1,
            "seq2seq.label_smoothing and seq2seq.val_fraction must be in [0, 1)",
        ),
        (
            s2s.beam >= 1 and s2s.eval_pairs >= 0,
            "seq2seq.beam must be >= 1, seq2seq.eval_pairs >= 0",
        ),
        (
            bool(s2s.source) == bool(s2s.target),
            "seq2seq.source and seq2seq.target are line-aligned files and come together: set both",
        ),
        (
            0 < mlm.mask_prob < 1 and 0 <= mlm.short_seq_prob <= 1,
            "mlm.mask_prob must be in (0, 1) (BERT: 0.15), mlm.short_seq_prob in [0, 1]",
        ),
        (
            c.authors >= 2 and 0 <= c.val_fraction < 1 and c.epochs >= 0 and c.max_seq_len >= 0,
            "classify.authors must be >= 2, classify.val_fraction in [0, 1), "
            "classify.epochs and classify.max_seq_len >= 0",
        ),
    ]


def validate(cfg: Config) -> None:
    """Range checks that the types alone do not express; the first that fails is the error."""
    checks = [
        *_data_checks(cfg.data, cfg.tokenizer),
        *_train_checks(cfg.train, cfg.sft, cfg.lora),
        *_align_checks(cfg.align),
        *_encoder_checks(cfg.seq2seq, cfg.mlm, cfg.classify),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


# ---------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise AssertionError("None cannot be written to TOML")
    raise AssertionError(f"cannot write {type(v)} to TOML")


def to_toml(cfg, prefix: str = "") -> str:
    """Serialise a config tree to TOML that load_config reads back to an equal config."""
    scalars, sections = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            sections.append(f"\n[{prefix}{f.name}]\n" + to_toml(v, f"{prefix}{f.name}."))
        elif v is not None:  # None (TOML has no null) means "the default": leave the key out
            scalars.append(f"{f.name} = {_toml_value(v)}\n")
    return "".join(scalars) + "".join(sections)


def save_config(cfg: Config, out_dir: str | Path) -> Path:
    """Write the resolved config as out_dir/config.toml (atomically)."""
    path = Path(out_dir) / "config.toml"
    atomic_write_text(path, to_toml(cfg))
    return path

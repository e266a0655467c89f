"""The dataclass tree: every section and key of a zerolm run, with its default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    # bpe only: the pre-tokenizer (tokenizer/pretok.py); llama.cpp's names export to GGUF
    pre: Literal["qwen2", "deepseek-llm", "zerolm-han"] = "qwen2"
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
    head_dim: int = 0  # size of one attention head; 0: d_model / n_heads (Qwen3 uses 128 != d/h)
    qkv_bias: bool | None = None  # biases on the q, k, v projections only; None: as `bias` (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3, OLMo 2)
    # RoPE frequency scaling for a context beyond pretraining (formulas of transformers'
    # modeling_rope_utils): linear divides every frequency by rope_factor; llama3 (Llama 3.1)
    # divides the low ones, smoothly between the two wavelength bounds; yarn interpolates by dim
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0  # context extension factor (linear, llama3, yarn)
    rope_original_max_len: int = 0  # llama3/yarn: pretraining context; 0: max_seq_len
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are divided
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    rope_beta_fast: float = 32.0  # yarn: rotations bounding the extrapolated dims
    rope_beta_slow: float = 1.0  # yarn: rotations bounding the interpolated dims
    rope_attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0: 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: floor/ceil the correction range (transformers' default)
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
    # pretrain: a model directory to continue from (its weights, architecture and tokenizer, which
    # then prepares the data); model.max_seq_len caps the training window. "": a new model
    init: str = ""


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """Training on several processes under torchrun (zerolm/dist/): `torchrun --nproc-per-node N
    -m zerolm pretrain ...`; a plain `zerolm pretrain` is one process with no torch.distributed."""

    # "": ddp under torchrun with WORLD_SIZE > 1, else none; fsdp: FSDP2, fully_shard per block
    strategy: Literal["", "none", "ddp", "fsdp"] = ""
    timeout: float = 1800.0  # seconds a rank waits for the others (a collective, a barrier)


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
    max_seq_len: int = 0  # tokens per packed row (at most the model's window); 0: the window


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
    # QLoRA: quantize a float base before adding adapters (transforms/quantize.py's int8 / int4 RTN
    # at group 32, head int8); a base saved quantized (`zerolm quantize`) needs none of this
    base_quant: Literal["none", "int8", "int4"] = "none"


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
class CalibConfig:
    """Calibration text for gptq / awq / wanda / structured pruning: `seqs` windows of `seq_len`
    tokens drawn with `seed` from held-out text (the model's validation shards or given files)."""

    data: tuple[str, ...] = ()  # .txt/.jsonl files; (): bundled `corpus`
    corpus: tuple[str, ...] = ("tang", "shakespeare")  # bundled corpora's held-out split
    seqs: int = 64
    seq_len: int = 256
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """`zerolm quantize`: weight quantization of every linear layer (transforms/quantize.py)."""

    method: Literal["int8", "int4", "gptq", "awq"] = "int8"  # gptq / awq: calibrated int4
    group: int = 32  # weights per scale along a row (32: llama.cpp's blocks); 0: one per row
    scheme: Literal["sym", "asym"] = "sym"  # int4: sym = Q4_0's code, asym = Q4_1's
    head: Literal["auto", "int8", "int4", "float"] = "auto"  # output head (and a tied embedding)
    gptq_damp: float = 0.01  # gptq: Hessian damping, as a share of its mean diagonal
    awq_grid: int = 20  # awq: scale exponents tried per layer


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """`zerolm prune`: weight pruning (transforms/prune.py)."""

    method: Literal["magnitude", "wanda", "structured"] = "magnitude"
    sparsity: float = 0.5  # unstructured: share of each layer's weights set to zero
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    ffn_fraction: float = 0.25  # structured: share of FFN channels removed per block
    heads_fraction: float = 0.0  # structured: share of attention heads (kv groups) removed
    recover_steps: int = 0  # structured: recovery fine-tune steps on the one Trainer


@dataclass(frozen=True, kw_only=True)
class Config:
    """The stages' sections (data ... classify) and the commands' (sample ... translate)."""

    out_dir: str = "runs/default"
    seed: int = 1337
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
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
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

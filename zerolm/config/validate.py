"""Range checks that the types alone do not express."""

from __future__ import annotations

from zerolm.config.schema import (
    AlignConfig,
    ClassifyConfig,
    Config,
    DataConfig,
    DistConfig,
    LoRAConfig,
    MLMConfig,
    Seq2SeqConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
)

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


def _dist_checks(d: DistConfig) -> list[_Check]:
    return [(d.timeout > 0, f"dist.timeout must be > 0 seconds, got {d.timeout}")]


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
        *_dist_checks(cfg.dist),
        *_align_checks(cfg.align),
        *_encoder_checks(cfg.seq2seq, cfg.mlm, cfg.classify),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)

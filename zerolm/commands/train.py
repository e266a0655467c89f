"""Training commands: pretrain, speedrun, sft, reward, dpo, ppo and finetune-classify.

Each takes --config (a recipe path or name) and dotted overrides; its entry function resolves the
config and calls the stage in its package, then prints where the model went.
"""

from __future__ import annotations

import dataclasses
import tomllib

from zerolm.commands.common import alias, resolve_config, resume_changed_arg, stage_parser
from zerolm.config import Config, merge_dicts, recipe_path


def cmd_pretrain(args, extra, **defaults):
    from zerolm.train.pretrain import pretrain

    cfg = resolve_config(args, extra, **defaults)
    if getattr(args, "resume", False):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    result = pretrain(cfg, progress=not args.quiet)
    if init := result.info.get("init"):
        print(
            f"validation bits per byte: {init['val_bpb']:.4f} before (step 0, {init['model']}) "
            f"-> {result.final['val_bpb']:.4f} after {result.last.get('step', '?')} steps; model "
            f"saved to {result.model_dir}"
        )
    return cfg, result


def cmd_speedrun(args, extra):
    from zerolm.dist.group import env_world_size
    from zerolm.speedrun import check_align, speedrun_align, speedrun_samples, speedrun_sft

    if env_world_size() > 1:  # its later stages (samples, PPO) are one-process work
        raise ValueError(
            f"zerolm speedrun runs in one process, not under torchrun (WORLD_SIZE="
            f"{env_world_size()}): to pretrain its model on several processes run `torchrun "
            f"--nproc-per-node N -m zerolm pretrain --config speedrun`"
        )
    defaults = {"out_dir": "runs/speedrun", "train": {"resume": True}}
    if not args.config:  # the tuned default recipe (see its comments)
        recipe = tomllib.loads(recipe_path("speedrun").read_text(encoding="utf-8"))
        recipe.get("data", {}).pop(
            "corpus", None
        )  # the user's text alone when given; the poems below
        defaults = merge_dicts(defaults, recipe)
    cfg = resolve_config(args, extra, **defaults)
    if not cfg.data.inputs and not cfg.data.corpus:  # no text given: the bundled Tang poems
        defaults = merge_dicts(defaults, {"data": {"corpus": ["tang"]}})
        cfg = resolve_config(args, extra, **defaults)
    check_align(args, cfg)  # before any work
    cfg, result = cmd_pretrain(args, extra, **defaults)
    prompts = speedrun_samples(cfg, result)
    print(
        f"final validation bits per byte: {result.final['val_bpb']:.4f} (loss "
        f"{result.final['val_loss']:.4f})"
    )
    if args.no_sft:
        import shlex

        print(
            f"model saved to {result.model_dir}; try: zerolm generate --model {result.model_dir} "
            f"{shlex.quote(prompts[-1] or 'Once')}"
        )
        return
    sft_dir = speedrun_sft(args, cfg, result.model_dir)
    if args.align and sft_dir:
        speedrun_align(args, cfg, sft_dir)


def cmd_sft(args, extra, **defaults):
    from zerolm.finetune.sft import sft

    short = {"sft": {"base_model": args.model}} if args.model else {}
    cfg = resolve_config(args, extra, **merge_dicts(defaults, short))
    result = sft(cfg, progress=not args.quiet)
    print(f"model saved to {result.model_dir}; try: zerolm chat {result.model_dir}")
    return cfg, result


def _align_config(args, extra, defaults) -> Config:
    short = {"align": {"base_model": args.model}} if args.model else {}
    return resolve_config(args, extra, **merge_dicts(defaults, short))


def cmd_reward(args, extra, **defaults):
    from zerolm.align.reward import train_reward

    cfg = _align_config(args, extra, defaults)
    result = train_reward(cfg, progress=not args.quiet)
    acc = result.final.get("val_accuracy")
    print(
        f"reward model saved to {result.model_dir}; held-out pairwise accuracy "
        f"{'n/a (no held-out pairs)' if acc is None else f'{acc:.1%}'} on "
        f"{result.info['val_pairs']} pairs"
    )
    return cfg, result


def cmd_dpo(args, extra, **defaults):
    from zerolm.align.dpo import train_dpo

    cfg = _align_config(args, extra, defaults)
    result = train_dpo(cfg, progress=not args.quiet)
    if "val_accuracy" in (final := result.final):
        print(
            f"held-out pairs ({result.info['val_pairs']}): accuracy {final['val_accuracy']:.1%}, "
            f"margin {final['val_margin']:.3f}, loss {final['val_loss']:.4f}"
        )
    print(f"model saved to {result.model_dir}; try: zerolm chat {result.model_dir}")
    return cfg, result


def cmd_ppo(args, extra, **defaults):
    from zerolm.align.ppo import train_ppo

    cfg = _align_config(args, extra, defaults)
    result = train_ppo(cfg, progress=not args.quiet)
    info, final = result.info, result.final
    print(
        f"{info['rollouts']} rollouts ({info['skipped_rollouts']} skipped): mean reward "
        f"{info['reward_first']:.3f} (first 3) -> {info['reward_last']:.3f} (last 3)"
    )
    if "val_reward" in final:
        print(
            f"held-out prompts: reward {final['val_reward']:.3f}, KL to the reference "
            f"{final['val_kl']:.3f} nats per reply"
        )
    print(f"model saved to {result.model_dir}; try: zerolm chat {result.model_dir}")
    return cfg, result


def cmd_finetune_classify(args, extra, **defaults):
    from zerolm.finetune.classify import finetune_classify

    short = {"classify": {"base_model": args.model}} if args.model else {}
    cfg = resolve_config(args, extra, **merge_dicts(defaults, short))
    result = finetune_classify(cfg, progress=not args.quiet)
    r, final = result.info, result.final
    if final.get("val_acc") is not None:
        boc = "" if r["boc_lr_acc"] is None else f" | bag-of-characters LR {r['boc_lr_acc']:.1%}"
        boc += f" ({r['boc_lr_seconds']:.0f} s)" if boc else ""
        print(
            f"held-out accuracy on {r['val_rows']} rows: fine-tuned bert {final['val_acc']:.1%} "
            f"(macro-F1 {final['val_macro_f1']:.3f}; {r['steps']} steps, "
            f"{r['finetune_seconds']:.0f} s) | majority class {r['majority_acc']:.1%}{boc}"
        )
    print(
        f"classifier saved to {result.model_dir}; try: zerolm classify {result.model_dir} --input "
        "FILE.jsonl"
    )
    return cfg, result


def _setup_pretrain(sub) -> None:
    sp = stage_parser(
        sub,
        "speedrun",
        cmd_speedrun,
        "the whole pipeline on your text (paths) or a bundled corpus (--corpus; "
        "default tang): prepare, tokenizer, pretrain, samples, then SFT on chat data that fits the "
        "text (--sft.data, else bundled conversations in its language) and a chat transcript",
    )
    sp.add_argument("--no-sft", action="store_true", help="stop after pretraining")
    sp.add_argument(
        "--sft-config",
        help="SFT recipe (default: the bundled speedrun-sft); --sft.* overrides apply "
        "to it, other dotted overrides to pretraining only",
    )
    sp.add_argument(
        "--eval-requests",
        type=int,
        default=200,
        help="held-out poem requests for the form measurement (tang poems only)",
    )
    sp.add_argument(
        "--align",
        choices=["dpo", "ppo"],
        help="after SFT on the tang poems, align the chat model "
        "(recipe speedrun-dpo or speedrun-ppo) and compare it with the SFT model",
    )
    resume_changed_arg(sp)
    sp = stage_parser(
        sub,
        "pretrain",
        cmd_pretrain,
        "prepare data if needed, then train a next-token model (with "
        "--model.arch=bert: a masked-LM + next-sentence encoder) into OUT/model",
    )
    sp.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    alias(
        sp,
        "--init",
        key="train.init",
        help="continue pretraining this model directory (zerolm's or `zerolm import`ed) on your "
        "text, prepared with its own tokenizer",
    )
    resume_changed_arg(sp)


_FINETUNE = (
    (
        "sft",
        cmd_sft,
        "fine-tune a model on conversations (full, or LoRA with --lora.rank=R)",
        "base model directory (config key sft.base_model)",
    ),
    (
        "reward",
        cmd_reward,
        "train a reward model on preference pairs (--align.data, --align.builtin=poems,hhh)",
        "the SFT model to start from (config key align.base_model)",
    ),
    (
        "dpo",
        cmd_dpo,
        "align a chat model with DPO on preference pairs (full, or LoRA with --lora.rank=R)",
        "the SFT model: the policy's start and the reference (config key align.base_model)",
    ),
    (
        "ppo",
        cmd_ppo,
        "RLHF: train a chat model against a reward (--align.reward: poem-form, a reward model "
        "directory, or module:function) with PPO, or GRPO with --align.advantage=group",
        "the SFT model: the policy's start and the reference (config key align.base_model)",
    ),
    (
        "finetune-classify",
        cmd_finetune_classify,
        "fine-tune a bert model to classify texts (--classify.data=F.jsonl or "
        "--classify.builtin=tang-authors); prints held-out accuracy next to the majority class "
        "and a bag-of-characters logistic regression",
        "the pretrained bert model directory (config key classify.base_model)",
    ),
)


def setup_arg_parser(sub) -> None:
    _setup_pretrain(sub)
    for name, run, help, model_help in _FINETUNE:
        sp = stage_parser(sub, name, run, help, inputs=False)
        sp.add_argument("--model", help=model_help)
        resume_changed_arg(sp)

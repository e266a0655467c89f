"""The speedrun's stages after pretraining (`zerolm speedrun`): samples prompted from held-out
documents; SFT on chat data that fits the text, with a chat transcript (and, on the Tang poems,
the form-adherence comparison); the optional alignment stage (--align dpo|ppo, poems only)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from zerolm.align.dpo import train_dpo
from zerolm.align.ppo import train_ppo
from zerolm.config import RECIPES, SFTConfig, load_config
from zerolm.data.prepare import read_docs
from zerolm.finetune.sft import load_sources, sft
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.tasks.poems.instruct import compare_models, form_adherence
from zerolm.tasks.poems.requests import eval_requests
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.report import script_of
from zerolm.train.pretrain import sample_texts
from zerolm.train.run import StageResult

POEM_CORPUS = "tang"  # the poem-form stages need its regulated verse and title/author metadata
CHAT_BY_LANGUAGE = {
    "en": ("chitchat", "chatterbot-en"),
    "zh": ("chatterbot-zh",),
}  # bundled conversations


def is_poem_data(data_cfg) -> bool:
    return POEM_CORPUS in data_cfg.corpus


def text_language(docs: Iterable[dict], limit: int = 200) -> str:
    """'zh', 'en' or 'other': the script most of the first `limit` documents are written in."""
    votes = Counter(script_of(d["text"]) for d in islice(docs, limit))
    return votes.most_common(1)[0][0] if votes else "other"


def opening(text: str) -> str:
    """A document's first 2 characters (Chinese) or first 3 words, as a sample prompt."""
    text = text.lstrip()
    if script_of(text) == "zh":
        return text[:2]
    m = re.match(r"(?:\S+\s+){2}\S+", text)
    return (m.group(0) if m else text)[:40]


def sample_prompts(val_docs: Iterable[dict], n: int = 2) -> list[str]:
    """Two unconditional samples (at a document start), then the openings of n held-out
    documents."""
    return ["", ""] + [opening(d["text"]) for d in islice(val_docs, n)]


def user_sft(cfg) -> dict:
    """The sft.* keys the user set (--sft.data=..., or an [sft] table of --config): the pretraining
    config carries them unused, and they apply to the speedrun's SFT stage."""
    default = SFTConfig()
    return {
        k: v
        for k, v in dataclasses.asdict(cfg.sft).items()
        if v != getattr(default, k) and k != "base_model"
    }


def chat_data(poems: bool, lang: str, user: dict, recipe: dict | None = None) -> dict | None:
    """sft overrides that pick the chat stage's data: {} keeps what is configured, None means
    nothing fits. The user's --sft.builtin / own recipe's data as given; --sft.data alone: that
    file only; poem data: poem requests made from it; else the bundled conversations in `lang`."""
    if user.get("builtin") or (recipe or {}).get("data") or (recipe or {}).get("builtin"):
        return {}
    if user.get("data"):
        return {"builtin": []}
    builtin = ("poems",) if poems else CHAT_BY_LANGUAGE.get(lang)
    return {"builtin": list(builtin)} if builtin else None


def speedrun_samples(cfg, result: StageResult) -> list[str]:
    """Print samples of the pretrained model; returns the prompts (the held-out openings last)."""
    prompts = sample_prompts(read_docs(Path(cfg.out_dir) / "docs" / "val.jsonl"))
    model, tok = load_model(result.model_dir), Tokenizer.load(result.model_dir)
    print(f"\nsamples ({len(prompts) - 2} prompted with the opening of a held-out document):")
    for text in sample_texts(model, tok, prompts, max_new_tokens=64, seed=cfg.seed):
        print("  " + text.replace("\n", "\n  ") + "\n")
    return prompts


def speedrun_sft(args, cfg, base_dir: str):
    """The speedrun's second stage: SFT of the pretrained model (recipes/speedrun-sft.toml or
    --sft-config) on chat data that fits the text (see chat_data), then a short chat transcript;
    on poem requests also the held-out form adherence of base vs SFT model. Returns the SFT model
    directory, or None when no bundled chat data fits and the user gave none."""
    out = Path(cfg.out_dir)
    recipe = Path(args.sft_config) if args.sft_config else RECIPES / "speedrun-sft.toml"
    own = dataclasses.asdict(load_config(recipe).sft) if args.sft_config else None
    lang = text_language(read_docs(out / "docs" / "train.jsonl"))
    pick = chat_data(is_poem_data(cfg.data), lang, user_sft(cfg), own)
    if pick is None:
        print(
            f"\nno chat stage: no bundled conversations fit this text (language: {lang}); "
            'add your own with --sft.data FILE.jsonl (one {"messages": [...]} per line)'
        )
        return None
    values = {
        "out_dir": str(out / "sft"),
        "seed": cfg.seed,
        "train": {"resume": True, "resume_changed": cfg.train.resume_changed},
        "poems": {"docs": cfg.poems.docs or str(out / "docs")},
        "sft": {
            "pt_shards": str(out / "shards"),
            **user_sft(cfg),
            **pick,
            "base_model": base_dir,
        },
    }
    sft_cfg = load_config(recipe, overrides=values)  # paths follow the pretraining run
    print(
        f"\nSFT: {recipe.name} on {', '.join([*sft_cfg.sft.data, *sft_cfg.sft.builtin])} -> "
        f"{sft_cfg.out_dir}"
    )

    result = sft(sft_cfg, progress=not args.quiet)
    if "poems" in sft_cfg.sft.builtin:
        asks = _form_adherence(args, out, base_dir, result.model_dir)
    else:
        train, val, _ = load_sources(sft_cfg)
        asks = [
            c[: next(i for i, m in enumerate(c) if m["role"] == "assistant")]
            for c in (val or train)[:3]
        ]
    _transcript(result.model_dir, asks, cfg.seed)
    print(f"chat model saved to {result.model_dir}; try: zerolm chat {result.model_dir}")
    return result.model_dir


def _form_adherence(args, out: Path, base_dir: str, sft_dir: str) -> list:
    """Print base vs SFT form adherence on held-out poem requests; returns three requests to
    chat."""
    requests = eval_requests(
        read_docs(out / "docs" / "val.jsonl"), seed=0, limit=args.eval_requests
    )
    scores = {}
    for name, d in (("base", base_dir), ("sft", sft_dir)):
        scores[name] = form_adherence(load_model(d), Tokenizer.load(d), requests)["form_ok"]
    print(
        f"held-out poem requests answered in the requested form ({len(requests)}, greedy): "
        f"base {scores['base']:.1%} -> SFT {scores['sft']:.1%}"
    )
    return [r["messages"][:-1] for r in requests[:3]]


def _transcript(model_dir: str, asks: list, seed: int) -> None:
    if not asks:
        return
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    req = chat_request(tok, 96, SamplingParams(temperature=0.7, top_k=50), seed=seed)
    print("\nchat transcript (held-out requests):")
    for ask, reply in zip(asks, replies(model, tok, asks, req)):
        print(
            f"  user: {ask[-1]['content']}\n  assistant: "
            + reply.replace("\n", "\n             ")
            + "\n"
        )


def check_align(args, cfg) -> None:
    """--align trains and measures on poem requests: refuse it, before any work, on other text."""
    if args.align and not is_poem_data(cfg.data):
        raise ValueError(
            f"--align {args.align} trains and measures on poem requests, which need the bundled "
            f"'{POEM_CORPUS}' corpus (no paths, or --corpus {POEM_CORPUS}); align your own chat "
            f"model with `zerolm {args.align} --model RUN/sft/model --align.data=PAIRS.jsonl`"
        )


def speedrun_align(args, cfg, sft_dir: str):
    """The speedrun's optional third stage (--align dpo|ppo, recipes/speedrun-{dpo,ppo}.toml): the
    SFT model aligned, then SFT vs aligned on the same held-out requests: form adherence greedy and
    sampled (temperature 1, seeded), KL to the SFT model, validation bits per byte."""
    out, stage = Path(cfg.out_dir), args.align
    recipe = RECIPES / f"speedrun-{stage}.toml"
    values = {
        "out_dir": str(out / stage),
        "seed": cfg.seed,
        "train": {"resume": True, "resume_changed": cfg.train.resume_changed},
        "align": {"base_model": sft_dir},
        "poems": {"docs": cfg.poems.docs or str(out / "docs")},
    }
    align_cfg = load_config(recipe, overrides=values)
    print(f"\nalignment: {recipe.name} -> {align_cfg.out_dir}")
    train = train_dpo if stage == "dpo" else train_ppo
    result = train(align_cfg, progress=not args.quiet)
    requests = eval_requests(
        read_docs(out / "docs" / "val.jsonl"), seed=0, limit=args.eval_requests
    )
    models = {"SFT": sft_dir, stage.upper(): result.model_dir}
    greedy = compare_models(
        models.values(), requests, reference=sft_dir, shards=str(out / "shards")
    )
    sampled = compare_models(
        models.values(), requests, sampling=SamplingParams(temperature=1.0), seed=0
    )
    print(
        f"\nheld-out poem requests ({len(requests)}) answered in the requested form, KL to the SFT "
        "model (nats per reply) and validation bits per byte:"
    )
    for name, d in models.items():
        g, t = greedy[str(d)], sampled[str(d)]
        print(
            f"  {name:>4}: greedy {g['form_ok']:6.1%} | sampled (T=1) {t['form_ok']:6.1%} | KL "
            f"{g['kl']:5.2f} | {g['val_bpb']:.4f} bits/byte"
        )
    print(f"aligned model saved to {result.model_dir}; try: zerolm chat {result.model_dir}")

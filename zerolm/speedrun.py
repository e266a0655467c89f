"""The speedrun's stages after pretraining (`zerolm speedrun`): SFT with its form-adherence
comparison and chat transcript, and the optional alignment stage (--align dpo|ppo)."""
from __future__ import annotations

from pathlib import Path

from zerolm.config import load_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def speedrun_sft(args, cfg, base_dir: str):
    """The speedrun's second stage: SFT of the pretrained model (recipes/speedrun-sft.toml), the
    held-out form-adherence of base vs SFT model, and a short chat transcript."""
    from zerolm.data.poems import eval_requests
    from zerolm.data.prepare import read_docs
    from zerolm.eval.instruct import form_adherence
    from zerolm.infer.chat import chat_request, replies
    from zerolm.infer.sampling import SamplingParams
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    out = Path(cfg.out_dir)
    recipe = Path(args.sft_config) if args.sft_config else RECIPES / "speedrun-sft.toml"
    values = {"out_dir": str(out / "sft"), "seed": cfg.seed, "train": {"resume": True},
              "sft": {"base_model": base_dir, "poem_docs": str(out / "docs"), "pt_shards": str(out / "shards")}}
    sft_cfg = load_config(recipe, overrides=values)  # paths follow the pretraining run
    print(f"\nSFT: {recipe.name} -> {sft_cfg.out_dir}")
    from zerolm.finetune.sft import sft

    result = sft(sft_cfg, progress=not args.quiet)
    requests = eval_requests(read_docs(out / "docs" / "val.jsonl"), seed=0, limit=args.eval_requests)
    scores = {}
    for name, d in (("base", base_dir), ("sft", result["model_dir"])):
        scores[name] = form_adherence(load_model(d), Tokenizer.load(d), requests)["form_ok"]
    print(f"held-out poem requests answered in the requested form ({len(requests)}, greedy): "
          f"base {scores['base']:.1%} -> SFT {scores['sft']:.1%}")
    model, tok = load_model(result["model_dir"]), Tokenizer.load(result["model_dir"])
    asks = [r["messages"][:-1] for r in requests[:3]]
    req = chat_request(tok, 96, SamplingParams(temperature=0.7, top_k=50), seed=cfg.seed)
    print("\nchat transcript (held-out requests):")
    for ask, reply in zip(asks, replies(model, tok, asks, req)):
        print(f"  user: {ask[-1]['content']}\n  assistant: " + reply.replace("\n", "\n             ") + "\n")
    print(f"chat model saved to {result['model_dir']}; try: zerolm chat {result['model_dir']}")
    return result["model_dir"]


def speedrun_align(args, cfg, sft_dir: str):
    """The speedrun's optional third stage (--align dpo|ppo, recipes/speedrun-{dpo,ppo}.toml): the
    SFT model aligned, then SFT vs aligned on the same held-out requests: form adherence greedy and
    sampled (temperature 1, seeded), KL to the SFT model, validation bits per byte."""
    from zerolm.data.poems import eval_requests
    from zerolm.data.prepare import read_docs
    from zerolm.eval.instruct import compare_models
    from zerolm.infer.sampling import SamplingParams

    out, stage = Path(cfg.out_dir), args.align
    recipe = RECIPES / f"speedrun-{stage}.toml"
    values = {"out_dir": str(out / stage), "seed": cfg.seed, "train": {"resume": True},
              "align": {"base_model": sft_dir, "poem_docs": str(out / "docs")}}
    align_cfg = load_config(recipe, overrides=values)
    print(f"\nalignment: {recipe.name} -> {align_cfg.out_dir}")
    if stage == "dpo":
        from zerolm.align.dpo import train_dpo as train
    else:
        from zerolm.align.ppo import train_ppo as train
    result = train(align_cfg, progress=not args.quiet)
    requests = eval_requests(read_docs(out / "docs" / "val.jsonl"), seed=0, limit=args.eval_requests)
    models = {"SFT": sft_dir, stage.upper(): result["model_dir"]}
    greedy = compare_models(models.values(), requests, reference=sft_dir, shards=str(out / "shards"))
    sampled = compare_models(models.values(), requests, sampling=SamplingParams(temperature=1.0), seed=0)
    print(f"\nheld-out poem requests ({len(requests)}) answered in the requested form, KL to the SFT model "
          "(nats per reply) and validation bits per byte:")
    for name, d in models.items():
        g, t = greedy[str(d)], sampled[str(d)]
        print(f"  {name:>4}: greedy {g['form_ok']:6.1%} | sampled (T=1) {t['form_ok']:6.1%} | KL {g['kl']:5.2f} | "
              f"{g['val_bpb']:.4f} bits/byte")
    print(f"aligned model saved to {result['model_dir']}; try: zerolm chat {result['model_dir']}")

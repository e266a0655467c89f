"""The `zerolm` command: one subcommand per stage, each a thin call into its package.

Every subcommand that runs a stage takes `--config recipe.toml` and dotted overrides such as
`--data.val_fraction=0.1` (precedence: CLI > TOML > defaults); `zerolm config` prints them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
from pathlib import Path

from zerolm.config import Config, load_config, merge_dicts, parse_overrides, to_toml

SPEEDRUN_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "speedrun.toml"

log = logging.getLogger("zerolm")


def _config(args, extra: list[str], **defaults) -> Config:
    """Config defaults < this command's defaults < TOML (--config) < shorthand flags (--out,
    --corpus, positional inputs) < dotted overrides (--data.min_chars=10)."""
    short: dict = {}
    if getattr(args, "out", None):
        short["out_dir"] = args.out
    if getattr(args, "inputs", None):
        short.setdefault("data", {})["inputs"] = list(args.inputs)
    if getattr(args, "corpus", None):
        short.setdefault("data", {})["corpus"] = args.corpus
    if getattr(args, "resume_changed", False):
        short["train"] = {"resume": True, "resume_changed": True}
    overrides = parse_overrides(extra)
    for key, value in short.items():
        overrides[key] = (
            {**value, **overrides.get(key, {})}
            if isinstance(value, dict)
            else overrides.get(key, value)
        )
    return load_config(args.config, overrides, base=defaults)


def _print_summary(summary: dict) -> None:
    docs = summary["docs"]
    log.info(
        "documents: read %d, kept %d (train %d, val %d); dropped %s",
        docs["documents_read"],
        docs["documents_kept"],
        docs["splits"]["train"]["documents"],
        docs["splits"]["val"]["documents"],
        docs["dropped"] or "none",
    )
    if tok := summary.get("tokenizer"):
        log.info(
            "tokenizer: %s, vocab %d, trained in %ss",
            tok["kind"],
            tok["vocab_size"],
            tok["train_seconds"],
        )
        for lang, s in tok["compression_val"].items():
            log.info(
                "  held-out %-5s %6.2f bytes/token %5.2f chars/token (%d docs)",
                lang,
                s["bytes_per_token"],
                s["chars_per_token"],
                s["documents"],
            )
    if sh := summary.get("shards"):
        for split, s in sh["splits"].items():
            log.info(
                "shards %-5s %d tokens (%s) in %d file(s)",
                split,
                s["tokens"],
                sh["dtype"],
                len(s["files"]),
            )
    log.info("written to %s", summary["out_dir"])


def cmd_prepare(args, extra, stages=("docs", "tokenizer", "shards"), **defaults):
    from zerolm.data.prepare import prepare

    cfg = _config(args, extra, **defaults)
    summary = prepare(cfg, stages=stages, progress=not args.quiet)
    _print_summary(summary)
    return summary


def cmd_pretrain(args, extra, **defaults):
    from zerolm.train.pretrain import pretrain

    cfg = _config(args, extra, **defaults)
    if getattr(args, "resume", False):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    result = pretrain(cfg, progress=not args.quiet)
    return cfg, result


def cmd_speedrun(args, extra):
    from zerolm.speedrun import check_align, speedrun_align, speedrun_samples, speedrun_sft

    defaults = {"out_dir": "runs/speedrun", "train": {"resume": True}}
    if SPEEDRUN_RECIPE.is_file() and not args.config:  # the tuned default recipe (see its comments)
        recipe = tomllib.loads(SPEEDRUN_RECIPE.read_text(encoding="utf-8"))
        recipe.get("data", {}).pop(
            "corpus", None
        )  # the user's text alone when given; the poems below
        defaults = merge_dicts(defaults, recipe)
    cfg = _config(args, extra, **defaults)
    if not cfg.data.inputs and not cfg.data.corpus:  # no text given: the bundled Tang poems
        defaults = merge_dicts(defaults, {"data": {"corpus": ["tang"]}})
        cfg = _config(args, extra, **defaults)
    check_align(args, cfg)  # before any work
    cfg, result = cmd_pretrain(args, extra, **defaults)
    prompts = speedrun_samples(cfg, result)
    print(
        f"final validation bits per byte: {result['final_val_bpb']:.4f} (loss {result['final_val_loss']:.4f})"
    )
    if args.no_sft:
        import shlex

        print(
            f"model saved to {result['model_dir']}; try: zerolm generate --model {result['model_dir']} "
            f"{shlex.quote(prompts[-1] or 'Once')}"
        )
        return
    sft_dir = speedrun_sft(args, cfg, result["model_dir"])
    if args.align and sft_dir:
        speedrun_align(args, cfg, sft_dir)


def cmd_sft(args, extra, **defaults):
    from zerolm.finetune.sft import sft

    short = {"sft": {"base_model": args.model}} if args.model else {}
    cfg = _config(args, extra, **merge_dicts(defaults, short))
    result = sft(cfg, progress=not args.quiet)
    print(f"model saved to {result['model_dir']}; try: zerolm chat {result['model_dir']}")
    return cfg, result


def _align_config(args, extra, defaults) -> Config:
    short = {"align": {"base_model": args.model}} if args.model else {}
    return _config(args, extra, **merge_dicts(defaults, short))


def cmd_reward(args, extra, **defaults):
    from zerolm.align.reward import train_reward

    cfg = _align_config(args, extra, defaults)
    result = train_reward(cfg, progress=not args.quiet)
    acc = result.get("final_val_accuracy")
    print(
        f"reward model saved to {result['model_dir']}; held-out pairwise accuracy "
        f"{'n/a (no held-out pairs)' if acc is None else f'{acc:.1%}'} on {result['val_pairs']} pairs"
    )
    return cfg, result


def cmd_dpo(args, extra, **defaults):
    from zerolm.align.dpo import train_dpo

    cfg = _align_config(args, extra, defaults)
    result = train_dpo(cfg, progress=not args.quiet)
    if "final_val_accuracy" in result:
        print(
            f"held-out pairs ({result['val_pairs']}): accuracy {result['final_val_accuracy']:.1%}, "
            f"margin {result['final_val_margin']:.3f}, loss {result['final_val_loss']:.4f}"
        )
    print(f"model saved to {result['model_dir']}; try: zerolm chat {result['model_dir']}")
    return cfg, result


def cmd_ppo(args, extra, **defaults):
    from zerolm.align.ppo import train_ppo

    cfg = _align_config(args, extra, defaults)
    result = train_ppo(cfg, progress=not args.quiet)
    print(
        f"{result['rollouts']} rollouts ({result['skipped_rollouts']} skipped): mean reward "
        f"{result['reward_first']:.3f} (first 3) -> {result['reward_last']:.3f} (last 3)"
    )
    if "final_val_reward" in result:
        print(
            f"held-out prompts: reward {result['final_val_reward']:.3f}, KL to the reference "
            f"{result['final_val_kl']:.3f} nats per reply"
        )
    print(f"model saved to {result['model_dir']}; try: zerolm chat {result['model_dir']}")
    return cfg, result


def cmd_finetune_classify(args, extra, **defaults):
    from zerolm.finetune.classify import finetune_classify

    short = {"classify": {"base_model": args.model}} if args.model else {}
    cfg = _config(args, extra, **merge_dicts(defaults, short))
    r = finetune_classify(cfg, progress=not args.quiet)
    if r.get("final_val_acc") is not None:
        boc = "" if r["boc_lr_acc"] is None else f" | bag-of-characters LR {r['boc_lr_acc']:.1%}"
        boc += f" ({r['boc_lr_seconds']:.0f} s)" if boc else ""
        print(
            f"held-out accuracy on {r['val_rows']} rows: fine-tuned bert {r['final_val_acc']:.1%} "
            f"(macro-F1 {r['final_val_macro_f1']:.3f}; {r['steps']} steps, {r['finetune_seconds']:.0f} s) | "
            f"majority class {r['majority_acc']:.1%}{boc}"
        )
    print(
        f"classifier saved to {r['model_dir']}; try: zerolm classify {r['model_dir']} --input FILE.jsonl"
    )
    return cfg, r


def cmd_classify(args, extra):
    from zerolm.finetune.classify import classify_file

    r = classify_file(
        args.model,
        args.input,
        text_field=args.text_field,
        pair_field=args.pair_field,
        label_field=args.label_field,
        truncation=args.truncation,
        batch_size=args.batch_size,
    )
    for label, p in zip(r["predictions"], r["probs"]):
        print(
            json.dumps({"label": label, "prob": round(p, 4)}, ensure_ascii=False)
            if args.json
            else label
        )
    if "val_acc" in r:
        print(
            f"accuracy {r['val_acc']:.1%} on {r['rows']} labelled rows (macro-F1 {r['val_macro_f1']:.3f})",
            file=sys.stderr,
        )


def _sampling_args(p, temperature: float = 0.8):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling randomness")


def _resume_changed_arg(p):
    p.add_argument(
        "--resume-changed",
        action="store_true",
        help="resume from the newest checkpoint even if the data, tokenizer, model or training settings "
        "changed since (recorded in the checkpoint and log; config key train.resume_changed)",
    )


def _compile_arg(p):
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with an ahead-of-time compiled step: ~2x the tokens/s, after 20-60 s compiling the first time",
    )


def _sampling(args):
    from zerolm.infer.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def cmd_chat(args, extra):
    from zerolm.infer.chat import repl
    from zerolm.infer.engine import decode_layout
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    model = decode_layout(load_model(args.model))
    repl(
        model,
        Tokenizer.load(args.model),
        _sampling(args),
        max_new_tokens=args.max_new_tokens,
        system=args.system,
        seed=args.seed,
        prompt=args.prompt,
        name=args.model,
        compile=args.compile,
    )


def cmd_serve(args, extra):
    import os

    from zerolm.serve.app import Limits, serve

    api_key = args.api_key or os.environ.get("ZEROLM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"zerolm serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
            file=sys.stderr,
        )
    limits = Limits(
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_messages=args.max_messages,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        max_inspect=args.max_inspect,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        shutdown_timeout_s=args.shutdown_timeout,
        max_connections=args.max_connections,
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        limits=limits,
        log_level=args.log_level,
        name=args.name,
        compile=args.compile,
    )


def cmd_eval_poems(args, extra):
    from zerolm.data.poems import eval_requests
    from zerolm.data.prepare import read_docs
    from zerolm.eval.instruct import compare_models

    docs = Path(args.docs) / "val.jsonl"
    if not docs.is_file():
        raise ValueError(
            f"{docs} not found: --docs takes a prepared run's docs/ directory (e.g. runs/speedrun/docs)"
        )
    requests = eval_requests(read_docs(docs), seed=args.seed or 0, limit=args.limit)
    out = compare_models(
        args.models,
        requests,
        reference=args.reference,
        shards=args.shards,
        max_new_tokens=args.max_new_tokens,
        sampling=_sampling(args),
        seed=args.seed,
        say=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(out, ensure_ascii=False))
    return out


def cmd_generate(args, extra):
    from zerolm.infer.engine import Engine, GenerateRequest, decode_layout
    from zerolm.infer.stop import StopStrings
    from zerolm.model import load_model
    from zerolm.tokenizer import EOS, Tokenizer
    from zerolm.tokenizer.stream import StreamDecoder

    model = decode_layout(load_model(args.model))
    tok = Tokenizer.load(args.model)
    prompts = args.prompts or [sys.stdin.read()]
    eos = tok.token_id(EOS)
    ids = [[eos, *tok.encode(p)] for p in prompts]  # eos first: the model starts a new document
    unknown = tok.unknown_ids()
    for p, text in zip(ids, prompts):
        if len(p) > 1 and set(p[1:]) <= unknown:
            raise ValueError(
                f"prompt {text[:40]!r} has only characters the model never saw in training; "
                "write the prompt in the language of its training text"
            )
    req = GenerateRequest(
        max_new_tokens=args.max_new_tokens,
        sampling=_sampling(args),
        stop_token_ids=(eos,),
        seed=args.seed,
        context=args.context,
    )
    engine = Engine(model, compile=args.compile)
    if args.stream and len(prompts) == 1:
        stops, dec = StopStrings(args.stop), StreamDecoder(tok, skip_ids=(eos,))
        sys.stdout.write(prompts[0])
        for step in engine.stream(ids, req):
            text, stopped = stops.feed(dec.push(step[0]))
            sys.stdout.write(text)
            sys.stdout.flush()
            if stopped:
                break
        else:
            sys.stdout.write(stops.feed(dec.flush())[0] + stops.flush())
        sys.stdout.write("\n")
        return
    from zerolm.infer.stop import find_stop

    for prompt, out in zip(prompts, engine.generate(ids, req)):
        text = tok.decode([t for t in out if t != eos])
        cut = find_stop(text, args.stop) if args.stop else None
        print(prompt + (text if cut is None else text[:cut]))
        if len(prompts) > 1:
            print("---")


def cmd_translate(args, extra):
    from zerolm.eval.translation import score, translate_texts
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    model = load_model(args.model)
    if model.cfg.arch != "encdec":
        raise ValueError(
            f"{args.model} is a {model.cfg.arch} model; translate needs an encoder-decoder "
            "(train one with `zerolm pretrain --model.arch=encdec`)"
        )
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise ValueError(f"--input {args.input!r} does not exist")
        texts = path.read_text(encoding="utf-8").splitlines()
    else:
        texts = args.texts or sys.stdin.read().splitlines()
    if not texts:
        raise ValueError(
            "nothing to translate: give texts, --input FILE (one per line) or lines on stdin"
        )
    refs = None
    if args.reference:
        refs = (
            Path(args.reference).read_text(encoding="utf-8").splitlines()
            if Path(args.reference).is_file()
            else None
        )
        if refs is None:
            raise ValueError(f"--reference {args.reference!r} does not exist")
        if len(refs) != len(texts):
            raise ValueError(
                f"{len(texts)} source lines but {len(refs)} reference lines in {args.reference}: "
                "the files must be line-aligned"
            )
    if args.temperature > 0 and args.beam > 1:
        raise ValueError("--temperature > 0 samples one translation: use it with --beam 1")
    sampling = _sampling(args) if args.temperature > 0 else None
    hyps = translate_texts(
        model,
        Tokenizer.load(args.model),
        texts,
        beam=args.beam,
        length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet and len(texts) > args.batch_size,
        too_long="truncate" if args.truncate else "error",
    )
    if args.output:
        from zerolm.files import atomic_write_text

        atomic_write_text(args.output, "".join(h + "\n" for h in hyps))
    elif refs is None or args.show:
        print("\n".join(hyps))
    if refs is not None:
        got, copy = score(hyps, refs), score(texts, refs)
        print(json.dumps({"pairs": len(texts), **got, **{f"copy_{k}": v for k, v in copy.items()}}))


def cmd_import(args, extra):
    from zerolm.interop.hf import import_hf

    out = args.out or f"runs/imported/{Path(args.src).resolve().name}"
    model = import_hf(args.src, out)
    print(
        f"imported {model.cfg.preset} model ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}"
    )


def cmd_inspect(args, extra):
    from zerolm.inspect.accounting import account, format_account
    from zerolm.model import load_model

    model = load_model(args.model)
    a = account(model, context=args.context, batch=args.batch)
    print(json.dumps(a) if args.json else format_account(a, model.cfg))


def cmd_embed(args, extra):
    from zerolm.infer.embed import embed_file

    embed_file(
        args.model,
        args.input,
        args.output,
        field=args.field,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        progress=not args.quiet,
    )


def cmd_tok_train(args, extra):
    cmd_prepare(args, extra, stages=("docs", "tokenizer"))


def _read_text(args) -> str:
    return args.text if args.text is not None else sys.stdin.read()


def cmd_tok_encode(args, extra):
    from zerolm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(_read_text(args))
    if args.tokens:
        print(json.dumps([tok.hf.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))


def cmd_tok_decode(args, extra):
    from zerolm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().replace(",", " ").split()
    try:
        ids = [int(x) for x in raw]
    except ValueError:
        raise ValueError(
            "decode takes integer token ids, e.g. `zerolm tokenizer decode --tokenizer DIR 17 42`"
        ) from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ValueError(
            f"token id(s) {bad[:5]} out of range: this tokenizer has ids 0..{tok.vocab_size - 1}"
        )
    sys.stdout.write(tok.decode(ids) + "\n")


def cmd_config(args, extra):
    print(to_toml(_config(args, extra)), end="")


def cmd_corpora(args, extra):
    from zerolm.data.sources import CORPORA

    for name, desc in CORPORA.items():
        print(f"{name:12s} {desc}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerolm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name, fn, help, inputs=True, parent=sub):
        sp = parent.add_parser(name, help=help, description=help)
        sp.add_argument("--config", help="TOML recipe (see recipes/)")
        sp.add_argument("--out", help="output directory (config key out_dir)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if inputs:
            sp.add_argument("inputs", nargs="*", help=".txt/.jsonl/.parquet files or directories")
            sp.add_argument(
                "--corpus", help="bundled corpus name(s), comma-separated: tang, shakespeare"
            )
        sp.set_defaults(fn=fn)
        return sp

    stage(
        "prepare",
        cmd_prepare,
        "clean, de-duplicate and split text, train a tokenizer, write token shards",
    )
    sp = stage(
        "speedrun",
        cmd_speedrun,
        "the whole pipeline on your text (paths) or a bundled corpus (--corpus; "
        "default tang): prepare, tokenizer, pretrain, samples, then SFT on chat data that fits the text "
        "(--sft.data, else bundled conversations in its language) and a chat transcript",
    )
    sp.add_argument("--no-sft", action="store_true", help="stop after pretraining")
    sp.add_argument(
        "--sft-config",
        help="SFT recipe (default recipes/speedrun-sft.toml); --sft.* overrides apply "
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
        "(recipes/speedrun-dpo.toml or speedrun-ppo.toml) and compare it with the SFT model",
    )
    _resume_changed_arg(sp)
    stage("config", cmd_config, "print the resolved config as TOML")
    sp = stage(
        "pretrain",
        cmd_pretrain,
        "prepare data if needed, then train a next-token model (with "
        "--model.arch=bert: a masked-LM + next-sentence encoder) into OUT/model",
    )
    sp.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    _resume_changed_arg(sp)
    g = sub.add_parser(
        "generate",
        help="continue prompts with a trained model",
        description="continue prompts with a trained model (zerolm model directory)",
    )
    g.add_argument("--model", required=True, help="model directory (e.g. runs/speedrun/model)")
    g.add_argument(
        "prompts",
        nargs="*",
        help="prompt text(s); several are generated as one batch (default: stdin)",
    )
    _sampling_args(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument(
        "--context",
        choices=["truncate", "error"],
        default="truncate",
        help="a prompt longer than the model window: keep its end (with a warning) or fail",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _compile_arg(g)
    g.set_defaults(fn=cmd_generate)
    sp = stage(
        "sft",
        cmd_sft,
        "fine-tune a model on conversations (full, or LoRA with --lora.rank=R)",
        inputs=False,
    )
    sp.add_argument("--model", help="base model directory (config key sft.base_model)")
    _resume_changed_arg(sp)
    sp = stage(
        "reward",
        cmd_reward,
        "train a reward model on preference pairs (--align.data, --align.builtin=poems,hhh)",
        inputs=False,
    )
    sp.add_argument("--model", help="the SFT model to start from (config key align.base_model)")
    _resume_changed_arg(sp)
    sp = stage(
        "dpo",
        cmd_dpo,
        "align a chat model with DPO on preference pairs (full, or LoRA with --lora.rank=R)",
        inputs=False,
    )
    sp.add_argument(
        "--model",
        help="the SFT model: the policy's start and the reference (config key align.base_model)",
    )
    _resume_changed_arg(sp)
    sp = stage(
        "ppo",
        cmd_ppo,
        "RLHF: train a chat model against a reward (--align.reward: poem-form, a reward model "
        "directory, or module:function) with PPO, or GRPO with --align.advantage=group",
        inputs=False,
    )
    sp.add_argument(
        "--model",
        help="the SFT model: the policy's start and the reference (config key align.base_model)",
    )
    _resume_changed_arg(sp)
    sp = stage(
        "finetune-classify",
        cmd_finetune_classify,
        "fine-tune a bert model to classify texts (--classify.data="
        "F.jsonl or --classify.builtin=tang-authors); prints held-out accuracy next to the majority class and a "
        "bag-of-characters logistic regression",
        inputs=False,
    )
    sp.add_argument(
        "--model", help="the pretrained bert model directory (config key classify.base_model)"
    )
    _resume_changed_arg(sp)
    cl = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier (accuracy if rows have labels)",
        description="print the predicted label of every row of a JSONL file (or .txt: one text per "
        "line); with a label in every row, also the accuracy (stderr)",
    )
    cl.add_argument("model", help="classifier directory (finetune-classify's OUT/model)")
    cl.add_argument(
        "--input", required=True, help="JSONL rows with --text-field (and --label-field), or .txt"
    )
    cl.add_argument("--text-field", default="text")
    cl.add_argument(
        "--pair-field", default="", help="a second text per row (sentence-pair classifiers)"
    )
    cl.add_argument("--label-field", default="label")
    cl.add_argument(
        "--truncation",
        choices=["longest_first", "error"],
        default="longest_first",
        help="a row longer than the window: cut the longer text from its end (with a warning), or fail",
    )
    cl.add_argument("--batch-size", type=int, default=64)
    cl.add_argument(
        "--json", action="store_true", help="one JSON object per row: label and its probability"
    )
    cl.set_defaults(fn=cmd_classify)
    c = sub.add_parser(
        "chat",
        help="talk to a chat model (interactive, streaming)",
        description="talk to a chat model: an interactive REPL with streaming replies and the "
        "conversation kept within the model window. Type /help in it for its commands.",
    )
    c.add_argument("model", help="model directory (e.g. runs/speedrun/sft/model)")
    c.add_argument("--prompt", help="one message: print the reply and exit")
    c.add_argument("--system", default="", help="system message")
    _sampling_args(c, temperature=0.7)
    _compile_arg(c)
    c.set_defaults(fn=cmd_chat, max_new_tokens=96)
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible API + web chat UI (continuous batching)",
        description="serve a model: the OpenAI API at /v1 (chat/completions, completions, models), "
        "a web chat UI with an inspector at /, /health and /metrics.",
    )
    sv.add_argument("model", help="model directory (e.g. runs/speedrun/sft/model)")
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--name",
        help="model id in the API (default: the directory's name, or its parent's for .../model)",
    )
    sv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set ZEROLM_API_KEY)"
    )
    sv.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)"
    )
    sv.add_argument(
        "--max-queue", type=int, default=64, help="waiting sequences before 503 + Retry-After"
    )
    sv.add_argument(
        "--max-tokens", type=int, default=512, help="limit (and default) for max_tokens per choice"
    )
    sv.add_argument("--max-n", type=int, default=8, help="limit for n (choices per request)")
    sv.add_argument(
        "--max-messages", type=int, default=256, help="limit for messages per chat request"
    )
    sv.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="limit for prompt tokens (default: window-1)",
    )
    sv.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="limit for a request body (413 above)"
    )
    sv.add_argument(
        "--max-inspect", type=int, default=2, help="inspector calls at once (503 above)"
    )
    sv.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open sockets at most, lowered to fit the fd limit (the oldest idle one is closed, else 503)",
    )
    sv.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds for a request head to arrive whole",
    )
    sv.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds for a request body to arrive (408)",
    )
    sv.add_argument(
        "--keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open"
    )
    sv.add_argument(
        "--shutdown-timeout",
        type=int,
        default=10,
        help="on SIGTERM/Ctrl-C, seconds before running requests and streams are cancelled",
    )
    sv.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level (info logs every request)",
    )
    _compile_arg(sv)
    sv.set_defaults(fn=cmd_serve)
    ev = sub.add_parser(
        "eval-poems", help="share of held-out poem requests answered in the requested form"
    )
    ev.add_argument(
        "models", nargs="+", help="model directories to compare (e.g. the base and the SFT model)"
    )
    ev.add_argument(
        "--docs",
        default="runs/speedrun/docs",
        help="prepared docs/ whose val.jsonl holds the requests",
    )
    ev.add_argument("--limit", type=int, default=200, help="number of held-out requests")
    ev.add_argument(
        "--reference",
        help="also measure each model's KL to this model (e.g. the SFT model): replies "
        "sampled at temperature 1 on the same requests",
    )
    ev.add_argument(
        "--shards",
        help="also measure validation bits per byte on these token shards (e.g. "
        "runs/speedrun/shards)",
    )
    _sampling_args(ev, temperature=0.0)
    ev.set_defaults(fn=cmd_eval_poems, max_new_tokens=96)
    tr = sub.add_parser(
        "translate",
        help="translate with an encoder-decoder model (BLEU/chrF with --reference)",
        description="translate texts with an encdec model: beam search by default, greedy with "
        "--beam 1, sampling with --temperature > 0.",
    )
    tr.add_argument("model", help="encdec model directory (e.g. runs/bible/model)")
    tr.add_argument(
        "texts", nargs="*", help="texts to translate (default: --input, or lines on stdin)"
    )
    tr.add_argument("--input", help="a text file, one source per line")
    tr.add_argument(
        "--reference",
        help="line-aligned reference translations: print BLEU and chrF (with the "
        "copy-the-source baseline) as JSON",
    )
    tr.add_argument(
        "--output", help="write the translations here (one per line) instead of printing them"
    )
    tr.add_argument(
        "--show", action="store_true", help="with --reference: print the translations too"
    )
    tr.add_argument("--beam", type=int, default=4, help="beam width (1: greedy)")
    tr.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam scores are log-prob / length**this"
    )
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument(
        "--truncate",
        action="store_true",
        help="cut sources longer than the encoder window (default: an error)",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    _sampling_args(tr, temperature=0.0)
    tr.set_defaults(fn=cmd_translate, max_new_tokens=None)
    im = sub.add_parser(
        "import", help="make a local HF gpt2/llama checkpoint a zerolm model directory"
    )
    im.add_argument(
        "src", help="directory with config.json + model.safetensors (transformers layout)"
    )
    im.add_argument("--from", dest="source", choices=["hf"], default="hf")
    im.add_argument("--out", help="output model directory (default: runs/imported/NAME)")
    im.set_defaults(fn=cmd_import)
    ins = sub.add_parser("inspect", help="parameters by component, FLOPs per token, memory")
    ins.add_argument("model", help="model directory")
    ins.add_argument(
        "--context", type=int, default=None, help="context length (default: the model's)"
    )
    ins.add_argument("--batch", type=int, default=1, help="batch size for the KV-cache figure")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(fn=cmd_inspect)
    em = sub.add_parser(
        "embed",
        help="sentence embeddings from a bert model (mean-pooled, L2-normalised)",
        description="embed texts with a bert model (e.g. an imported all-MiniLM-L6-v2): the mean "
        "of the final hidden states over each text's tokens, L2-normalised, so dot "
        "products are cosine similarities. Texts longer than the window (or "
        "--max-tokens) are truncated with a warning.",
    )
    em.add_argument("model", help="bert model directory")
    em.add_argument(
        "--input",
        required=True,
        help="a .txt file (one text per line) or .jsonl (field --field); blank lines are skipped",
    )
    em.add_argument(
        "--output",
        help="OUT.jsonl (rows {text, embedding}) or OUT.npy ((N, D) float32, input "
        "order); default: JSONL on stdout",
    )
    em.add_argument("--field", default="text", help="the text field of .jsonl rows")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="truncate texts to this many tokens with [CLS] and "
        "[SEP] (default: the model window; sentence-transformers uses 256 for all-MiniLM-L6-v2)",
    )
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(fn=cmd_embed)

    tk = sub.add_parser("tokenizer", help="train, encode, decode").add_subparsers(
        dest="tcmd", required=True, metavar="ACTION"
    )
    stage("train", cmd_tok_train, "train a tokenizer (bpe, wordpiece or char) on text", parent=tk)
    for name, fn, help in (
        ("encode", cmd_tok_encode, "text (argument or stdin) -> token ids"),
        ("decode", cmd_tok_decode, "token ids (arguments or stdin) -> text"),
    ):
        sp = tk.add_parser(name, help=help, description=help)
        sp.add_argument(
            "--tokenizer", required=True, help="tokenizer.json or a directory holding one"
        )
        if name == "encode":
            sp.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
            sp.add_argument(
                "--tokens", action="store_true", help="print token strings instead of ids"
            )
        else:
            sp.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
        sp.set_defaults(fn=fn)
    sub.add_parser("corpora", help="list the bundled corpora").set_defaults(fn=cmd_corpora)
    return p


def _join_overrides(argv: list[str]) -> list[str]:
    """['--out_dir', 'x'] -> ['--out_dir=x'] for config keys, so argparse cannot take 'x' for a
    positional input file."""
    top = {f.name for f in dataclasses.fields(Config)}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        key = a[2:].replace("-", "_")
        if (
            a.startswith("--")
            and "=" not in a
            and key.split(".")[0] in top
            and i + 1 < len(argv)
            and not argv[i + 1].startswith("--")
        ):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(
        _join_overrides(sys.argv[1:] if argv is None else list(argv))
    )
    takes_overrides = hasattr(args, "config")
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args, extra)
    except ValueError as e:
        print(f"zerolm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from zerolm.files import disk_full

        if not disk_full(e):
            raise
        print(
            f"zerolm: error: the disk is full{f' (writing {e.filename})' if e.filename else ''}: free space and "
            "run the command again (every output is written atomically: nothing partial was kept)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("zerolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

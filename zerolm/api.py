"""The Python API: load a model directory to generate, chat or embed; train a stage from a config.

    import zerolm
    m = zerolm.load("runs/speedrun/sft/model")
    m.chat("写一首李白风格的五言绝句", seed=0)
    zerolm.fit("tang", stage="pretrain", out_dir="runs/tang", train={"steps": 100})

Each call does what its command does (`zerolm generate`, `zerolm chat --prompt`, `zerolm embed`,
`zerolm pretrain`, `zerolm sft`, ...) through the same library functions; docs/python-api.md.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zerolm.config import Config, load_config, merge_dicts
from zerolm.infer.chat import chat_request, fit_history, stream_reply
from zerolm.infer.embed import embed_texts
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.infer.stop import find_stop
from zerolm.infer.text import encode_prompts
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer

# command name -> (module, entry function, the config section whose base_model `model=` sets)
STAGES = {
    "prepare": ("zerolm.data.prepare", "prepare", None),
    "pretrain": ("zerolm.train.pretrain", "pretrain", None),
    "sft": ("zerolm.finetune.sft", "sft", "sft"),
    "reward": ("zerolm.align.reward", "train_reward", "align"),
    "dpo": ("zerolm.align.dpo", "train_dpo", "align"),
    "ppo": ("zerolm.align.ppo", "train_ppo", "align"),
    "finetune-classify": ("zerolm.finetune.classify", "finetune_classify", "classify"),
}


def _sampling(defaults: dict, given: dict) -> SamplingParams:
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    if unknown := sorted(set(given) - set(names)):
        raise ValueError(f"unknown sampling option {unknown[0]!r}; valid: {', '.join(names)}")
    return SamplingParams(**{**defaults, **given})


class Model:
    """A loaded model directory: its module (`.model`), tokenizer (`.tokenizer`) and an engine.

    Decoders generate and chat; bert models embed. compile=True decodes with the ahead-of-time
    compiled step, as `zerolm generate --compile` does (20-60 s the first time per batch size).
    """

    def __init__(self, path: str | Path, compile: bool = False):
        self.path = Path(path)
        self.model = load_model(self.path)
        self.tokenizer = Tokenizer.load(self.path)
        self.compile = compile
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        cfg = self.model.cfg
        return (
            f"zerolm.Model({str(self.path)!r}, {cfg.arch}/{cfg.preset}, window {cfg.max_seq_len})"
        )

    def _decoder_engine(self, what: str) -> Engine:
        if self.model.cfg.arch != "decoder":
            raise ValueError(
                f"{what} needs a decoder model; {self.path} is a {self.model.cfg.arch} model"
            )
        if self._engine is None:
            self._engine = Engine(self.model, compile=self.compile)
        return self._engine

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        seed: int | None = None,
        context: str = "truncate",
        **sampling: Any,
    ) -> str | list[str]:
        """The continuation of each prompt (without the prompt), as `zerolm generate` prints it;
        several prompts decode as one batch. sampling: SamplingParams fields (temperature=0 is
        greedy; default 0.8 as on the command line), e.g. top_p=0.9, repetition_penalty=1.1."""
        engine = self._decoder_engine("generate")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tok = self.tokenizer
        ids = encode_prompts(tok, prompts)  # eos first: the model starts a document
        req = GenerateRequest(
            max_new_tokens=max_new_tokens,
            sampling=_sampling({"temperature": 0.8}, sampling),
            stop_token_ids=tok.eos_ids,
            seed=seed,
            context=context,
        )
        texts = []
        for out in engine.generate(ids, req):
            text = tok.decode([t for t in out if t not in tok.eos_ids])
            cut = find_stop(text, list(stop)) if stop else None
            texts.append(text if cut is None else text[:cut])
        return texts[0] if isinstance(prompt, str) else texts

    def chat(
        self,
        messages: str | Sequence[dict],
        *,
        max_new_tokens: int = 96,
        system: str = "",
        seed: int | None = None,
        **sampling: Any,
    ) -> str:
        """The assistant's reply to a conversation ([{"role", "content"}, ...], or one user
        message as a string), as `zerolm chat --prompt` prints it: at most half the window,
        the oldest turns dropped to fit. sampling: as in generate (default temperature 0.7)."""
        engine = self._decoder_engine("chat")
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        msgs = ([{"role": "system", "content": system}] if system else []) + list(msgs)
        window = self.model.cfg.max_seq_len
        max_new = max(1, min(max_new_tokens, window // 2))
        msgs = fit_history(self.tokenizer, msgs, window - max_new)
        sp = _sampling({"temperature": 0.7}, sampling)
        req = chat_request(self.tokenizer, max_new, sp, seed)
        return "".join(stream_reply(engine, self.tokenizer, msgs, req))

    def embed(
        self, texts: str | Sequence[str], *, batch_size: int = 32, max_tokens: int = 0
    ) -> np.ndarray:
        """L2-normalised mean-pooled embeddings of a bert model, as `zerolm embed` writes them:
        (N, D) float32 for a list of texts, (D,) for one. max_tokens: 0 is the model window."""
        rows = [texts] if isinstance(texts, str) else list(texts)
        vectors = embed_texts(self.model, self.tokenizer, rows, batch_size, max_tokens)
        return vectors[0] if isinstance(texts, str) else vectors


def load(path: str | Path, *, compile: bool = False) -> Model:
    """Load a zerolm model directory (config.json + model.safetensors + tokenizer files)."""
    return Model(path, compile=compile)


def _nest(overrides: dict) -> dict:
    """{'train.steps': 5, 'out_dir': 'x'} -> {'train': {'steps': 5}, 'out_dir': 'x'}."""
    out: dict = {}
    for key, value in overrides.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        out = merge_dicts(out, value)
    return out


def fit(
    config: Config | str | Path | None = None,
    *,
    stage: str = "pretrain",
    base_model: str | Path | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Run one stage, as `zerolm STAGE --config CONFIG --KEY=VALUE ...` does; returns its result.

    config: a Config, a TOML recipe path, or None (the defaults). overrides: config keys, as
    sections (train={"steps": 100}) or dotted (**{"train.steps": 100}); they win over config.
    base_model: the model sft, reward, dpo, ppo and finetune-classify start from (--model).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    module, fn, section = STAGES[stage]
    values = _nest(overrides)
    if base_model is not None:
        if section is None:
            raise ValueError(f"{stage} starts from no model: drop base_model= (use out_dir=)")
        values = merge_dicts({section: {"base_model": str(base_model)}}, values)
    if isinstance(config, Config):
        cfg = load_config(None, merge_dicts(dataclasses.asdict(config), values))
    else:
        cfg = load_config(config, values)
    return getattr(importlib.import_module(module), fn)(cfg, progress=progress)

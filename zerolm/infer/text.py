"""Text in, text out over the token-id engine: what `zerolm generate` runs.

The engine speaks ids only (DESIGN §3.9); here prompts are encoded (an EOS first, so the model
starts a new document), continuations decoded and cut at the first stop string.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

from zerolm.config import SampleConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.infer.stop import StopStrings, find_stop
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.stream import StreamDecoder
from zerolm.transforms.layout import decode_layout


def sampling_params(cfg: SampleConfig) -> SamplingParams:
    """The token-picking part of a [sample] section."""
    return SamplingParams(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        presence_penalty=cfg.presence_penalty,
        frequency_penalty=cfg.frequency_penalty,
    )


def encode_prompts(tok: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """EOS + the prompt's ids; a prompt made only of characters unseen in training is an error."""
    ids = tok.completion_ids(prompts)
    unknown = tok.unknown_ids()
    for p, text in zip(ids, prompts):
        if len(p) > 1 and set(p[1:]) <= unknown:
            raise ValueError(
                f"prompt {text[:40]!r} has only characters the model never saw in training; "
                "write the prompt in the language of its training text"
            )
    return ids


class TextGenerator:
    """A model directory loaded for decoding with one [sample] section. tp > 1: this process is one
    of the tp ranks of a torchrun job, holding its shard of every block (dist/tensor.py); all ranks
    decode the same prompts with rank 0's seed, so they pick the same tokens."""

    def __init__(self, model_dir: str | Path, cfg: SampleConfig, tp: int = 1):
        if tp > 1:
            from zerolm.dist import group
            from zerolm.dist.tensor import check_launch, mesh, tensor_parallel

            check_launch(tp, cfg.compile)
            tp_mesh = mesh(tp)  # nccl on CUDA: each rank's weights on its own GPU
            device = tp_mesh.device_type if tp_mesh.device_type == "cuda" else "cpu"
            self.model = tensor_parallel(load_model(model_dir, device=device), tp_mesh)
            seed = cfg.seed if cfg.seed is not None else random.randrange(2**63)
            cfg = dataclasses.replace(cfg, seed=group.broadcast(seed))
        else:
            self.model = decode_layout(load_model(model_dir))
        self.tok = Tokenizer.load(model_dir)
        self.cfg = cfg
        self.eos = self.tok.eos_ids

    def _run(self, prompts: list[str]) -> tuple[Engine, list[list[int]], GenerateRequest]:
        ids = encode_prompts(self.tok, prompts)
        req = GenerateRequest(
            max_new_tokens=self.cfg.max_new_tokens,
            sampling=sampling_params(self.cfg),
            stop_token_ids=self.eos,
            seed=self.cfg.seed,
            context=self.cfg.context,
        )
        return Engine(self.model, compile=self.cfg.compile), ids, req

    def generate(self, prompts: list[str]) -> list[str]:
        """Each prompt followed by its continuation (decoded as one batch), cut at a stop string."""
        engine, ids, req = self._run(prompts)
        texts = []
        for prompt, out in zip(prompts, engine.generate(ids, req)):
            text = self.tok.decode([t for t in out if t not in self.eos])
            cut = find_stop(text, list(self.cfg.stop)) if self.cfg.stop else None
            texts.append(prompt + (text if cut is None else text[:cut]))
        return texts

    def stream(self, prompt: str) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as tokens complete characters."""
        engine, ids, req = self._run([prompt])
        stops, dec = StopStrings(list(self.cfg.stop)), StreamDecoder(self.tok, skip_ids=self.eos)
        for step in engine.stream(ids, req):
            text, stopped = stops.feed(dec.push(step[0]))
            yield text
            if stopped:
                return
        yield stops.feed(dec.flush())[0] + stops.flush()

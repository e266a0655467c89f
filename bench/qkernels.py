"""The quantized matrix-vector kernels torch already has, measured on one model's shapes and
weights (issue 22 §3, "measure what exists first"): batch-1 decode tokens/s of SmolLM2-135M (or
any --model-dir) with every linear layer and the head running one kernel:

  fp32        nn.Linear / F.linear on the float weights (the reference)
  int8pack    aten._weight_int8pack_mm, int8 per output channel (no groups), x fp32 or bf16
  int4pack    aten._weight_int4pack_mm_for_cpu, int4 groups of 32 (Q4_0's codes), x fp32 or bf16
  ao_dynamic  torch.ao.quantization.quantize_dynamic: int8 per-tensor weights, int8 activations
  zerolm      zerolm's QuantLinear pure-torch path (dequantize + F.linear), int8 / int4 g32

For each: `matvec` = 1 / time of only the products of one decode step (121 + head, no attention),
`eager` = Engine decode of --new tokens, and (--compile) `compiled` = Engine(compile=True), the
step exported and compiled by AOTInductor with the kernel inside. Prints one JSON line.

    .venv/bin/python bench/qkernels.py --model-dir /tmp/smol [--threads 1,2] [--new 64] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.config import QuantConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.quant.formats import quantize, unpack_int4
from zerolm.quant.linear import quant_layers
from zerolm.transforms.layout import decode_layout
from zerolm.transforms.quantize import quantize_model


class Int8Pack(nn.Module):
    """int8 per output channel through aten._weight_int8pack_mm (x in `dtype`)."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q = quantize(w, 8, 0)
        self.dtype, self.in_features = dtype, w.shape[1]
        self.register_buffer("q", q.qweight)
        self.register_buffer("s", q.scales[:, 0].to(dtype))

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, x.shape[-1]).to(self.dtype), self.q, self.s
        )
        return y.reshape(*x.shape[:-1], -1).float()


class Int4Pack(nn.Module):
    """Q4_0's codes (int4 sym, groups of 32) through aten._weight_int4pack_mm_for_cpu."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q = quantize(w, 4, 32, "sym")
        self.dtype, self.in_features = dtype, w.shape[1]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(q.qweight).to(torch.int32), 2
        )
        sz = torch.stack([q.scales.t().to(dtype), torch.zeros_like(q.scales.t(), dtype=dtype)], -1)
        self.register_buffer("p", packed)
        self.register_buffer("sz", sz.contiguous())

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.p, 32, self.sz)
        return y.reshape(*x.shape[:-1], -1).float()


class Head(nn.Module):
    """A tied head as its own module: embedding rows looked up in float, `project` = `lin`."""

    def __init__(self, emb: nn.Embedding, lin: nn.Module):
        super().__init__()
        self.weight, self.lin = emb.weight, lin

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def project(self, hidden):
        return self.lin(hidden)


def swap_linears(model, make) -> None:
    """Every nn.Linear (after decode_layout) and the tied head -> make(weight)."""
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(mod.weight.detach()))
    model.tok_emb = Head(model.tok_emb, make(model.tok_emb.weight.detach()))


def variants(base) -> dict:
    """name -> a model in its decode layout running that kernel."""

    def swapped(make):
        m = copy.deepcopy(base)
        swap_linears(m, make)
        return m

    def lin(w):
        out = nn.Linear(w.shape[1], w.shape[0], bias=False)
        out.weight.data = w.clone()
        return out

    def zerolm(method, head):
        m = quantize_model(copy.deepcopy(base), QuantConfig(method=method, head=head))
        return decode_layout(m)

    out = {
        "fp32": decode_layout(copy.deepcopy(base)),
        "int8pack_fp32x": swapped(lambda w: Int8Pack(w, torch.float32)),
        "int8pack_bf16x": swapped(lambda w: Int8Pack(w, torch.bfloat16)),
        "int4pack_fp32x": swapped(lambda w: Int4Pack(w, torch.float32)),
        "int4pack_bf16x": swapped(lambda w: Int4Pack(w, torch.bfloat16)),
        "zerolm_int8": zerolm("int8", "int8"),
        "zerolm_int4": zerolm("int4", "int4"),
    }
    ao = swapped(lin)
    out["ao_dynamic"] = torch.ao.quantization.quantize_dynamic(ao, {nn.Linear}, dtype=torch.qint8)
    return out


def products(model) -> list[nn.Module]:
    """The modules one decode step multiplies by: its linears and its head."""
    kinds = (nn.Linear, Int8Pack, Int4Pack, torch.ao.nn.quantized.dynamic.Linear)
    found: list = [m for m in model.modules() if isinstance(m, kinds)]
    found += list(quant_layers(model).values())
    if type(model.tok_emb) is nn.Embedding:
        found.append(None)  # the float tied head: F.linear on the embedding
    return found


@torch.inference_mode()
def matvec_tps(model, repeats=10) -> float:
    mods = products(model)
    head = model.tok_emb.weight  # float (V, D): the tied head where it is not swapped

    def step():
        for m in mods:
            if m is None:
                F.linear(x[head.shape[1]], head)
            else:
                getattr(m, "project", m)(x[m.in_features])  # a QuantEmbedding: its head

    x = {m.in_features: torch.randn(1, m.in_features) for m in mods if m is not None}
    x[head.shape[1]] = torch.randn(1, head.shape[1])
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times)


def decode_tps(engine, new: int, repeats: int) -> float:
    req = GenerateRequest(max_new_tokens=new, sampling=SamplingParams(temperature=0.0))
    engine.generate([[1, 2, 3, 4]], GenerateRequest(max_new_tokens=4))  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate([[1, 2, 3, 4]], req)
        times.append(time.perf_counter() - t0)
    return new / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    args = ap.parse_args()
    models = variants(load_model(args.model_dir).eval())
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.threads.split(",")):
            torch.set_num_threads(n)
            for name, m in models.items():
                row = {"matvec": round(matvec_tps(m), 1)}
                row["eager"] = round(decode_tps(Engine(m), args.new, args.repeats), 1)
                if args.compile and name != "ao_dynamic":
                    eng = Engine(m, compile=True, program_dir=tmp)
                    row["compiled"] = round(decode_tps(eng, args.new, args.repeats), 1)
                    row["compiled_ok"] = eng.compiled
                rows.setdefault(name, {})[str(n)] = row
                print(name, n, row, file=sys.stderr, flush=True)
    print(json.dumps({"load": os.getloadavg(), "new": args.new, "tok_per_s": rows}))


if __name__ == "__main__":
    main()

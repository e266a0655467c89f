#!/usr/bin/env bash
# Build llama.cpp once, from the llama.cpp that the llama-cpp-python 0.3.36 sdist vendors (MIT), into a
# cache outside the repository. The GGUF tests marked `llama_cpp` use it as the reference engine.
#   bash scripts/build_llama_cpp.sh        about 10 minutes on 2 cores; a second run is instant
# Result: $ZEROLM_TEST_CACHE/llama.cpp-0.3.36/bin/{llama-cli,llama-completion,llama-simple,
#   llama-tokenize,llama-bench,llama-perplexity,llama-quantize} (ZEROLM_TEST_CACHE defaults to ~/.cache/zerolm-test).
# LLAMA_CPP_TARBALL=path/to/llama_cpp_python-0.3.36.tar.gz uses a downloaded sdist instead of pip download.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${ZEROLM_TEST_CACHE:-$HOME/.cache/zerolm-test}"
dest="$cache/llama.cpp-0.3.36"
tools=(llama-cli llama-completion llama-simple llama-tokenize llama-bench llama-perplexity llama-quantize)
have=1
for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || have=0; done
if [ "$have" = 1 ] && [ -f "$dest/bin/.complete" ]; then
  echo "llama.cpp: already built in $dest/bin"
  exit 0
fi
rm -f "$dest/bin/.complete"
command -v cmake >/dev/null || { echo "llama.cpp: cmake is missing; install it (apt-get install cmake g++)" >&2; exit 1; }
mkdir -p "$dest"
if [ ! -f "$dest/src/CMakeLists.txt" ]; then  # unpacked once: a rebuild after it is incremental
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  sdist="${LLAMA_CPP_TARBALL:-}"
  if [ -z "$sdist" ]; then
    echo "llama.cpp: fetching the llama-cpp-python 0.3.36 sdist" >&2
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp"
    sdist="$tmp/llama_cpp_python-0.3.36.tar.gz"
  fi
  rm -rf "$dest/src"
  tar xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/*' --exclude '*/vendor/llama.cpp/models/*'
  mv "$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp" "$dest/src"
  rm -f "$dest/src/.git"  # a submodule pointer into the sdist's own .git, which is not unpacked
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
echo "llama.cpp: configuring (GGML_NATIVE=ON: tuned to this CPU)" >&2
cmake -S "$dest/src" -B "$dest/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF >/dev/null
echo "llama.cpp: building ${tools[*]} with $(nproc) jobs (about 10 minutes on 2 cores)" >&2
cmake --build "$dest/build" --config Release -j "$(nproc)" --target "${tools[@]}"
mkdir -p "$dest/bin"
for t in "${tools[@]}"; do cp "$dest/build/bin/$t" "$dest/bin/"; done
touch "$dest/bin/.complete"
echo "llama.cpp: built into $dest/bin"

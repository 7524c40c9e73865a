#!/usr/bin/env bash
# MFU of an XL-width ProtT5 slice on one GPU (prepared for a device machine).
#
#   bash benchmarks/gpu_train.sh            # on a machine with an NVIDIA GPU
#
# Installs jax[cuda] at the pinned jax version into .venv-gpu (the CPU venv
# stays untouched), then times the train step of ProtT5 at XL width
# (d_model 1024, 32 heads × 128, d_ff 16384) with 4 + 4 layers, bfloat16
# activations, batch 32 × 512, Adafactor, and prints JSON lines (MFU against the
# card's bf16 dense peak: H100 SXM 989 TFLOP/s, H200 the same). Not yet run:
# the session that wrote it had no device machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu
JAX_VERSION=$(grep '^jax==' constraints.txt | cut -d= -f3)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -c constraints.txt -e '.[test]'
  # The CUDA extra must match the driver: JAX_CUDA_EXTRA=cuda12 (default) or cuda13.
  "$VENV/bin/pip" install --quiet "jax[${JAX_CUDA_EXTRA:-cuda12}]==${JAX_VERSION}"
fi
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
exec "$VENV/bin/python" benchmarks/train_step.py --models prot_t5_xl_slice --no-hf \
  --batch "${BATCH:-32}" --length 512 --steps "${STEPS:-10}" --bf16 --bert-layers 0 \
  --peak_flops "${PEAK_TFLOPS}e12" "$@"

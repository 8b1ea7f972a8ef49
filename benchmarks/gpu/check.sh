#!/usr/bin/env bash
# plateflow's GPU checks on a CUDA host, in one run sized for a short window:
#
#   bash benchmarks/gpu/check.sh OUT [tests] [bench]      (both when neither is named)
#
# tests  the suite that runs plateflow's model steps (embedding, the refresh's GPU step, heads,
#        segmentation, fine-tuning, several devices) on the GPU: PLATEFLOW_TEST_DEVICE=cuda, the
#        tests marked gpu included (the VRAM budget of dinov2_base); OUT/gpu-tests.{log,xml}
# bench  benchmarks/embed.py for dinov2_base, dinov3_base and siglip_base (224 px, the GPU
#        class's dtype and batch; eager and compiled); OUT/embed.{log,json}. EMBED_MODELS and
#        EMBED_COMPILE (torch.compile modes, space-separated; empty: eager only) change them.
#
# OUT/device.txt: the card, the driver, the versions, plateflow's hardware report. The packages
# come from `uv sync`, or on a host without a package index from the wheels of
# benchmarks/gpu/wheels.py installed under PYTHONPATH. Exit status: 0 when every part passed.
#
# A rehearsal on a machine without a GPU (the script and the packages, not CUDA):
#   PLATEFLOW_TEST_DEVICE=cpu EMBED_MODELS=tiny_dinov2,tiny_dinov3,tiny_siglip EMBED_COMPILE= \
#     bash benchmarks/gpu/check.sh OUT
set -uo pipefail
out=${1:?usage: benchmarks/gpu/check.sh OUT [tests] [bench]}
shift
parts=" ${*:-tests bench} "
cd "$(dirname "$0")/../.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PLATEFLOW_TEST_DEVICE=${PLATEFLOW_TEST_DEVICE:-cuda}
marks="not browser and not server"
[[ $PLATEFLOW_TEST_DEVICE == cuda ]] || marks="$marks and not gpu"  # a rehearsal: what needs CUDA stays out
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PREFECT_HOME="$(mktemp -d)"
trap 'rm -rf "$PREFECT_HOME"' EXIT
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$py" -c "import torch, timm, prefect, PIL, numpy, pyarrow; print('python', __import__('sys').version.split()[0],
    '| torch', torch.__version__, 'cuda', torch.version.cuda, '| timm', timm.__version__, '| prefect', prefect.__version__,
    '| pillow', PIL.__version__, '| numpy', numpy.__version__, '| pyarrow', pyarrow.__version__)"
  "$py" -c "from app.cli import app; app(['hardware'])"
} 2>&1 | tee "$out/device.txt"
status=0
if [[ $parts == *" tests "* ]]; then
  "$py" -m pytest -p no:cacheprovider -q -m "$marks" --durations=15 \
    --junitxml="$out/gpu-tests.xml" tests/unit/plateflow/test_embeddings.py tests/flows/test_pipeline_flow.py \
    tests/flows/test_devices.py tests/flows/test_models.py tests/flows/test_heads.py \
    tests/flows/test_segmentation.py tests/flows/test_finetune.py 2>&1 | tee "$out/gpu-tests.log" || status=1
fi
if [[ $parts == *" bench "* ]]; then
  modes=${EMBED_COMPILE-default}  # the torch.compile modes timed besides eager, space-separated (empty: none)
  # shellcheck disable=SC2086 # the modes are words: --compile default max-autotune-no-cudagraphs
  "$py" benchmarks/embed.py --models "${EMBED_MODELS:-dinov2_base,dinov3_base,siglip_base}" ${modes:+--compile $modes} 2>&1 \
    | tee "$out/embed.log" || status=1
  cp benchmarks/results/embed.json "$out/embed.json" || status=1
fi
exit $status

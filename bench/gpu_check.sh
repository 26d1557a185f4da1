#!/usr/bin/env bash
# The GPU check (issue 13): on one GPU, or on the CPU where torch sees none,
#   1. the tiny pipeline (configs/tiny.yaml) under `dvc repro` in a scratch copy, every stage that runs a network
#      on the device: the Ray Train stages with scaling.use_gpu, the sweep's trials with sweep.gpus_per_trial, the
#      others with project.device;
#   2. `python -m bench.gpu`: training and DDIM sampling samples/s and peak memory of the default model and of the
#      equal-FLOP pair (ours, diffusers' UNet2DModel), fp32 and bf16 -> bench/gpu_results.json.
# Usage: bench/gpu_check.sh [--no-pipeline] [bench.gpu options: --quick --compile --models ... --out PATH]
#        (PY=path/to/python for another interpreter; CUDA_VISIBLE_DEVICES= forces the CPU fallback)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pipeline=1 bench_args=()
for arg in "$@"; do
  if [ "$arg" = --no-pipeline ]; then pipeline=0; else bench_args+=("$arg"); fi
done
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
echo "gpu_check: device $device ($("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device: CPU fallback')"))"
if [ "$pipeline" = 1 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  git ls-files -z | xargs -0 cp --parents -t "$work"
  "$PY" - "$work/params.yaml" "$device" <<'PYEOF'
import sys, yaml
raw = yaml.safe_load(open("configs/tiny.yaml"))
gpu = sys.argv[2] == "cuda"
raw["project"]["device"] = sys.argv[2]
for stage in ("train_diffusion", "train_classifier"):
    raw[stage]["scaling"]["use_gpu"] = gpu
raw["sweep"]["gpus_per_trial"] = 0.5 if gpu else 0  # two trials share the one GPU
open(sys.argv[1], "w").write(yaml.safe_dump(raw, sort_keys=False))
PYEOF
  bindir=$(cd "$(dirname "$PY")" && pwd)  # the venv's python and dvc, for the stages dvc starts
  start=$(date +%s)
  (cd "$work" && export PATH="$bindir:$PATH" && dvc config core.no_scm true && dvc repro)
  echo "gpu_check: tiny pipeline on $device in $(( $(date +%s) - start )) s: $(cat "$work/metrics/train_diffusion.json")"
fi
"$PY" -m bench.gpu --device "$device" "${bench_args[@]}"

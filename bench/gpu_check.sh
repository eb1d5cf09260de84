#!/usr/bin/env bash
# The GPU check of the correctness work (issue 12), for a machine with NVIDIA GPUs:
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. the `gpu`-marked tests (CPU tensors through an NCCL group);
# 2. one Ray worker on CUDA with bf16: train 20 steps (checkpoint), resume to 40, export;
# 3. torchrun with min(2, GPUs) processes on CUDA with bf16: the same.
# Each run's model/ must hold float32 weights (the fp32 masters) and its final metrics must exist.
# Needs the package installed (README set-up); writes everything under OUT_DIR (default: gpu-check/).
set -euo pipefail
out="$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd)"
device="${GPU_CHECK_DEVICE:-cuda}"  # GPU_CHECK_DEVICE=cpu rehearses the script on a CPU machine
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1 if '$device' == 'cpu' else 0))")
echo "device $device, $gpus GPU(s) or CPU slots" | tee "$out/summary.txt"
python -m pytest -m gpu -rs -q tests 2>&1 | tee "$out/pytest-gpu.txt" | tail -3
common=(--set dist.device="$device" --set dist.precision=bf16 --set checkpoint.every_steps=20 --set log.wandb=false
        --set output_dir="$out/runs")
twinscale shards digits --kind labeled --out "$out/data" --test-fraction 0.4 --as-images --overwrite >/dev/null
data=(--set data.train="$out/data/train" --set data.test="$out/data/test" --set data.source=null)
check() {  # RUN_DIR: float32 export, final metrics
    python - "$1" <<'PY' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
run = Path(sys.argv[1])
weights = load_file(str(run / "model" / "model.safetensors"))
dtypes = sorted({str(t.dtype) for t in weights.values()})
final = json.loads((run / "final_metrics.json").read_text())
print(f"{run.name}: step {final['step']}, precision_at_1 {final.get('precision_at_1')}, map_at_r "
      f"{final.get('map_at_r')}, export dtypes {dtypes}, samples/s {final['train_samples_per_s']:.0f}")
assert dtypes == ["torch.float32"], dtypes
PY
}
# Ray, one worker on one GPU.
twinscale train "${data[@]}" "${common[@]}" --workers 1 --set name=ray-1 --set optim.max_steps=20 2>&1 | tail -5 > "$out/ray-1-a.txt"
twinscale train "${data[@]}" "${common[@]}" --workers 1 --set name=ray-1 --set optim.max_steps=40 --resume 2>&1 | tail -20 > "$out/ray-1-b.txt"
check "$out/runs/ray-1"
# torchrun, one process per GPU (at most 2).
procs=$(( gpus < 2 ? gpus : 2 ))
for step in 20 40; do
    resume=(); [ "$step" = 40 ] && resume=(--resume)
    python -m torch.distributed.run --nproc_per_node "$procs" -m trainer.train configs/default.yaml "${data[@]}" \
        "${common[@]}" --set name=torchrun --set optim.max_steps=$step "${resume[@]}" > "$out/torchrun-$step.txt" 2>&1
done
check "$out/runs/torchrun"
echo "done: $out/summary.txt"

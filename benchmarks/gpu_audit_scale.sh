#!/usr/bin/env bash
# The audit's scaling benchmark on a CUDA device (issue 22 item 5), ready to run; writes its table.
#
#   benchmarks/gpu_audit_scale.sh [OUTDIR]        (default OUTDIR: $OUT, else benchmarks/results)
#
# Environment: PYTHON (default python3), DEVICE (default cuda), THREADS (torch CPU threads, default 4),
# BEFORE (a checkout of the code before the change, e.g. `git archive 8a039f4 | tar -x -C /tmp/before`;
# its rows are skipped when unset), PART_TIMEOUT (seconds per part, default 280).
# Parts, most important first, each bounded by PART_TIMEOUT so that a slow one cannot eat the others:
#   1. the same small folder audited on the CPU and on DEVICE: do the verdict and the figures agree?
#      (DEVICE runs the default --precision auto: bf16 behind the first-batch guard, docs/SCALING.md)
#   2. timm resnet18 at 64 px on 1,000 shapes, after (and before) the change; after once more in fp32,
#      beside it, for the speed-up of the reduced precision (cost.precision in the JSON says what ran)
#   3. timm resnet50 at 224 px on 120 images with --foreground auto (GrabCut), after (and before)
#   4. with 2 or more GPUs: the same audit in one process and under torchrun, one process per GPU
#      (benchmarks/bench_audit_torchrun.py: wall times and the fields of audit.json that differ)
#   5. resnet18 on 5,000 shapes, after
# Resampling counts are lowered (n_boot 100, n_perm 50) to bound the CPU-bound analyses; the CPU table
# in docs/BENCHMARKS.md used the defaults.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
log="$out/gpu_audit_scale.log"
common=(--device "$dev" --threads "${THREADS:-4}" --results "$out" --n-boot 100 --n-perm 50)
part() {  # label, then arguments of bench_audit_scale.py
    local label=$1; shift
    echo "== $label" | tee -a "$log"
    timeout "${PART_TIMEOUT:-280}" "$py" benchmarks/bench_audit_scale.py "${common[@]}" --label "$label" "$@" 2>&1 \
        | tee -a "$log" || echo "   ($label did not finish)" | tee -a "$log"
}
tpart() {  # label, then arguments of bench_audit_torchrun.py
    local label=$1; shift
    echo "== $label" | tee -a "$log"
    timeout "${PART_TIMEOUT:-280}" "$py" benchmarks/bench_audit_torchrun.py --device "$dev" --results "$out" \
        --n-boot 100 --n-perm 50 --label "$label" "$@" 2>&1 | tee -a "$log" \
        || echo "   ($label did not finish)" | tee -a "$log"
}
ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
part gpu-device-check --device-check --n 24 --size 32 --model timm:resnet18 --image-size 32 --inits 1 --src .
part gpu-r18-after --images 1000 --src . --extra '{"workers": 4}'
part gpu-r18-fp32-after --images 1000 --src . --extra '{"workers": 4, "precision": "fp32"}'
[ -n "${BEFORE:-}" ] && part gpu-r18-before --images 1000 --src "$BEFORE"
part gpu-r50-auto-after --images 120 --model timm:resnet50 --image-size 224 --size 224 --foreground auto \
    --src . --extra '{"workers": 4}'
[ -n "${BEFORE:-}" ] && part gpu-r50-auto-before --images 120 --model timm:resnet50 --image-size 224 --size 224 \
    --foreground auto --src "$BEFORE"
if [ "${ngpu:-0}" -ge 2 ]; then
    tpart "gpu-torchrun-$ngpu" --nproc "$ngpu" --images 1000 --workers 4
else
    echo "== torchrun row skipped: $ngpu CUDA device(s), it needs 2 or more" | tee -a "$log"
fi
part gpu-r18-5000-after --images 5000 --src . --extra '{"workers": 4}'
shopt -s nullglob
tables=("$out"/bench_audit_scale_gpu-r*.json)
[ ${#tables[@]} -gt 0 ] && "$py" benchmarks/bench_audit_scale.py --table "${tables[@]}" | tee "$out/gpu_audit_scale.md"

#!/usr/bin/env bash
# The measurements behind RadiomicGAN's training defaults: bench/real_slice.py variants (left half of the real
# test1 B30 -> B50 slice trains, right half evaluates) run side by side on one GPU, at the demo's budget
# (300 steps, 64x64 crops, batch 4) and at a GPU budget (1,500 steps, 128x128 crops, batch 8), then one table.
#
#   bash bench/real_slice_sweep.sh DATA_DIR OUT_DIR [DEVICE]      (DATA_DIR holds test1_B30.mha, test1_B50.mha)
#
# Every variant is its own process (the GPU is far from busy with one small-crop run); each gets LIMIT seconds.
# SWEEP_DEMO=0 leaves out the demo-budget variants (the measurements behind the defaults) and runs the quality table.
set -u
DATA=$1
OUT=$2
DEVICE=${3:-cuda}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-270}
WORKERS=${WORKERS:-2}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT/runs"

variant() { # NAME METHOD BUDGET CONFIG_JSON [FEATURES]
    local name=$1 method=$2 budget=$3 config=$4 features=${5:-0}
    [ "$budget" = demo ] && [ "${SWEEP_DEMO:-1}" = 0 ] && return 0 # SWEEP_DEMO=0: the GPU-budget quality table only
    local args=(${DEMO_ARGS:---steps 300 --epochs 12 --crop 64 --batch 4})
    [ "$budget" = gpu ] && args=(${GPU_ARGS:---steps 1500 --epochs 15 --crop 128 --batch 8})
    local extra=(--no-features)
    [ "$features" = 1 ] && extra=(--workers "$WORKERS")
    timeout "$LIMIT" "$PY" bench/real_slice.py --data "$DATA" --device "$DEVICE" --methods "$method" "${args[@]}" \
        --config "$config" --label "[$budget: $name]" "${extra[@]}" --out "$OUT/runs/$budget-$name" \
        >"$OUT/runs/$budget-$name.log" 2>&1 || echo "$budget-$name failed or timed out" >>"$OUT/runs/failures.txt"
}

# demo budget: which variant learns most per step
variant input input demo '{}' &
variant choe choe demo '{}' &
variant filter filter demo '{}' &
variant none-trainable radiomicgan-none demo '{}' &
variant none-frozen radiomicgan-none demo '{"finetune_vgg": false}' &
variant none-l1only radiomicgan-none demo '{"adversarial_warmup": 1000000}' &
variant none-lr2e-4 radiomicgan-none demo '{"lr": 0.0002}' &
variant dwt-fixed radiomicgan-dwt demo '{}' &
variant dwt-window radiomicgan-dwt demo '{"window_scaling": "window"}' &
variant dwt-noconsolidation radiomicgan-dwt demo '{"consolidate": 0}' &
variant dwt-epochpaced radiomicgan-dwt demo '{"growing_share": 0}' &
variant fixed-fixed radiomicgan-fixed demo '{}' &
variant dynamic-fixed radiomicgan-dynamic demo '{}' &
# GPU budget, with 2D radiomic features: the quality table
variant input input gpu '{}' 1 &
variant filter filter gpu '{}' 1 &
variant choe choe gpu '{}' 1 &
variant none radiomicgan-none gpu '{}' 1 &
variant fixed radiomicgan-fixed gpu '{}' 1 &
variant dynamic radiomicgan-dynamic gpu '{}' 1 &
variant dwt radiomicgan-dwt gpu '{}' 1 &
variant dwt-window radiomicgan-dwt gpu '{"window_scaling": "window"}' 1 &
wait

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = []
for budget in ("demo", "gpu"):
    rows, groups, note = {}, [], ""
    for summary in sorted(out.glob(f"runs/{budget}-*/summary.json")):
        data = json.loads(summary.read_text())
        note = data["budget"]
        for name, row in data["rows"].items():
            rows.setdefault(name, row)
            groups += [g for g in row if g.startswith("[") and g not in groups]
    if not rows:
        continue
    header = ["method", "PSNR (dB)", "SSIM", *[f"reproducible {g}" for g in groups], "train s"]
    lines += [f"## {budget} budget: {note}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["psnr_db"]):
        cells = [name, f"{r['psnr_db']:.2f}", f"{r['ssim']:.4f}", *[str(r.get(g, "")) for g in groups], f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
failures = out / "runs" / "failures.txt"
if failures.exists():
    lines += ["failed or timed out: " + ", ".join(failures.read_text().split("\n")).strip(", ")]
(out / "sweep.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

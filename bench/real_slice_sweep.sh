#!/usr/bin/env bash
# The generalization benchmark (bench/real_slice.py) for every method, and the variants that decide the training
# defaults, side by side on one GPU, at the demo's budget (6 epochs x 50 steps of batch 4, 64x64 crops), over
# three seeds, for both vendors (Siemens B30f -> B50f, Toshiba FC51 -> FC13).
#
#   bash bench/real_slice_sweep.sh DATA_DIR OUT_DIR [DEVICE]
#
# DATA_DIR holds real-kernels/ and real-kernels-toshiba/ (or is real-kernels/ itself, with real-kernels-toshiba/
# beside it). SWEEP_SPLITS (default "dev test"): dev = the variants, PSNR/SSIM only, on training pixels (choices
# are made there); test = every method with reproducible features, on the held-out pixels (what the README
# reports). Every run is its own process (the GPU is far from busy with one small-crop run); each gets LIMIT
# seconds. Size: the dev split is 13 processes (14 with VGG_FILE), most of them 6 RadiomicGAN runs each (3 seeds x
# 2 domains); the test split 6 (7) processes of 6 runs, with features; a demo-budget run is some 20 s on an H100/H200, so each split is a
# few minutes of GPU (SEEDS=0 for a first look). SWEEP_ARGS are added to every run (e.g. a smoke test's "--epochs 1 --steps-per-epoch 2"). Then one table per split: OUT_DIR/sweep-dev.md, OUT_DIR/sweep-test.md, and OUT_DIR/sweep.md (both).
set -u
DATA=$1
OUT=$2
DEVICE=${3:-cuda}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-500}
SEEDS=${SEEDS:-0,1,2}
WORKERS=${WORKERS:-2}
VGG_FILE=${VGG_FILE:-}  # an ImageNet VGG-19 weights file: adds the ImageNet-encoder runs (the path a user with internet gets)
# Each network at other learning rates than its default (RadiomicGAN 4e-4, Choe's published 1e-4): a baseline tuned
# on the dev split the way RadiomicGAN's rate was is the fair comparison; the test split runs Choe at 1e-3 beside it.
LR_VARIANTS='{"radiomicgan-dwt:lr2e-4": {"lr": 2e-4}, "radiomicgan-dwt:lr6e-4": {"lr": 6e-4}, "choe:lr4e-4": {"lr": 4e-4}, "choe:lr1e-3": {"lr": 1e-3}}'
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT/runs"

run() { # SPLIT NAME METHODS CONFIG_JSON [EXTRA_ARGS...]
    local split=$1 name=$2 methods=$3 config=$4
    shift 4
    local label=$name
    [ "$config" = "{}" ] && { [ $# -eq 0 ] || [ "$1" = --variants ]; } && label=""  # a variant's tag names it
    local features=(--no-features)
    [ "$split" = test ] && features=(--workers "$WORKERS")
    timeout "$LIMIT" "$PY" bench/real_slice.py --data "$DATA" --device "$DEVICE" --split "$split" --seeds "$SEEDS" \
        --methods "$methods" --config "$config" --label "$label" "${features[@]}" ${SWEEP_ARGS:-} "$@" --out "$OUT/runs/$split-$name" \
        >"$OUT/runs/$split-$name.log" 2>&1 || echo "$split-$name failed or timed out" >>"$OUT/runs/failures.txt"
}

for split in ${SWEEP_SPLITS:-dev test}; do
    if [ "$split" = dev ]; then
        run dev baselines input,filter,choe '{}' &
        run dev dwt radiomicgan-dwt '{}' &
        run dev none radiomicgan-none '{}' &
        run dev l1only radiomicgan-dwt '{"adversarial_warmup": 1000000}' &
        run dev warmup-half radiomicgan-dwt '{"adversarial_warmup": 150}' &
        run dev consolidate-half radiomicgan-dwt '{"consolidate": 0.5}' &
        run dev share-eighth radiomicgan-dwt '{"growing_share": 0.125}' &
        run dev frozen-encoder radiomicgan-dwt '{"finetune_vgg": false}' &
        run dev paper-scaling radiomicgan-dwt '{"window_scaling": "window"}' &
        run dev focus radiomicgan-dwt '{"window_scaling": "focus"}' &
        run dev extra4 radiomicgan-dwt '{}' --extra-pairs 4 &
        run dev contrast radiomicgan-dwt '{"contrast_jitter": 0.2}' &
        run dev lr radiomicgan-dwt:lr2e-4,radiomicgan-dwt:lr6e-4,choe:lr4e-4,choe:lr1e-3 '{}' --variants "$LR_VARIANTS" &
        [ -n "$VGG_FILE" ] && run dev imagenet radiomicgan-dwt '{}' --vgg-weights "$VGG_FILE" &
        wait
    else
        run test baselines input,filter,choe '{}' &
        run test dwt radiomicgan-dwt '{}' &
        run test none radiomicgan-none '{}' &
        run test fixed radiomicgan-fixed '{}' &
        run test dynamic radiomicgan-dynamic '{}' &
        run test choe-lr choe:lr1e-3 '{}' --variants '{"choe:lr1e-3": {"lr": 1e-3}}' &
        [ -n "$VGG_FILE" ] && run test imagenet radiomicgan-dwt '{}' --vgg-weights "$VGG_FILE" &
        wait
    fi
done

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from real_slice import table

out = Path(sys.argv[1])
everything = []
for split in ("dev", "test"):
    merged, note = {}, ""
    for summary in sorted(out.glob(f"runs/{split}-*/summary-{split}*.json")):
        data = json.loads(summary.read_text())
        note = f"{data['budget']}; {data['machine']}; {data['date']}"
        for domain, result in data["results"].items():
            m = merged.setdefault(domain, {**result, "rows": [], "groups": []})
            m["rows"] += result["rows"]
            m["groups"] += [g for g in result["groups"] if g not in m["groups"]]
            m["rois_per_group"].update(result["rois_per_group"])
    if not merged:
        continue
    lines = [f"## {split} split ({note})", ""]
    for domain, r in merged.items():
        lines += [f"### {domain}, {r['kernels'][0]} -> {r['kernels'][1]} (train {r['train_region']}; evaluate {r['eval_region']})",
                  "", table(r), ""]
    (out / f"sweep-{split}.md").write_text("\n".join(lines) + "\n")
    everything += lines
failures = out / "runs" / "failures.txt"
if failures.exists():
    everything += ["failed or timed out: " + ", ".join(failures.read_text().split("\n")).strip(", ")]
(out / "sweep.md").write_text("\n".join(everything) + "\n")
print("\n".join(everything))
PY

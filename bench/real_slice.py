"""Real-slice generalization benchmark: every method trained on real paired slices and evaluated on pixels that
no method saw, for two vendors and both directions, over several seeds, side by side at one budget.

    python bench/real_slice.py [--split test|dev] [--domains siemens,toshiba] [--seeds 0,1,2] [--out DIR]

Domains (the data sit beside the project, in ../shared/data; a domain whose files are absent is skipped):
- siemens: one chest slice (test1), smooth B30f -> sharp B50f. There is only one slice, so the split is spatial:
  test = train on columns [0, 224), evaluate on columns [288, 512) (a 64-pixel guard band, 44 mm, wider than
  any model's receptive field: no pixel, and no neighbourhood of one, is shared); dev = inside the training
  columns only, train on rows [0, 224), evaluate on rows [288, 512).
- toshiba: two slices 14 mm apart of one phantom scan, sharp FC51 -> soft FC13: test = train on slice 2,
  evaluate on slice 16; dev = inside slice 2 only, train on columns [0, 224), evaluate on columns [288, 512).
The dev split never touches a test pixel: choices (defaults, variants) are made on it, the test split reports.

Per method and seed: PSNR and SSIM against the target kernel (HU clipped to [-1024, 3071]) and the number of
reproducible 2D radiomic features (Lin's CCC > 0.85 over ROIs of the evaluation region, the same ROIs for every
method and seed) per HU range; then mean and sample SD over the seeds. Learned methods get the same budget
(default: the demo's 6 epochs x 50 steps of batch 4, 64x64 crops, random VGG-19 as offline). Models and images
are kept in --out, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radiomicgan.metrics import psnr, ssim  # noqa: E402
from radiomicgan.volume import CTMetadata, CTVolume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
PARAMS_2D = REPO / "radiomicgan" / "data" / "radiomics_ct_2d.yaml"
METHODS = ("input", "filter", "histmatch", "choe", "radiomicgan-dwt", "radiomicgan-none", "radiomicgan-fixed", "radiomicgan-dynamic")
DEFAULT_METHODS = ("input", "filter", "choe", "radiomicgan-dwt", "radiomicgan-none")
ALL = slice(None)
# (train region, evaluation region) as (slice name, rows, columns); see the module docstring
SPLITS = {
    "siemens": {"test": (("test1", ALL, slice(0, 224)), ("test1", ALL, slice(288, 512))),
                "dev": (("test1", slice(0, 224), slice(0, 224)), ("test1", slice(288, 512), slice(0, 224)))},
    "toshiba": {"test": (("slice2", ALL, ALL), ("slice16", ALL, ALL)),
                "dev": (("slice2", ALL, slice(0, 224)), ("slice2", ALL, slice(288, 512)))},
}


def read_slice(path: Path) -> tuple[np.ndarray, float, str]:
    from radiomicgan.io import read_volume

    volume = read_volume(path)
    return volume.hu[0].astype(np.float32), float(volume.spacing[0]), volume.meta.kernel


def load_domain(name: str, data: Path) -> dict | None:
    """{'kernels': (source, target), 'spacing': mm, 'slices': {slice name: (source HU, target HU)}}, or None."""
    if name == "siemens":
        folder = data if (data / "test1_B30.mha").is_file() else data / "real-kernels"  # the folder itself, or its parent
        files = {"test1": (folder / "test1_B30.mha", folder / "test1_B50.mha")}
        kernels = ("B30f", "B50f")  # the MetaImage files carry no tag
        presets = ("B30", "B50")  # what simulated extra pairs use (--extra-pairs)
    elif name == "toshiba":
        folder = next((f for f in (data / "real-kernels-toshiba", data.parent / "real-kernels-toshiba") if f.is_dir()), data)
        files = {f"slice{int(n)}": (folder / "sharp_FC51" / f"{n}.DCM", folder / "soft_FC13" / f"{n}.DCM") for n in ("00000002", "00000016")}
        kernels = None  # from the DICOM tags
        presets = ("B50", "B30")  # no preset is fitted on Toshiba's kernels: the Siemens ones of like sharpness
    else:
        raise SystemExit(f"unknown domain '{name}'")
    if not all(f.is_file() for pair in files.values() for f in pair):
        return None
    slices, spacing, tags = {}, 0.0, ("", "")
    for key, (s, t) in files.items():
        (src, spacing, s_tag), (tgt, _, t_tag) = read_slice(s), read_slice(t)
        slices[key], tags = (src, tgt), (s_tag, t_tag)
    return {"kernels": kernels or tags, "presets": presets, "spacing": spacing, "slices": slices}


def where_text(where) -> str:
    name, rows, cols = where
    span = lambda s: "all" if s == ALL else f"{s.start}:{s.stop}"  # noqa: E731
    return f"{name} rows {span(rows)}, columns {span(cols)}"


def region(domain: dict, where) -> tuple[np.ndarray, np.ndarray]:
    name, rows, cols = where
    s, t = domain["slices"][name]
    return np.ascontiguousarray(s[rows, cols]), np.ascontiguousarray(t[rows, cols])


def as_volume(hu: np.ndarray, spacing: float, kernel: str, what: str) -> CTVolume:
    return CTVolume(hu[None].copy(), spacing=(spacing, spacing, 1.0), meta=CTMetadata(kernel=kernel), source=what)


def write_pairs(folder: Path, source: CTVolume, target: CTVolume, kernels, extra: int = 0, presets=None) -> Path:
    """The training region as a pairs set; with ``extra``, that many more pairs re-kernelled from the training
    target (its anatomy with new noise, as `radiomicgan simulate --pairs` makes them). The real pair is listed
    first and last: the trainer validates on the last pair and trains on the others."""
    from radiomicgan.dataset import manifest_entry, write_manifest
    from radiomicgan.io import write_volume
    from radiomicgan.kernels import get_preset, rekernel

    folder.mkdir(parents=True, exist_ok=True)
    write_volume(source, folder / "train_source.nrrd", overwrite=True)
    write_volume(target, folder / "train_target.nrrd", overwrite=True)
    real = manifest_entry("train", "train_source.nrrd", "train_target.nrrd", *kernels)
    entries = [real]
    for k in range(extra):
        simulated = rekernel(target.hu, target.spacing[:2], get_preset(presets[1]), get_preset(presets[0]), seed=100 + k)
        write_volume(target.with_hu(simulated, kernel=kernels[0]), folder / f"extra{k}_source.nrrd", overwrite=True)
        entries.append(manifest_entry(f"extra{k}", f"extra{k}_source.nrrd", "train_target.nrrd", *kernels))
    if extra:
        entries.append({**real, "id": "train-validation"})
    return write_manifest(folder, entries, {"what": "the training region of a real slice pair (bench/real_slice.py)",
                                            "extra_pairs": extra})


def train_config(method: str, seed: int, args, variant: dict | None = None):
    """The method's TrainConfig at the benchmark's budget, with --config and then the variant's own settings."""
    from radiomicgan.train import TrainConfig

    if method in ("filter", "histmatch"):
        return TrainConfig(method=method, schedule="none", seed=seed)
    name, _, schedule = method.partition("-")
    budget = dict(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch=args.batch, crop=args.crop,
                  vgg_weights=args.vgg_weights, device=args.device, seed=seed)
    return TrainConfig(method=name, schedule=schedule or "none", **{**budget, **json.loads(args.config), **(variant or {})})


def run_method(method: str, seed: int, manifest: Path, folder: Path, source: CTVolume, args, variant: dict | None = None) -> tuple[np.ndarray, float]:
    """Train (or reuse the finished model in ``folder``) and harmonize the evaluation region."""
    from radiomicgan.harmonize import harmonize_hu
    from radiomicgan.modelio import load_model
    from radiomicgan.train import train

    image_file, seconds_file = folder / "harmonized.npy", folder / "train_seconds.txt"
    if image_file.is_file() and seconds_file.is_file():
        return np.load(image_file), float(seconds_file.read_text())
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # an interrupted run: start the model again
    started = time.perf_counter()
    train(manifest, folder, train_config(method, seed, args, variant), progress=False)
    seconds = time.perf_counter() - started
    image = harmonize_hu(load_model(folder), source.hu, source.spacing[:2], device=args.device)[0]
    np.save(image_file, image)
    seconds_file.write_text(f"{seconds:.1f}\n")
    return image, seconds


def fmt(values, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def run_domain(name: str, domain: dict, args, out: Path) -> dict:
    train_where, eval_where = SPLITS[name][args.split]
    spacing, (source_kernel, target_kernel) = domain["spacing"], domain["kernels"]
    train_s, train_t = region(domain, train_where)
    eval_s, eval_t = region(domain, eval_where)
    source = as_volume(eval_s, spacing, source_kernel, f"{name} {args.split} evaluation {source_kernel}")
    target = as_volume(eval_t, spacing, target_kernel, f"{name} {args.split} evaluation {target_kernel}")
    base = out / name / args.split
    manifest = write_pairs(base / f"pairs-extra{args.extra_pairs}", as_volume(train_s, spacing, source_kernel, "train source"),
                           as_volume(train_t, spacing, target_kernel, "train target"), (source_kernel, target_kernel),
                           args.extra_pairs, domain["presets"])
    label = f" {args.label}" if args.label else ""
    images, rows = {}, []
    for entry in args.methods:
        method, _, tag = entry.partition(":")
        shown = f"{method}{f' {tag}' if tag else ''}{label}"
        for seed in ([0] if method in ("input", "filter", "histmatch") else args.seeds):
            key = f"{shown} s{seed}"
            if method == "input":
                image, seconds = eval_s, 0.0
            else:
                stem = f"{method}{tag and '-' + tag}{args.label and '-' + args.label}{args.extra_pairs and f'-x{args.extra_pairs}' or ''}"
                image, seconds = run_method(method, seed, manifest, base / "models" / f"{stem}-s{seed}", source, args,
                                            args.variants.get(entry))
            images[key] = image
            rows.append({"domain": name, "method": shown, "seed": seed, "psnr_db": psnr(eval_t, image),
                         "ssim": ssim(eval_t, image), "train_seconds": seconds})
            print(f"  {name} {args.split} {key}: PSNR {rows[-1]['psnr_db']:.2f} dB, SSIM {rows[-1]['ssim']:.4f}, "
                  f"trained {seconds:.0f} s", flush=True)
    groups, rois_per_group = [], {}
    if not args.no_features:
        from radiomicgan.reproducibility import evaluate, sample_hu_rois

        rois = sample_hu_rois(target, per_range=args.rois_per_range, size_mm=10.0, slices=1, seed=0)  # one ROI set for all
        evaluation = evaluate(target, {k: source.with_hu(im[None]) for k, im in images.items()}, rois,
                              params=PARAMS_2D, bootstrap=0, seed=0, reference_name="target", workers=args.workers)
        for group, entry in evaluation.summary["groups"].items():
            rois_per_group[group] = entry.get("rois")
            if "too_small" in entry or "skipped" in entry:
                continue
            groups.append(group)
            for row, key in zip(rows, images):
                row[group] = entry.get(key, {}).get("reproducible")
        features = evaluation.summary["features"]
    else:
        features = 0
    return {"rows": rows, "groups": groups, "rois_per_group": rois_per_group, "features": features,
            "kernels": [source_kernel, target_kernel], "train_region": where_text(train_where), "eval_region": where_text(eval_where)}


def table(result: dict) -> str:
    groups = result["groups"]
    header = ["method", "seeds", "PSNR (dB)", "SSIM", *[f"reproducible {g} ({result['rois_per_group'].get(g)} ROIs)" for g in groups], "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for m in methods:
        rs = [r for r in result["rows"] if r["method"] == m]
        cells = [m, str(len(rs)), fmt([r["psnr_db"] for r in rs], 2), fmt([r["ssim"] for r in rs], 4),
                 *[fmt([r.get(g) for r in rs], 0) for g in groups], f"{np.mean([r['train_seconds'] for r in rs]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="folder holding real-kernels/ and real-kernels-toshiba/")
    parser.add_argument("--split", choices=("test", "dev"), default="test", help="dev: choose on it; test: report")
    parser.add_argument("--domains", default="siemens,toshiba")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {','.join(METHODS)}; "
                        "METHOD:TAG is a variant of METHOD with the settings --variants gives TAG")
    parser.add_argument("--variants", default="{}", help='JSON {"METHOD:TAG": {TrainConfig fields}}, e.g. '
                        '\'{"choe:lr1e-3": {"lr": 1e-3}}\': a baseline at another setting beside its default, in one table')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--vgg-weights", default="random", help="'imagenet', a weights file, or 'random' (offline)")
    parser.add_argument("--rois-per-range", type=int, default=20)
    parser.add_argument("--no-features", action="store_true", help="PSNR/SSIM only (fast)")
    parser.add_argument("--workers", type=int, default=1, help="feature-extraction processes")
    parser.add_argument("--label", default="", help="a name for a variant (with --config), added to the method names")
    parser.add_argument("--config", default="{}", help="extra TrainConfig fields as JSON, for variants")
    parser.add_argument("--extra-pairs", type=int, default=0, help="train on this many simulated pairs more, re-kernelled "
                        "from the training target (new noise, same anatomy)")
    parser.add_argument("--out", type=Path, default=None, help="folder for models, images, summary.json and table.md")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = {m.partition(":")[0] for m in args.methods} - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}")
    args.variants = json.loads(args.variants)
    missing = [m for m in args.methods if ":" in m and m not in args.variants]
    if missing:
        parser.error(f"--variants gives no settings for {missing}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="real_slice-"))
    out.mkdir(parents=True, exist_ok=True)
    import torch

    machine = f"{platform.node()}, {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, device {args.device}"
    if args.device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()})"
    budget = (f"{args.epochs} epochs x {args.steps_per_epoch} steps of batch {args.batch}, {args.crop}x{args.crop} crops, "
              f"VGG {args.vgg_weights}" + (f", config {args.config}" if args.config != "{}" else "")
              + (f", variants {json.dumps(args.variants)}" if args.variants else "")
              + (f", {args.extra_pairs} simulated pairs more" if args.extra_pairs else ""))
    results, text = {}, []
    for name in [d.strip() for d in args.domains.split(",") if d.strip()]:
        domain = load_domain(name, args.data)
        if domain is None:
            print(f"real_slice: {name} skipped: its files are not in {args.data}")
            continue
        results[name] = run_domain(name, domain, args, out)
        r = results[name]
        text.append(f"### {name}, {r['kernels'][0]} -> {r['kernels'][1]}, {args.split} split "
                    f"(train {r['train_region']}, evaluate {r['eval_region']}; {r['features']} 2D features per ROI)\n\n{table(r)}\n")
    if not results:
        print("real_slice: skipped: no domain's data found")
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = f"Budget: {budget}. Seeds {args.seeds}; mean ± SD over seeds. {machine}; {stamp}.\n\n" + "\n".join(text)
    print("\n" + report)
    suffix = f"-{args.label}" if args.label else ""
    (out / f"table-{args.split}{suffix}.md").write_text(report)
    (out / f"summary-{args.split}{suffix}.json").write_text(json.dumps(
        {"budget": budget, "machine": machine, "date": stamp, "results": results,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {out / f'table-{args.split}{suffix}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

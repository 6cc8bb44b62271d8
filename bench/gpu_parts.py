"""The parts of ``bench/gpu_check.sh`` that have no bench script of their own: Grad-CAM speed, the out-of-memory
fallback, DDP under torchrun, and the summary of all parts. Each part writes its figures as JSON; prints figures;
asserts nothing (a missed target is reported, not raised).

    python bench/gpu_parts.py gradcam [--slices 300] [--size 512] --json FILE
    python bench/gpu_parts.py oom [--slices 4096] [--batch 4096] [--fp32-slices 1024] --json FILE
    python bench/gpu_parts.py ddp --work DIR --json FILE
    python bench/gpu_parts.py summary DIR_OF_JSON --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _torch_device(requested: str | None):
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    return device, name


def _random_model(discriminator: bool = True):
    """RadiomicGAN-shaped generator and PatchGAN with random weights (the cost does not depend on them)."""
    import torch

    from radiomicgan.modelio import LoadedModel, ModelCard
    from radiomicgan.models import PatchDiscriminator, RadiomicGANGenerator
    from radiomicgan.window import STANDARD_RANGE

    torch.manual_seed(0)
    generator = RadiomicGANGenerator("random")
    torch.nn.init.normal_(generator.head.conv.weight, 0.0, 0.01)
    d = PatchDiscriminator().eval() if discriminator else None
    return LoadedModel(card=ModelCard("radiomicgan", "B30", "B50", STANDARD_RANGE), generator=generator.eval(), discriminator=d)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _write(path: Path | None, record: dict) -> None:
    if path:
        path.write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- Grad-CAM


def gradcam(args) -> None:
    """Grad-CAM maps of a whole volume for the input and for the harmonized result, as the harmonize command
    makes them (``Harmonizer.gradcam``: maps, standard probability and hot-spot window), host arrays in and out."""
    from radiomicgan.harmonize import Harmonizer

    device, name = _torch_device(args.device)
    cuda = device.startswith("cuda")
    slices = args.slices or (300 if cuda else 4)
    size = args.size or (512 if cuda else 128)
    rng = np.random.default_rng(1)
    source = rng.normal(-300, 450, (slices, size, size)).clip(-1024, 3000).astype(np.float32)
    harmonizer = Harmonizer(_random_model(), device=device)
    result = harmonizer.harmonize(source)
    harmonizer.gradcam(source[:8], result[:8])  # warm-up
    _sync(device)
    record = {"part": "gradcam", "device": name, "slices": slices, "size": size, "batch": min(harmonizer.batch, 32)}
    seconds = {}
    for label, candidate in (("input", source), ("result", result)):
        best = None
        for _ in range(args.repeats):
            started = time.perf_counter()
            cams, summary = harmonizer.gradcam(source, candidate)
            _sync(device)
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
        seconds[label] = best
        record[label] = {"seconds": best, "cam_shape": list(cams.shape), "cam_max": float(cams.max()), **summary}
        print(f"Grad-CAM maps of the {label:<7} {slices} x {size}x{size}: {best:6.3f} s   hot fraction "
              f"{summary['hot_fraction']:.3f}, window {summary['hot_spot_window_hu']}", flush=True)
    record["seconds_total"] = seconds["input"] + seconds["result"]
    record["target_met"] = record["seconds_total"] < 2.0
    print(f"Grad-CAM, input and result together: {record['seconds_total']:.3f} s on {name} (target under 2 s: "
          f"{'met' if record['target_met'] else 'missed'})")
    _write(args.json, record)


# ---------------------------------------------------------------------------------------------- out of memory


def _harmonizer(loaded, device: str, batch: int, precision: str):
    """A Harmonizer; in strict fp32 without cuDNN's autotuning, which the Harmonizer turns on for its fixed shapes:
    every halved batch is a new shape, and autotuning each in fp32 took a minute for 32 slices on an H200."""
    import torch

    from radiomicgan.harmonize import Harmonizer

    harmonizer = Harmonizer(loaded, device=device, batch=batch, precision=precision)
    if precision == "fp32" and device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
    return harmonizer



def oom(args) -> None:
    """A batch that cannot fit: the Harmonizer halves it until it fits, and the slices must come out as at batch 16.

    Stated tolerance. In strict fp32 (TF32 off) kernels chosen for other batch sizes only sum in another order:
    at most 1 HU apart, at under 0.1 % of the voxels. In the default bf16 every layer rounds to 8 bits, so another
    kernel moves the result by about bf16's own error: the mean |difference| to batch 16 must stay under the mean
    |difference| between bf16 and fp32 at batch 16 on the same slices (and the maximum is reported)."""
    import torch

    device, name = _torch_device(args.device)
    cuda = device.startswith("cuda")
    slices = args.slices or (4096 if cuda else 8)
    size = args.size or (512 if cuda else 64)
    batch = args.batch or slices
    distinct = min(64, slices)  # slices are independent of their batch neighbours: tile a few distinct ones
    base = np.random.default_rng(2).uniform(-1024, 1500, (distinct, size, size)).astype(np.float32)
    hu = np.tile(base, (-(-slices // distinct), 1, 1))[:slices]
    loaded = _random_model(discriminator=False)
    compare = min(slices, args.compare)
    record = {"part": "oom", "device": name, "slices": slices, "size": size, "requested_batch": batch, "compared_slices": compare}
    if cuda:
        record["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    def halving(precision: str, n: int, b: int) -> tuple[np.ndarray, dict]:
        harmonizer = _harmonizer(loaded, device, b, precision)
        started = time.perf_counter()
        out = harmonizer.harmonize(hu[:n])
        _sync(device)
        entry = {"slices": n, "requested_batch": b, "final_batch": harmonizer.batch, "seconds": time.perf_counter() - started,
                 "notes": harmonizer.notes, "device_after": harmonizer.device, "halved": harmonizer.batch < b}
        print(f"{precision}: {n} slices {size}x{size} asked at batch {b}: ran at batch {harmonizer.batch} on "
              f"{harmonizer.device} in {entry['seconds']:.1f} s; notes: {harmonizer.notes}", flush=True)
        return out, entry

    def against(out: np.ndarray, precision: str) -> tuple[np.ndarray, dict]:
        reference = _harmonizer(loaded, device, 16, precision).harmonize(hu[:compare])
        diff = np.abs(out[:compare] - reference)
        return reference, {"max_abs_hu_diff": float(diff.max()), "mean_abs_hu_diff": float(diff.mean()),
                           "fraction_differing": float((diff > 0).mean())}

    big, bf16 = halving("auto", slices, batch)
    reference16, versus = against(big, "auto")
    bf16.update(versus)
    record["default"] = {**bf16, "precision": "bf16" if cuda else "fp32"}
    record.update(final_batch=bf16["final_batch"], seconds=bf16["seconds"], notes=bf16["notes"], halved=bf16["halved"])
    if cuda:
        torch.backends.cudnn.allow_tf32 = False  # strict fp32 from here on
        torch.backends.cuda.matmul.allow_tf32 = False
    fp32_out, yardstick = against(reference16, "fp32")  # bf16 at batch 16 against fp32 at batch 16: bf16's own error
    record["bf16_vs_fp32_at_batch_16"] = yardstick
    strict, fp32 = halving("fp32", min(slices, args.fp32_slices), min(batch, args.fp32_slices))
    n = min(len(strict), compare)
    diff = np.abs(strict[:n] - fp32_out[:n])
    fp32.update(max_abs_hu_diff=float(diff.max()), mean_abs_hu_diff=float(diff.mean()), fraction_differing=float((diff > 0).mean()))
    record["fp32_strict"] = fp32
    print(f"bf16 (default): first {compare} slices against batch 16: max |HU difference| {bf16['max_abs_hu_diff']:.0f}, mean "
          f"{bf16['mean_abs_hu_diff']:.3f}, differing voxels {bf16['fraction_differing']:.2e}; bf16's own error (vs fp32 at "
          f"batch 16): max {yardstick['max_abs_hu_diff']:.0f}, mean {yardstick['mean_abs_hu_diff']:.3f}")
    print(f"fp32 (TF32 off): first {compare} slices against batch 16: max |HU difference| {fp32['max_abs_hu_diff']:.0f}, "
          f"differing voxels {fp32['fraction_differing']:.2e} (tolerance: <= 1 HU at < 0.1 %)")
    fp32_ok = fp32["max_abs_hu_diff"] <= 1 and fp32["fraction_differing"] < 1e-3
    bf16_ok = bf16["mean_abs_hu_diff"] <= max(yardstick["mean_abs_hu_diff"], 1e-9) or bf16["max_abs_hu_diff"] == 0
    record["target_met"] = bool(bf16["halved"] and fp32["halved"] and fp32_ok and bf16_ok) if cuda else None
    print(f"halved: bf16 {bf16['halved']}, fp32 {fp32['halved']}; within tolerance: bf16 {bf16_ok}, fp32 {fp32_ok}"
          + ("" if cuda else " (no out-of-memory on the CPU: smoke only)"))
    _write(args.json, record)


# ---------------------------------------------------------------------------------------------- DDP


def _run(command: list[str], log, env=None) -> float:
    started = time.perf_counter()
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return time.perf_counter() - started


def _trainable(folder: Path) -> dict:
    import torch

    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    return {f"{net}.{k}": v.double() for net in ("generator", "discriminator") for k, v in state[net].items()
            if not (net == "generator" and k.startswith("groups."))}  # frozen VGG


def ddp(args) -> None:
    """One epoch under ``torchrun --nproc_per_node 1`` (NCCL on CUDA, gloo on the CPU) against a plain run with
    the same seed: the weights must agree to within a small part of what the epoch changed them by."""
    import torch

    from radiomicgan.modelio import ModelCard, build_networks

    device, name = _torch_device(args.device)
    cuda = device.startswith("cuda")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    size, crop, steps = (256, 128, 8) if cuda else (48, 32, 2)
    python = sys.executable
    env = {"NCCL_DEBUG": "WARN", **os.environ,  # a failing NCCL start then says why in ddp_runs.log
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    record = {"part": "ddp", "device": name, "backend": "nccl" if cuda else "gloo", "steps": steps, "crop": crop}
    with open(work / "ddp_runs.log", "w") as log:
        _run([python, "-m", "radiomicgan.cli", "simulate", "--out", str(work / "pairs"), "--size", str(size),
              "--slices", "4", "--cases", "2", "--overwrite"], log, env)
        train_args = ["train", "--pairs", str(work / "pairs"), "--epochs", "1", "--steps-per-epoch", str(steps),
                      "--batch", "4", "--crop", str(crop), "--vgg-weights", "random", "--device", device, "--seed", "0",
                      "--val-slices", "1"]
        record["plain_seconds"] = _run([python, "-m", "radiomicgan.cli", *train_args, "--out", str(work / "plain")], log, env)
        record["torchrun_seconds"] = _run([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                           "-m", "radiomicgan.cli", *train_args, "--out", str(work / "ddp")], log, env)
    events = [json.loads(line) for line in (work / "ddp" / "train_log.jsonl").read_text().splitlines()]
    record["epochs_completed"] = sum(e["event"] == "epoch" for e in events)
    record["ddp_sync_logged"] = any(e["event"] == "ddp_sync" for e in events)  # only written when DDP was active
    record["status"] = next((e["status"] for e in events if e["event"] == "end"), None)
    card = ModelCard.read(work / "ddp")
    record["world_size"] = card.training.world_size
    plain, parallel = _trainable(work / "plain"), _trainable(work / "ddp")
    torch.manual_seed(0)  # the plain run's initial weights, as training builds them
    g, d = build_networks(card.method, {**card.architecture, "vgg_weights": "random"})
    initial = {**{f"generator.{k}": v.double() for k, v in g.state_dict().items()},
               **{f"discriminator.{k}": v.double() for k, v in d.state_dict().items()}}
    moved = sum(float((plain[k] - initial[k]).norm() ** 2) for k in plain) ** 0.5
    apart = sum(float((plain[k] - parallel[k]).norm() ** 2) for k in plain) ** 0.5
    record.update(update_norm=moved, ddp_vs_plain_norm=apart, ratio=apart / moved if moved else float("inf"),
                  max_abs_diff=max(float((plain[k] - parallel[k]).abs().max()) for k in plain))
    record["target_met"] = bool(record["epochs_completed"] == 1 and record["ddp_sync_logged"] and record["ratio"] < 0.05)
    print(f"torchrun --nproc_per_node 1 ({record['backend']}): {record['epochs_completed']} epoch, status {record['status']}, "
          f"DDP active: {record['ddp_sync_logged']}, {record['torchrun_seconds']:.1f} s (plain {record['plain_seconds']:.1f} s)")
    print(f"weights, DDP vs plain: |difference| {apart:.3e} = {record['ratio']:.2e} of the epoch's update {moved:.3e} "
          f"(max element {record['max_abs_diff']:.2e}); tolerance 5 %: {'met' if record['target_met'] else 'missed'}")
    _write(args.json, record)


# ---------------------------------------------------------------------------------------------- summary


def summary(args) -> None:
    """One table of every part's figures against its target, as Markdown and JSON."""
    parts = {}
    for path in sorted(args.folder.glob("*.json")):
        try:
            parts[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            parts[path.stem] = {"error": f"unreadable {path.name}"}
    status = {}
    if args.status and args.status.is_file():
        for line in args.status.read_text().splitlines():
            part, _, rest = line.partition(" ")
            status[part] = rest
    device = next((p.get("device") for p in parts.values() if p.get("device")), "?")
    lines = [f"# GPU check: {device}", "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| part | measure | figure | target | met |", "|---|---|---|---|---|"]

    def met(p):
        value = p.get("target_met")
        if str(p.get("device", "")).startswith("CPU"):
            return "- (CPU)"
        return "-" if value is None else ("yes" if value else "NO")

    def rate(value: float) -> str:
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"

    h = parts.get("a_harmonize")
    if h:
        for label, v in h.get("variants", {}).items():
            extra = ""
            if "speedup_vs_plain" in v:
                extra = (f" (x{v['speedup_vs_plain']:.2f}" + (f"; peak {v['peak_gib']:.1f} GiB" if "peak_gib" in v else "")
                         + f"; HU vs plain: max abs diff {v['max_abs_hu_diff_vs_plain']:.0f}, mean {v['mean_abs_hu_diff_vs_plain']:.2f}"
                         + (f"; warm-up {v['warmup_s']:.0f} s" if v.get("warmup_s", 0) >= 1 else "") + ")")
            lines.append(f"| a harmonize {h['slices']}x{h['size']}² | {label} | {rate(v['slices_per_s'])} slices/s{extra} | | |")
        if "best_slices_per_s" in h:
            lines.append(f"| a harmonize | best | {rate(h['best_slices_per_s'])} slices/s, x{h['best_speedup']:.2f} | >= 1,500 and >= 5x | {met(h)} |")
    t = parts.get("b_train")
    if t:
        for label, v in t.get("variants", {}).items():
            if "error" in v:
                lines.append(f"| b train G+D {t['size']}² | {label} | failed: {v['error'][:120]} | | |")
                continue
            extra = f", x{v['speedup_vs_fp32']:.2f}" if "speedup_vs_fp32" in v else ""
            lines.append(f"| b train G+D {t['size']}² | {label} | {rate(v['pairs_per_s'])} pairs/s at batch {v['batch']}{extra}; "
                         f"peak {v['peak_gib']:.1f} GiB ({v.get('peak_kind', '')}) | | |")
        for encoder, e in t.get("encoders", {}).items():  # each encoder against its own fp32 loop
            lines.append(f"| b train | best, {encoder} VGG{' (the paper' + chr(39) + 's configuration)' if encoder == 'frozen' else ''} | "
                         f"{rate(e['best_pairs_per_s'])} pairs/s, x{e['best_speedup']:.2f} | >= 400 and >= 2x | {met({**t, **e})} |")
        if "best_pairs_per_s" in t and not t.get("encoders"):
            lines.append(f"| b train | best | {rate(t['best_pairs_per_s'])} pairs/s, x{t['best_speedup']:.2f} | >= 400 and >= 2x | {met(t)} |")
    c = parts.get("c_gradcam")
    if c and "seconds_total" in c:
        lines.append(f"| c Grad-CAM | {c['slices']} slices {c['size']}², input + result | {c['input']['seconds']:.3f} + "
                     f"{c['result']['seconds']:.3f} = {c['seconds_total']:.3f} s | < 2 s | {met(c)} |")
    o = parts.get("d_oom")
    if o and "default" in o:
        b, y = o["default"], o.get("bf16_vs_fp32_at_batch_16", {})
        lines.append(f"| d out of memory, default precision | {b['slices']} slices {o['size']}² asked at batch {b['requested_batch']} "
                     f"| ran at batch {b['final_batch']} ({b['seconds']:.1f} s); vs batch 16 on {o['compared_slices']} slices: max "
                     f"{b['max_abs_hu_diff']:.0f} HU, mean {b['mean_abs_hu_diff']:.3f}, {b['fraction_differing']:.1e} of voxels "
                     f"(bf16 vs fp32: mean {y.get('mean_abs_hu_diff', float('nan')):.3f}) | halves; mean within bf16's own error | |")
    if o and "fp32_strict" in o:
        f32 = o["fp32_strict"]
        lines.append(f"| d out of memory, fp32 (TF32 off) | {f32['slices']} slices asked at batch {f32['requested_batch']} | ran at batch "
                     f"{f32['final_batch']} ({f32['seconds']:.1f} s); vs batch 16: max {f32['max_abs_hu_diff']:.0f} HU, "
                     f"{f32['fraction_differing']:.1e} of voxels | halves; <= 1 HU at < 0.1 % | {met(o)} |")
    e = parts.get("e_ddp")
    if e and "ratio" in e:
        lines.append(f"| e DDP | torchrun --nproc_per_node 1, {e['backend']} | {e['epochs_completed']} epoch, DDP active "
                     f"{e['ddp_sync_logged']}; weights vs plain {e['ratio']:.1e} of the update | 1 epoch; < 5 % | {met(e)} |")
    f = parts.get("f_real_slice")
    if f:
        lines.append(f"| f real slice | {f.get('budget', '')} | see real_slice_table.md | - | - |")
    if status:
        lines += ["", "| part | exit |", "|---|---|"] + [f"| {k} | {v} |" for k, v in status.items()]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"parts": parts, "exit_status": status}, indent=2) + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("gradcam")
    p.add_argument("--slices", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("oom")
    p.add_argument("--slices", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--compare", type=int, default=256, help="slices compared with batch 16")
    p.add_argument("--fp32-slices", type=int, default=1024, help="slices (and batch) of the strict fp32 run")
    p = sub.add_parser("ddp")
    p.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("summary")
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--status", type=Path, help="lines 'part exit-status' from the driver")
    for name, q in sub.choices.items():
        if name != "summary":
            q.add_argument("--device")
            q.add_argument("--json", type=Path)
    args = parser.parse_args()
    {"gradcam": gradcam, "oom": oom, "ddp": ddp, "summary": summary}[args.part](args)


if __name__ == "__main__":
    main()

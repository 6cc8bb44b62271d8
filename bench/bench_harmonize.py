"""Harmonizing a 512x512 volume end to end, HU array to HU array: a plain fp32 loop (batch 1, eager, one
slice at a time) against the optimised path (``radiomicgan.harmonize.Harmonizer``: batches, bf16 autocast,
channels_last, pinned memory and overlapped copies on CUDA) and the same with torch.compile, in one run.
Prints figures; asserts nothing.

    python bench/bench_harmonize.py [--slices 300] [--batch 16] [--compile] [--device cuda] [--json FILE]

Targets on one H100 (issue 11): at least 1,500 slices/s and at least 5x the plain loop in the same run. On a
CPU the default is 4 slices of 512x512 and the figure is seconds per slice. Each timed figure is the median of
``--repeats`` passes over the whole volume after a warm-up (compilation is timed apart). ``--json`` is rewritten
after every variant, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from radiomicgan.harmonize import Harmonizer
from radiomicgan.modelio import LoadedModel, ModelCard
from radiomicgan.models import RadiomicGANGenerator, pad_to_multiple
from radiomicgan.window import STANDARD_RANGE, carry_weight, from_unit, to_unit


def model() -> LoadedModel:
    torch.manual_seed(0)
    generator = RadiomicGANGenerator("random")  # the architecture's cost; weights do not matter here
    torch.nn.init.normal_(generator.head.conv.weight, 0.0, 0.01)
    return LoadedModel(card=ModelCard("radiomicgan", "B30", "B50", STANDARD_RANGE), generator=generator.eval())


def plain_loop(loaded: LoadedModel, hu: np.ndarray, device: str) -> np.ndarray:
    """What a first implementation does: one slice at a time, fp32, numpy pre- and post-processing."""
    generator = loaded.generator.to(device, memory_format=torch.contiguous_format)
    out = np.empty_like(hu)
    with torch.inference_mode():
        for k, slice_hu in enumerate(hu):
            x = torch.from_numpy(to_unit(np.clip(slice_hu, *STANDARD_RANGE)).astype(np.float32))[None, None].to(device)
            x, (h, w) = pad_to_multiple(x, 8)
            predicted = from_unit(generator(x)[0, 0, :h, :w].cpu().numpy())
            weight = carry_weight(slice_hu)
            out[k] = np.rint(weight * predicted + (1 - weight) * slice_hu)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (the device drained before and after each) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def flops_per_slice(loaded: LoadedModel, size: int, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, size, size, device=device)
    generator = loaded.generator.to(device)  # the model may still be on the CPU it was built on
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        generator(x)
    return float(counter.get_total_flops())


def eager_rate(record: dict, batch: int, kind: str) -> float:
    return record["variants"][f"optimised {kind} (batch {batch}, eager)"]["slices_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--also-batch", type=int, help="also time the eager optimised path at this batch")
    parser.add_argument("--repeats", type=int, help="timed passes per variant (median)")
    parser.add_argument("--compile", action="store_true", help="also time the optimised path with torch.compile")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile modes to time, comma-separated (default, max-autotune-no-cudagraphs, "
                             "reduce-overhead, max-autotune); each is one compilation, max-autotune takes minutes")
    parser.add_argument("--profile", type=Path, help="write the optimised path's top CUDA kernels here (CUDA only)")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each variant)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    slices = args.slices or (300 if cuda else 4)
    batch = args.batch or (16 if cuda else 4)
    repeats = args.repeats or (3 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True  # for every variant alike (the Harmonizer sets it on CUDA itself)
    hu = np.random.default_rng(0).uniform(-1024, 1500, (slices, args.size, args.size)).astype(np.float32)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; volume {slices}x{args.size}x{args.size} float32 HU; torch {torch.__version__}; "
          f"cudnn tf32 {torch.backends.cudnn.allow_tf32}", flush=True)
    record = {"part": "harmonize", "device": name, "torch": torch.__version__, "slices": slices, "size": args.size,
              "batch": batch, "repeats": repeats, "variants": {}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")

    loaded = model()
    record["gflop_per_slice"] = flops_per_slice(loaded, args.size, args.device) / 1e9
    print(f"generator: {record['gflop_per_slice']:.0f} GFLOP per {args.size}x{args.size} slice", flush=True)

    plain_loop(loaded, hu[: min(4, slices)], args.device)  # warm-up
    seconds, reference = timed(lambda: plain_loop(loaded, hu, args.device), args.device, 1)
    plain_seconds = seconds
    record["variants"]["plain fp32 loop (batch 1, eager)"] = {"slices_per_s": slices / seconds, "seconds": seconds}
    print(f"{'plain fp32 loop (batch 1, eager)':<58}{slices / seconds:10.1f} slices/s", flush=True)
    save()

    def optimised(label: str, b: int, compile_model: bool | str) -> Harmonizer | None:
        harmonizer = Harmonizer(loaded, device=args.device, batch=b, compile=compile_model)
        started = time.perf_counter()
        harmonizer.harmonize(hu[: min(2 * b, slices)])  # warm-up (and compilation)
        sync(args.device)
        warm = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, out = timed(lambda: harmonizer.harmonize(hu), args.device, repeats)
        diff = np.abs(out - reference)
        entry = {"slices_per_s": slices / seconds, "seconds": seconds, "speedup_vs_plain": plain_seconds / seconds,
                 "warmup_s": warm, "batch": harmonizer.batch, "precision": harmonizer.precision,
                 "max_abs_hu_diff_vs_plain": float(diff.max()), "mean_abs_hu_diff_vs_plain": float(diff.mean()),
                 "notes": harmonizer.notes}
        if cuda:
            entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            entry["tflop_per_s"] = record["gflop_per_slice"] * slices / seconds / 1e3
        record["variants"][label] = entry
        print(f"{label:<58}{entry['slices_per_s']:10.1f} slices/s  x{entry['speedup_vs_plain']:.2f}  "
              f"(warm-up {warm:.1f} s; |HU diff| vs plain max {entry['max_abs_hu_diff_vs_plain']:.0f} mean "
              f"{entry['mean_abs_hu_diff_vs_plain']:.2f}" + (f"; peak {entry['peak_gib']:.1f} GiB" if cuda else "") + ")", flush=True)
        save()
        return harmonizer

    kind = "bf16 + channels_last" if cuda else "fp32"
    eager = optimised(f"optimised {kind} (batch {batch}, eager)", batch, False)
    compile_batch = batch
    if args.also_batch:
        label = f"optimised {kind} (batch {args.also_batch}, eager)"
        optimised(label, args.also_batch, False)
        if record["variants"][label]["slices_per_s"] > eager_rate(record, batch, kind):
            compile_batch = args.also_batch  # compile at the faster batch (each batch size is one compilation)
    if args.profile and cuda:
        from profiling import profile_summary

        args.profile.write_text(profile_summary(lambda: eager.harmonize(hu),
                                                f"== a) one pass over {slices} slices, optimised eager path, batch {batch}, {name}"))
        print(f"wrote {args.profile}", flush=True)
    if args.compile:
        for mode in [m.strip() for m in args.compile_mode.split(",") if m.strip()]:
            named = "" if mode == "default" else f", mode {mode}"
            try:
                optimised(f"optimised {kind} + torch.compile{named} (batch {compile_batch})" if cuda else
                          f"optimised {kind} (batch {compile_batch}; compile is CUDA-only, eager here)", compile_batch,
                          True if mode == "default" else mode)
            except Exception as exc:  # a mode failing to compile must not lose the figures already measured
                print(f"torch.compile{named}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})", flush=True)
            if not cuda:
                break

    best = max(v["slices_per_s"] for v in record["variants"].values())
    plain = record["variants"]["plain fp32 loop (batch 1, eager)"]["slices_per_s"]
    record["best_slices_per_s"], record["best_speedup"] = best, best / plain
    record["target_met"] = best >= 1500 and best / plain >= 5
    save()
    print(f"{'best':<58}{best:10.1f} slices/s  x{best / plain:.2f}  (target >= 1,500 and >= 5x: "
          f"{'met' if record['target_met'] else 'missed'})")
    if not cuda:
        print(f"{'seconds per slice (plain / best)':<58}{1 / plain:10.2f} / {1 / best:.2f}")


if __name__ == "__main__":
    main()

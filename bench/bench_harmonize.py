"""Harmonizing a 512x512 volume end to end, HU array to HU array: a plain fp32 loop (batch 1, eager, one
slice at a time) against the optimised path (``radiomicgan.harmonize.Harmonizer``: batches, bf16 autocast,
channels_last, pinned memory and overlapped copies on CUDA, optional torch.compile), in one run.
Prints figures; asserts nothing.

    python bench/bench_harmonize.py [--slices 300] [--batch 16] [--compile] [--device cuda]

Targets on one H100 (issue 4): at least 1,000 slices/s and at least 4x the plain loop. On a CPU the default is
4 slices and the figure is seconds per slice.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from radiomicgan.harmonize import Harmonizer
from radiomicgan.modelio import LoadedModel
from radiomicgan.models import RadiomicGANGenerator, pad_to_multiple
from radiomicgan.window import STANDARD_RANGE, carry_weight, from_unit, to_unit


def model() -> LoadedModel:
    torch.manual_seed(0)
    generator = RadiomicGANGenerator("random")  # the architecture's cost; weights do not matter here
    torch.nn.init.normal_(generator.head.conv.weight, 0.0, 0.01)
    return LoadedModel(card={"method": "radiomicgan", "hu_range": list(STANDARD_RANGE)}, generator=generator.eval())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    slices = args.slices or (300 if cuda else 4)
    batch = args.batch or (16 if cuda else 4)
    hu = np.random.default_rng(0).uniform(-1024, 1500, (slices, 512, 512)).astype(np.float32)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; volume {slices}x512x512")

    loaded = model()
    warm = hu[: min(4, slices)]
    plain_loop(loaded, warm, args.device)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    reference = plain_loop(loaded, hu, args.device)
    if cuda:
        torch.cuda.synchronize()
    plain = time.perf_counter() - start

    harmonizer = Harmonizer(loaded, device=args.device, batch=batch, compile=args.compile)
    harmonizer.harmonize(hu[: min(2 * batch, slices)])  # warm-up (and compilation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fast_out = harmonizer.harmonize(hu)
    if cuda:
        torch.cuda.synchronize()
    fast = time.perf_counter() - start

    label = f"optimised (batch {harmonizer.batch}, {harmonizer.precision}" + (", channels_last" if cuda else "") + (", compiled" if args.compile else "") + ")"
    print(f"{'plain fp32 loop (batch 1, eager)':<52}{slices / plain:10.2f} slices/s")
    print(f"{label:<52}{slices / fast:10.2f} slices/s")
    print(f"{'speed-up':<52}{plain / fast:10.2f} x")
    diff = np.abs(fast_out - reference)
    print(f"{'optimised vs plain: max / mean |HU difference|':<52}{diff.max():10.1f} / {diff.mean():.2f}")
    if cuda:
        print(f"{'peak GPU memory (optimised)':<52}{torch.cuda.max_memory_allocated() / 2**30:10.2f} GiB")
    else:
        print(f"{'seconds per 512x512 slice (plain / optimised)':<52}{plain / slices:10.2f} / {fast / slices:.2f}")


if __name__ == "__main__":
    main()

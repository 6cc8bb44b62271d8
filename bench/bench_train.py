"""Training speed at 512x512: the plain fp32 loop against the optimised one (bf16 autocast + channels_last,
optionally torch.compile), in one run, with the training code's own step. Prints figures; asserts nothing.

    python bench/bench_train.py [--batch 16] [--steps 10] [--compile] [--device cuda]

Targets on one H100 (issue 3): the optimised loop at least 2x the fp32 loop and at least 200 pairs/s.
On a CPU the default is batch 1 and 2 steps: expect seconds per pair (about 7 s on 2 cores); the optimised
loop there is channels_last in fp32, since bf16 autocast is emulated on CPUs without native bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch
import torch.nn.functional as F

from radiomicgan.models import PatchDiscriminator, RadiomicGANGenerator
from radiomicgan.train import TrainConfig, train_step


def run(device: str, batch: int, steps: int, size: int, optimised: bool, compile_model: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    memory_format = torch.channels_last if optimised else torch.contiguous_format
    g = RadiomicGANGenerator("random").to(device, memory_format=memory_format).train()
    d = PatchDiscriminator().to(device, memory_format=memory_format).train()
    if compile_model:
        g, d = torch.compile(g), torch.compile(d)
    opt_g = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], 1e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 1e-4, betas=(0.5, 0.999))
    x = (torch.rand(batch, 1, size, size, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    y = (x + 0.01 * torch.randn_like(x)).contiguous(memory_format=memory_format)
    # bf16 autocast on CUDA only, as training does: CPUs without native bf16 emulate it, minutes per step
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if optimised and cuda else contextlib.nullcontext()
    config = TrainConfig()
    for _ in range(2):  # warm-up (and compilation)
        train_step(config, g, d, opt_g, opt_d, x, y, autocast, F)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(config, g, d, opt_g, opt_d, x, y, autocast, F)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return batch * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the optimised loop")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    batch = args.batch or (16 if cuda else 1)
    steps = args.steps or (10 if cuda else 2)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.size}x{args.size}, batch {batch}, {steps} timed steps of G and D")
    plain, plain_peak = run(args.device, batch, steps, args.size, optimised=False, compile_model=False)
    fast, fast_peak = run(args.device, batch, steps, args.size, optimised=True, compile_model=args.compile)
    unit = "GiB GPU" if cuda else "GiB RSS (process peak)"
    label = ("bf16 autocast + channels_last" if cuda else "channels_last (bf16 is GPU-only)") + (" + torch.compile" if args.compile else "")
    print(f"{'fp32 eager loop':<48}{plain:10.2f} pairs/s   peak {plain_peak:.1f} {unit}")
    print(f"{label:<48}{fast:10.2f} pairs/s   peak {fast_peak:.1f} {unit}")
    print(f"{'speed-up':<48}{fast / plain:10.2f} x")
    if not cuda:
        print(f"{'seconds per pair (fp32 / optimised)':<48}{1 / plain:10.2f} / {1 / fast:.2f}")


if __name__ == "__main__":
    main()

"""Training speed at 512x512: the plain fp32 loop against the optimised one (bf16 autocast + channels_last, then
a fused Adam, optionally torch.compile), in one run, with the training code's own step. Prints figures; asserts
nothing.

    python bench/bench_train.py [--batch 16] [--steps 10] [--compile] [--encoder trainable,frozen] [--device cuda]
                                [--json FILE]

Both encoders the product trains are timed, each against its own fp32 loop: ``frozen`` is the paper's
configuration (ImageNet VGG-19 frozen: what a user with the ImageNet weights trains; nothing flows back through
the VGG groups), ``trainable`` the offline fallback (random VGG weights, trained, so the backward pass also
crosses the VGG groups: about 1.5x the arithmetic per pair). Random weights stand in for ImageNet's in both: the
cost does not depend on their values.

Targets on one H100 (issue 11): at least 400 pairs/s and at least 2x the fp32 loop; peak memory printed. A
variant that runs out of memory is retried at half the batch (the batch it ran at is printed). On a CPU the
default is batch 1 and 2 steps: expect seconds per pair (about 7 s on 2 cores); the optimised loop there is
channels_last in fp32, since bf16 autocast is emulated on CPUs without native bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from pathlib import Path

import torch

from radiomicgan.models import PatchDiscriminator, RadiomicGANGenerator
from radiomicgan.train import TrainConfig, train_step


def setup(device: str, batch: int, size: int, optimised: bool, compile_model: bool, fused: bool = False,
          encoder: str = "trainable"):
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    memory_format = torch.channels_last if optimised else torch.contiguous_format
    g = RadiomicGANGenerator("random", finetune_vgg=encoder == "trainable").to(device, memory_format=memory_format).train()
    d = PatchDiscriminator().to(device, memory_format=memory_format).train()
    if compile_model:
        g, d = torch.compile(g), torch.compile(d)
    # fused=True: one kernel per parameter group for the whole Adam update instead of the foreach default's several
    adam = {"betas": (0.5, 0.999), **({"fused": True} if fused else {})}
    opt_g = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], 1e-4, **adam)
    opt_d = torch.optim.Adam(d.parameters(), 1e-4, **adam)
    x = (torch.rand(batch, 1, size, size, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    y = (x + 0.01 * torch.randn_like(x)).contiguous(memory_format=memory_format)
    # bf16 autocast on CUDA only, as training does: CPUs without native bf16 emulate it, minutes per step
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if optimised and cuda else contextlib.nullcontext()
    return g, d, opt_g, opt_d, x, y, autocast


def run(device: str, batch: int, steps: int, size: int, optimised: bool, compile_model: bool,
        profile: Path | None = None, fused: bool = False, encoder: str = "trainable") -> dict:
    cuda = device.startswith("cuda")
    g, d, opt_g, opt_d, x, y, autocast = setup(device, batch, size, optimised, compile_model, fused, encoder)
    config = TrainConfig()
    started = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        train_step(config, g, d, opt_g, opt_d, x, y, autocast)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = time.perf_counter() - started
    start = time.perf_counter()
    for _ in range(steps):
        train_step(config, g, d, opt_g, opt_d, x, y, autocast)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if profile is not None and cuda:
        from profiling import profile_summary

        profile.write_text(profile_summary(lambda: train_step(config, g, d, opt_g, opt_d, x, y, autocast),
                                           f"== b) one training step of G and D, batch {batch}, {size}x{size}, "
                                           f"{'bf16 + channels_last' if optimised else 'fp32'}{', fused Adam' if fused else ''}, "
                                           f"{encoder} VGG encoder, {torch.cuda.get_device_name()}"))
    return {"pairs_per_s": batch * steps / elapsed, "batch": batch, "steps": steps, "warmup_s": warm,
            "peak_gib": peak, "peak_kind": "GPU allocated" if cuda else "process RSS"}


def run_fitting(device: str, batch: int, **kwargs) -> dict:
    """``run`` at ``batch``, halving it on out-of-memory (an fp32 step at batch 16 may not fit on 80 GB)."""
    while True:
        try:
            return run(device, batch, **kwargs)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        batch //= 2
        print(f"  out of memory: retrying at batch {batch}", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="also time the optimised loop with torch.compile")
    parser.add_argument("--encoder", default="trainable,frozen",
                        help="comma-separated: trainable (random VGG, trained), frozen (the paper's ImageNet configuration)")
    parser.add_argument("--profile", type=Path, help="write one optimised step's top CUDA kernels here (CUDA only)")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each variant)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    batch = args.batch or (16 if cuda else 1)
    steps = args.steps or (10 if cuda else 2)
    encoders = [e.strip() for e in args.encoder.split(",") if e.strip()]
    if not encoders or any(e not in ("trainable", "frozen") for e in encoders):
        parser.error("--encoder takes trainable, frozen or both")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes, every loop alike
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.size}x{args.size}, batch {batch}, {steps} timed steps of G and D", flush=True)
    record = {"part": "train", "device": name, "torch": torch.__version__, "size": args.size, "variants": {},
              "encoders": {}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")

    unit = "GiB GPU" if cuda else "GiB RSS (process peak)"
    kind = "bf16 autocast + channels_last" if cuda else "channels_last (bf16 is GPU-only)"
    for encoder in encoders:
        suffix = f", {encoder} VGG"
        plain_label = "fp32 eager loop" + suffix
        # (label, optimised, compile, fused Adam, profile); fused Adam on CUDA only (the CPU's is not what we time)
        variants = [(plain_label, False, False, False, None),
                    (kind + suffix, True, False, False, args.profile if encoder == encoders[0] else None)]
        if cuda:
            variants.append((kind + " + fused Adam" + suffix, True, False, True, None))
        if args.compile:
            variants.append((kind + (" + fused Adam" if cuda else "") + " + torch.compile" + suffix, True, True, cuda, None))
        for label, optimised, compile_model, fused, profile in variants:
            try:
                entry = run_fitting(args.device, batch, steps=steps, size=args.size, optimised=optimised,
                                    compile_model=compile_model, profile=profile, fused=fused, encoder=encoder)
            except Exception as exc:  # one variant failing (e.g. compilation) must not lose the others' figures
                print(f"{label:<64}FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", flush=True)
                record["variants"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "encoder": encoder}
                save()
                continue
            entry["encoder"] = encoder
            if label != plain_label and "pairs_per_s" in record["variants"].get(plain_label, {}):
                entry["speedup_vs_fp32"] = entry["pairs_per_s"] / record["variants"][plain_label]["pairs_per_s"]
            record["variants"][label] = entry
            print(f"{label:<64}{entry['pairs_per_s']:10.2f} pairs/s   batch {entry['batch']}   peak {entry['peak_gib']:.1f} {unit}"
                  + (f"   x{entry['speedup_vs_fp32']:.2f}" if "speedup_vs_fp32" in entry else "")
                  + f"   (warm-up {entry['warmup_s']:.1f} s)", flush=True)
            save()
            if cuda:
                torch.cuda.empty_cache()
        rates = {k: v["pairs_per_s"] for k, v in record["variants"].items() if v.get("encoder") == encoder and "pairs_per_s" in v}
        if plain_label in rates:
            plain, best = rates[plain_label], max(rates.values())
            met = best >= 400 and best / plain >= 2
            record["encoders"][encoder] = {"best_pairs_per_s": best, "best_speedup": best / plain, "target_met": met,
                                           "best_variant": max(rates, key=rates.get)}
            print(f"{'best' + suffix:<64}{best:10.2f} pairs/s   x{best / plain:.2f}  (target >= 400 and >= 2x: "
                  f"{'met' if met else 'missed'})", flush=True)
            if not cuda:
                print(f"{'seconds per pair (fp32 / best)' + suffix:<64}{1 / plain:10.2f} / {1 / best:.2f}")
        save()
    if record["encoders"]:  # the headline: the paper's configuration where it was timed
        headline = record["encoders"].get("frozen") or next(iter(record["encoders"].values()))
        record["best_pairs_per_s"], record["best_speedup"] = headline["best_pairs_per_s"], headline["best_speedup"]
        record["target_met"] = headline["target_met"]
        record["headline_encoder"] = "frozen" if "frozen" in record["encoders"] else next(iter(record["encoders"]))
    save()


if __name__ == "__main__":
    main()

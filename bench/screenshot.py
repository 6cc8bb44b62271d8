"""Make the extension's screenshot (Resources/Screenshots/harmonization.png) from a real run: phantom pairs,
a small RadiomicGAN trained on two of them, a third scan no model saw harmonized by the core's command line with Grad-CAM,
and input, result, standard-kernel reference and the result's Grad-CAM map side by side.

    python bench/screenshot.py [--work DIR]   # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "harmonization.png")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="radiomicgan-screenshot-"))
    cli = [sys.executable, "-m", "radiomicgan.cli"]
    for folder, cases, seed in (("pairs", 2, 3), ("test", 1, 9)):  # the test scan is one no model saw
        subprocess.run([*cli, "simulate", "--out", str(work / folder), "--cases", str(cases), "--size", "160",
                        "--slices", "4", "--seed", str(seed)], check=True)
    from radiomicgan.dataset import load_manifest
    from radiomicgan.io import read_volume
    from radiomicgan.metrics import psnr

    held_out = load_manifest(work / "test").pairs[0]
    subprocess.run([*cli, "train", "--pairs", str(work / "pairs"), "--out", str(work / "model"), "--method", "radiomicgan",
                    "--schedule", "dwt", "--epochs", "8", "--steps-per-epoch", "20", "--batch", "4", "--crop", "64",
                    "--vgg-weights", "random", "--val-slices", "2", "--device", "cpu"], check=True)
    subprocess.run([*cli, "harmonize", str(held_out.source), "--model", str(work / "model"), "--out",
                    str(work / "harmonized.nrrd"), "--gradcam", str(work / "cam.nrrd"), "--device", "cpu"], check=True)
    source, target = read_volume(held_out.source), read_volume(held_out.target)
    result, cam = read_volume(work / "harmonized.nrrd"), read_volume(work / "cam.nrrd", check_hu=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = source.shape[0] // 2
    window = dict(cmap="gray", vmin=-1000, vmax=400)
    fig, axes = plt.subplots(1, 4, figsize=(13.5, 3.9), dpi=110)
    panels = [(source.hu[z], f"input ({held_out.source_kernel}), {psnr(source.hu, target.hu):.1f} dB"),
              (result.hu[z], f"RadiomicGAN result, {psnr(result.hu, target.hu):.1f} dB"),
              (target.hu[z], f"reference ({held_out.target_kernel})")]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, **window)
        ax.set_title(title, fontsize=10)
    axes[3].imshow(result.hu[z], **window)
    axes[3].imshow(np.ma.masked_less(cam.hu[z], 0.5), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[3].set_title("Grad-CAM of the result (> 0.5)", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("RadiomicGAN: a held-out phantom scan harmonized from the smooth to the sharp kernel "
                 "(PSNR against the reference, W 1400 / L -300)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

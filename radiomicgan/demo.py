"""The main job on the embedded default data (the phantom): no user data needed.

Today: make a phantom pair (smooth and sharp kernel of one scan), show both side by side and say how far apart
they are (PSNR/SSIM): the gap harmonization has to close. Later steps train, harmonize and evaluate.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from .dataset import load_manifest, load_pair
from .errors import CTInputError
from .io import move_into_place
from .metrics import psnr, ssim
from .simulate import simulate_phantom_pairs

DEMO_MARKER = ".radiomicgan-demo"
DISPLAY_WINDOW = (-800.0, 800.0)  # the paper's display window
LUNG_WINDOW = (-1200.0, 200.0)


def run_demo(out: Path, size: int = 256, slices: int = 8, seed: int = 0) -> dict:
    """Writes into ``out`` (replacing only an earlier demo's output) and returns the summary."""
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise CTInputError(f"{out}: exists and was not made by the demo; refusing to overwrite (use --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / DEMO_MARKER).write_text("made by `radiomicgan demo`; safe to delete\n")
        print(f"[1/2] simulating a {size}x{size}x{slices} chest phantom with a smooth (B30) and a sharp (B50) kernel")
        manifest = load_manifest(simulate_phantom_pairs(tmp / "data", 1, size=size, slices=slices, seed=seed))
        source, target = load_pair(manifest.pairs[0])
        summary = {
            "pair": {"source_kernel": source.meta.kernel, "target_kernel": target.meta.kernel, "shape_zyx": list(source.shape)},
            "source_vs_target": {"psnr_db": psnr(target.hu, source.hu), "ssim": ssim(target.hu, source.hu)},
            "noise_std_hu": {
                source.meta.kernel: _air_free_noise(source.hu, target.hu)[0],
                target.meta.kernel: _air_free_noise(source.hu, target.hu)[1],
            },
        }
        print("[2/2] plotting both kernels side by side")
        _plot_pair(source.hu, target.hu, source.meta.kernel, target.meta.kernel, summary, tmp / "kernels.png")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        move_into_place(tmp, out, overwrite=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"\n{'image pair':<28}{'PSNR (dB)':>10}{'SSIM':>8}")
    s = summary["source_vs_target"]
    print(f"{source.meta.kernel + ' vs ' + target.meta.kernel:<28}{s['psnr_db']:>10.2f}{s['ssim']:>8.4f}")
    print(f"\nwrote {out / 'kernels.png'}, {out / 'summary.json'} and the pair in {out / 'data'}")
    return summary


def _air_free_noise(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """High-pass standard deviation in soft tissue: the visible noise difference between kernels."""
    from scipy import ndimage

    mask = (a > -150) & (a < 150) & (b > -150) & (b < 150)
    out = []
    for image in (a, b):
        residual = image - ndimage.uniform_filter(image, size=(1, 5, 5))
        out.append(float(residual[mask].std()) if mask.any() else float("nan"))
    return out[0], out[1]


def _plot_pair(source, target, source_name, target_name, summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = source.shape[0] // 2
    rows, cols = source.shape[1:]
    zoom = (slice(rows // 3, rows // 3 + rows // 4), slice(cols // 5, cols // 5 + cols // 4))
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    panels = [
        (source[k], f"{source_name} (source)", DISPLAY_WINDOW, "gray"),
        (target[k], f"{target_name} (target)", DISPLAY_WINDOW, "gray"),
        (target[k] - source[k], "target - source (HU)", (-150.0, 150.0), "RdBu_r"),
        (source[k][zoom], f"{source_name}, lung detail", LUNG_WINDOW, "gray"),
        (target[k][zoom], f"{target_name}, lung detail", LUNG_WINDOW, "gray"),
        ((target[k] - source[k])[zoom], "difference, lung detail", (-150.0, 150.0), "RdBu_r"),
    ]
    for ax, (image, title, window, cmap) in zip(axes.ravel(), panels):
        shown = ax.imshow(image, cmap=cmap, vmin=window[0], vmax=window[1], interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    s = summary["source_vs_target"]
    fig.suptitle(
        f"Same phantom scan, two reconstruction kernels (slice {k}): PSNR {s['psnr_db']:.2f} dB, SSIM {s['ssim']:.4f}\n"
        f"display window [{DISPLAY_WINDOW[0]:.0f}, {DISPLAY_WINDOW[1]:.0f}] HU, lung detail [{LUNG_WINDOW[0]:.0f}, {LUNG_WINDOW[1]:.0f}] HU"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

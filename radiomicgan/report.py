"""Reproducibility reports: features.csv (long format), ccc.csv (feature x candidate), summary.json and a
self-contained report.html with the paper's tables and plots. CSVs use '.' decimals whatever the locale."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from .errors import CTInputError
from .reproducibility import Evaluation, feature_kind
from .staging import staged
from .volume import CTVolume

DISPLAY_WINDOW = (-800.0, 800.0)
REPORT_FILES = ("features.csv", "ccc.csv", "summary.json", "report.html")


def write_report(evaluation: Evaluation, out: Path, volumes: dict[str, CTVolume], overwrite: bool = False) -> Path:
    """Write the report folder atomically (complete or not at all); returns it."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CTInputError(f"{out}: already exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, directory=True, owned=lambda f: f.name in REPORT_FILES) as tmp:
        _features_csv(evaluation, tmp / "features.csv")
        _ccc_csv(evaluation, tmp / "ccc.csv")
        (tmp / "summary.json").write_text(json.dumps(evaluation.summary, indent=2, default=_json_default) + "\n")
        (tmp / "report.html").write_text(_html(evaluation, volumes))
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value))


def _number(value: float) -> str:
    return "" if not np.isfinite(value) else repr(float(value))  # repr: '.' decimals, full precision, no locale


def _features_csv(evaluation: Evaluation, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["roi", "group", "image", "feature", "value"])
        for image, matrix in evaluation.features.items():
            for roi, row in zip(evaluation.rois, matrix):
                for feature, value in zip(evaluation.feature_names, row):
                    writer.writerow([roi.name, roi.group, image, feature, _number(value)])


def _ccc_csv(evaluation: Evaluation, path: Path) -> None:
    candidates = evaluation.summary["candidates"]
    groups = sorted({g for g, _ in evaluation.ccc}, key=list(evaluation.summary["groups"]).index)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "feature", "image_type", "feature_class", *candidates])
        for group in groups:
            for k, feature in enumerate(evaluation.feature_names):
                image_type, feature_class = feature_kind(feature)
                writer.writerow([group, feature, image_type, feature_class,
                                 *[_number(evaluation.ccc[(group, c)][k]) for c in candidates]])


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _html(evaluation: Evaluation, volumes: dict[str, CTVolume]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = evaluation.summary
    candidates = s["candidates"]
    groups = [g for g, v in s["groups"].items() if "too_small" not in v]
    esc = html.escape

    # Table 1: reproducible features per ROI group: the count on all ROIs with its bootstrap interval, and the
    # paper's mean +- SD over the resamples; a group with too few ROIs gets no count.
    def cell(g, c):
        entry = s["groups"][g]
        if "too_small" in entry:
            return f"<td><i>too small</i> <small>({esc(entry['too_small'])})</small></td>"
        r = entry[c]
        return (f"<td><b>{r['reproducible']}</b> <small>[{_interval(r)}]</small><br>{r['bootstrap_mean']:.0f} &plusmn; "
                f"{r['bootstrap_sd']:.0f} <small>({r['excluded_undefined']} undefined)</small></td>")

    rows = "".join(f"<tr><th>{esc(c)}</th>" + "".join(cell(g, c) for g in s["groups"]) + "</tr>" for c in candidates)
    header = "".join(f"<th>{esc(g)} <small>({v['rois']} ROIs)</small></th>" for g, v in s["groups"].items())
    table1 = f"<table><tr><th>image</th>{header}</tr>{rows}</table>"
    table2 = "<table><tr><th>image</th><th>PSNR (dB)</th><th>SSIM</th><th>PSNR in body (dB)</th><th>SSIM in body</th></tr>" + "".join(
        f"<tr><th>{esc(c)}</th><td>{m['psnr_db']:.2f}</td><td>{m['ssim']:.4f}</td><td>{m['psnr_body_db']:.2f}</td><td>{m['ssim_body']:.4f}</td></tr>"
        for c, m in s["image_metrics"].items()) + "</table>"

    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for c in candidates:
            values = evaluation.ccc[(group, c)]
            ax.hist(values[np.isfinite(values)].clip(-1, 1), bins=40, range=(-1, 1), histtype="step", label=c)
        ax.axvline(s["threshold"], color="k", ls="--", lw=0.8)
        ax.set_title(f"CCC, ROIs in {group}", fontsize=9)
        ax.set_xlabel("Lin's CCC")
    axes[0][0].set_ylabel("features")
    if groups:
        axes[0][-1].legend(fontsize=7)
    histograms = _png(fig)

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(groups)), 3.4))
    width = 0.8 / max(1, len(candidates))
    for k, c in enumerate(candidates):
        points = [s["groups"][g][c]["reproducible"] for g in groups]
        bounds = [s["groups"][g][c]["interval"] or [p, p] for g, p in zip(groups, points)]
        errors = [[p - b[0] for p, b in zip(points, bounds)], [b[1] - p for p, b in zip(points, bounds)]]
        ax.bar(np.arange(len(groups)) + k * width, points, width, yerr=np.clip(errors, 0, None), label=c, capsize=2)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
    ax.set_ylabel(f"reproducible features (CCC > {s['threshold']})")
    ax.legend(fontsize=7)
    counts = _png(fig)

    names = [s["reference"], *candidates]
    reference = volumes[s["reference"]]
    k = reference.shape[0] // 2
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.imshow(volumes[name].hu[k], cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    colours = dict(zip(s["groups"], ["lime", "orange", "cyan", "magenta", "yellow", "red"] * len(s["groups"])))
    for roi in evaluation.rois:
        z0, z1, y0, y1, x0, x1 = roi.box
        if z0 <= k < z1 and roi.group != "whole image":
            axes[0][0].add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6,
                                                              color=colours.get(roi.group, "lime"), label=roi.group))
    handles = {h.get_label(): h for h in axes[0][0].patches}
    if handles:
        axes[0][0].legend(handles.values(), handles.keys(), fontsize=6, loc="lower left")
    panels = _png(fig)

    skipped = "".join(f"<li>{esc(r['roi'])}: {esc(r['reason'])}</li>" for r in s["rois_skipped"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>RadiomicGAN reproducibility report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}small{{color:#666}}</style></head><body>
<h1>Radiomic reproducibility against {esc(s['reference'])}</h1>
<p>{s['features']} pyradiomics features per ROI ({s['rois']} ROIs); a feature is reproducible when Lin's CCC between a
candidate and the reference over the ROIs of a group exceeds {s['threshold']}.
Each cell gives the count on all ROIs of the group (bold) with its {esc(s['interval'])} in brackets, then the
mean &plusmn; SD over those resamples (as the paper reports). A group with fewer than {s['min_rois']} ROIs is
reported as too small rather than given a count. {esc(s['zero_variance_rule'])}.</p>
<h2>Reproducible features per ROI group (paper Table 1)</h2>{table1}{f'<img src="{counts}">' if groups else ''}
<h2>CCC distributions</h2><img src="{histograms}">
<h2>Image similarity (paper Table 2)</h2><p>HU clipped to [-1024, 3071]; "body" is the patient outline of the reference.</p>{table2}
<h2>Images</h2><p>Slice {k}, display window [{DISPLAY_WINDOW[0]:.0f}, {DISPLAY_WINDOW[1]:.0f}] HU; ROI boxes on the reference, coloured by group.</p><img src="{panels}">
{f'<h2>ROIs not measured</h2><ul>{skipped}</ul>' if skipped else ''}
<h2>Provenance</h2><p>pyradiomics {esc(str(s['pyradiomics_version']))}, parameters {esc(s['params_file'])}, seed {s['seed']}.</p>
<pre>{esc(Path(s['params_file']).read_text()) if Path(s['params_file']).is_file() else ''}</pre>
</body></html>
"""


def _interval(counts: dict) -> str:
    interval = counts.get("interval")
    return "no bootstrap" if interval is None else f"{interval[0]:.0f}, {interval[1]:.0f}"


def format_counts(summary: dict) -> str:
    """The paper's Table 1 (reproducible features per ROI group) and Table 2 (PSNR, SSIM) as text: per group the
    count on all ROIs [bootstrap interval] and mean +- SD over the resamples; too small groups say so."""
    groups = summary["groups"]

    def cell(v: dict, c: str) -> str:
        if "too_small" in v:
            return "too small"
        r = v[c]
        return f"{r['reproducible']} [{_interval(r)}] {r['bootstrap_mean']:.0f} +- {r['bootstrap_sd']:.0f}"

    headers = {g: f"{g} ({v['rois']} ROIs)" for g, v in groups.items()}
    widths = {g: 2 + max([len(headers[g])] + [len(cell(v, c)) for c in summary["candidates"]]) for g, v in groups.items()}
    lines = [f"Reproducible features (CCC > {summary['threshold']}) of {summary['features']}: count on all ROIs "
             f"[{summary.get('confidence', 0.95):.0%} bootstrap interval] mean +- SD over {summary['bootstrap_resamples']} ROI resamples"]
    lines.append(f"{'image':<22}" + "".join(headers[g].rjust(widths[g]) for g in groups) + f"{'PSNR (dB)':>11}{'SSIM':>8}")
    for c in summary["candidates"]:
        m = summary["image_metrics"][c]
        lines.append(f"{c:<22}" + "".join(cell(v, c).rjust(widths[g]) for g, v in groups.items())
                     + f"{m['psnr_db']:>11.2f}{m['ssim']:>8.4f}")
    for g, v in groups.items():
        if "too_small" in v:
            lines.append(f"  group {g}: too small, {v['too_small']}")
    return "\n".join(lines)

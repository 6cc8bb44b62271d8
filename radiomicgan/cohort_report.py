"""The cohort report: one self-contained HTML file (plots embedded as PNG) beside qa.csv, features.csv and
cohort.json: the QA table with flagged and failed scans first, the QA distributions, the batch-effect counts per
method, and a few image panels (the middle slice of input and result)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .cohort_stats import METHODS, TEST
from .report import _png

REPORT_NAME = "report.html"
PANELS = 4
DISPLAY_WINDOW = (-800.0, 800.0)
SHOWN = ("scan", "status", "reason", "warnings", "kernel_before", "kernel_after", "batch", "slices", "seconds",
         "hu_shift_soft_tissue", "hu_shift_lung", "outline_shift_body_px", "outline_shift_lung_px", "p_standard_input",
         "p_standard_result", "hot_fraction_input", "hot_fraction_result", "rois")


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _cell(value) -> str:
    number = _number(value) if not isinstance(value, (bool, str)) else None
    if number is not None:
        return f"{number:.3g}" if abs(number) < 1000 else f"{number:.0f}"
    return html.escape("" if value is None else str(value))


def _qa_plot(rows: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "harmonized"]
    if not done:
        return None
    panels = [("hu_shift_soft_tissue", "mean HU shift, soft tissue"), ("hu_shift_lung", "mean HU shift, lung"),
              ("outline_shift_body_px", "outline shift body / lung (px)"), ("p_standard_input", "discriminator p(standard)"),
              ("seconds", "seconds per scan")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8))
    for ax, (key, title) in zip(axes, panels):
        if key == "p_standard_input":
            for k, label in (("p_standard_input", "input"), ("p_standard_result", "result")):
                values = [v for r in done if (v := _number(r.get(k))) is not None]
                if values:
                    ax.hist(values, bins=12, range=(0, 1), alpha=0.6, label=label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        elif key == "outline_shift_body_px":
            for k, label in (("outline_shift_body_px", "body"), ("outline_shift_lung_px", "lung")):
                values = [v for r in done if (v := _number(r.get(k))) is not None]
                if values:
                    ax.hist(values, bins=12, alpha=0.6, label=label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        else:
            values = [v for r in done if (v := _number(r.get(key))) is not None]
            if values:
                ax.hist(values, bins=12, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def _batch_plot(stats: dict) -> str | None:
    import matplotlib.pyplot as plt

    counts = stats.get("test_scans") or {}
    methods = [m for m in METHODS if counts.get(m) and counts[m].get("differ") is not None]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    values = [counts[m]["differ"] for m in methods]
    bars = ax.bar(methods, values, color=["tab:grey", "tab:blue", "tab:orange", "tab:green"][: len(methods)])
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("features x ROI groups differing", fontsize=8)
    ax.set_title(f"batch effect on the test scans (of {counts[methods[0]]['tests']} tests)", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _panels(out: Path, rows: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    from .cohort import preview_path

    chosen = [r for r in rows if r["status"] == "harmonized" and preview_path(out, r["scan"]).is_file()][:PANELS]
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.5 * len(chosen)), squeeze=False)
    for (a, b, c), row in zip(axes, chosen):
        with np.load(preview_path(out, row["scan"])) as data:
            before, after = data["input"].astype(np.float32), data["result"].astype(np.float32)
        a.imshow(before, cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        b.imshow(after, cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        c.imshow(after - before, cmap="coolwarm", vmin=-150, vmax=150)
        a.set_title(f"{row['scan']}\ninput ({row['kernel_before']})", fontsize=8)
        b.set_title(f"result ({row['kernel_after']})" + (" - FLAGGED" if row.get("flagged") else ""), fontsize=8)
        c.set_title("result - input (+-150 HU)", fontsize=8)
        for ax in (a, b, c):
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _batch_table(stats: dict) -> str:
    esc = html.escape
    if not stats or "test_scans" not in stats:
        return "<p>No features measured (run with <code>--rois labels</code> or <code>--rois ranges</code>).</p>"
    rep = stats.get("reproducible")

    def cell(entry):
        if not entry or entry.get("differ") is None:
            return "<td>-</td>"
        return f"<td><b>{entry['differ']}</b> / {entry['tests']}</td>"

    head = "<tr><th>method</th><th>differing, test scans</th><th>differing, all scans</th>" + (
        "<th>reproducible vs paired reference (CCC &gt; 0.85)</th>" if rep else "") + "</tr>"
    body = ""
    for method in METHODS:
        test = stats["test_scans"].get(method)
        whole = stats["all_scans"].get(method)
        note = "" if test else f" <small>({esc(stats['combat'].get('reason', ''))})</small>"
        body += f"<tr><th>{esc(method)}{note}</th>{cell(test)}{cell(whole)}" + (
            f"<td>{rep['counts'].get(method, '-')}</td>" if rep else "") + "</tr>"
    split = stats["split"]
    text = (f"<p>{esc(TEST)}, q &lt; {stats['alpha']}; {stats['features']} features on {len(stats['roi_groups'])} ROI "
            f"group(s) ({esc(', '.join(stats['roi_groups']))}); observations (scan x ROI) per batch: "
            f"{esc(', '.join(f'{b} {n}' for b, n in stats['batches'].items()))}. "
            f"ComBat ({esc(stats['combat'].get('library', 'neuroHarmonize'))}) is learned on the training scans only "
            f"({len(split['train_scans'])}, split by patient, seed {split['seed']}) and applied to the "
            f"{len(split['test_scans'])} test scans; every method is compared on those test scans.</p>")
    if rep:
        text += (f"<p>Paired reconstructions: {rep['pairs']} ROI pairs of test scans against the same patient's "
                 f"{esc(rep['reference_batch'])} scan, each method on both sides.</p>")
    return f"<table>{head}{body}</table>{text}"


def write_cohort_report(out: Path, rows: list[dict], summary: dict) -> Path:
    """OUT/report.html, written atomically."""
    from .cohort import atomic_write

    import matplotlib

    matplotlib.use("Agg")
    esc = html.escape
    counts = summary["counts"]
    qa_img, batch_img, panel_img = _qa_plot(rows), _batch_plot(summary.get("batch_effect") or {}), _panels(Path(out), rows)
    header = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in SHOWN)
    body = ""
    for row in rows:
        style = ' class="flag"' if row.get("flagged") else (' class="fail"' if row["status"] == "failed" else (
            ' class="skip"' if row["status"] == "skipped" else ""))
        body += f"<tr{style}>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in SHOWN) + "</tr>"
    model = summary["model"]
    bounds = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in summary["qa_bounds"].items())
    image = lambda src, alt: f'<p><img alt="{alt}" src="{src}"></p>' if src else ""  # noqa: E731
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>RadiomicGAN cohort report</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 5px;text-align:left;vertical-align:top}} tr.flag{{background:#ffe0b0}}
tr.fail{{background:#ffc8c8}} tr.skip{{color:#777}} .sum span{{margin-right:1.2em}} img{{max-width:100%}}</style></head>
<body><h1>RadiomicGAN cohort report</h1>
<p>Model: {esc(str(model.get('method')))} ({esc(str(model.get('source_kernel')))} &rarr; {esc(str(model.get('target_kernel')))}),
{esc(str(model.get('folder')))}; RadiomicGAN {esc(summary['radiomicgan'])}.</p>
<p class="sum"><span><b>{counts['harmonized']}</b> harmonized</span><span><b>{counts['reference']}</b> measured as reference</span>
<span><b>{counts['skipped']}</b> skipped</span><span><b>{counts['failed']}</b> failed</span><span><b>{counts['flagged']}</b> flagged</span>
<span>exit status {summary['exit_status']}</span></p>
<h2>Batch effect between kernel groups</h2>{_batch_table(summary.get('batch_effect'))}{image(batch_img, 'batch effect counts')}
<h2>QA per scan</h2><p>Flagged scans (QA bounds: {esc(bounds)}) and failed scans first. Also in qa.csv and cohort.json.</p>
<table><tr>{header}</tr>{body}</table>
<h2>QA distributions</h2>{image(qa_img, 'QA distributions') or '<p>No harmonized scan.</p>'}
<h2>Image panels</h2>{image(panel_img, 'image panels') or '<p>No harmonized scan.</p>'}
</body></html>
"""
    path = Path(out) / REPORT_NAME
    atomic_write(path, page)
    return path

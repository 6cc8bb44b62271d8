"""Results as MRML table, plot series and plot chart nodes: the training log (losses, validation PSNR and the
training window per epoch, the paper's Fig. 5a) and the ROI radiomics comparison (CCC per feature, reproducible
counts per candidate and ROI group). The scene is an argument; no qt, so the real MRML classes test it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

EPOCH_COLUMNS = ("epoch", "loss_g", "loss_d", "l1", "l1_input", "accuracy", "val_psnr_db", "val_input_psnr_db",
                 "window_lo", "window_hi")
STEP_COLUMNS = ("step", "epoch", "loss_g", "loss_d", "l1", "l1_input", "accuracy")
# chart title, y-axis title, table ("epochs"/"steps"), x column, [(series name, y column)]
TRAINING_CHARTS = {
    "losses": ("RadiomicGAN training losses (epoch means)", "loss", "epochs", "epoch",
               [("generator", "loss_g"), ("discriminator", "loss_d"), ("L1", "l1"), ("L1 of the input", "l1_input")]),
    "psnr": ("RadiomicGAN validation PSNR", "PSNR (dB)", "epochs", "epoch",
             [("harmonized", "val_psnr_db"), ("input", "val_input_psnr_db")]),
    "window": ("RadiomicGAN training window (Fig. 5a)", "HU", "epochs", "epoch",
               [("window low", "window_lo"), ("window high", "window_hi")]),
    "steps": ("RadiomicGAN training losses (steps)", "loss", "steps", "step",
              [("generator", "loss_g"), ("discriminator", "loss_d"), ("L1", "l1")]),
}
COLOURS = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74)]


def _number_column(name: str):
    import vtk

    array = vtk.vtkDoubleArray()
    array.SetName(name)
    return array


def _string_column(name: str):
    import vtk

    array = vtk.vtkStringArray()
    array.SetName(name)
    return array


def new_table(scene, name: str, numeric=(), text=()):
    """A table node with text columns then numeric (double) columns, in that order."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    for column in text:
        table.AddColumn(_string_column(column))
    for column in numeric:
        table.AddColumn(_number_column(column))
    return table


def append_row(table_node, values: dict) -> None:
    """One row; a numeric column missing from ``values`` gets NaN, a text column ''."""
    table = table_node.GetTable()
    for k in range(table.GetNumberOfColumns()):
        array = table.GetColumn(k)
        value = values.get(array.GetName())
        if array.IsA("vtkStringArray"):
            array.InsertNextValue("" if value is None else str(value))
        else:
            array.InsertNextValue(math.nan if value is None else float(value))
    table.Modified()
    table_node.Modified()


def column(table_node, name: str) -> list:
    array = table_node.GetTable().GetColumnByName(name)
    if array is None:
        raise KeyError(name)
    if array.IsA("vtkStringArray"):
        return [array.GetValue(k) for k in range(array.GetNumberOfValues())]
    return [array.GetValue(k) for k in range(array.GetNumberOfTuples())]


def new_chart(scene, name: str, title: str, x_title: str, y_title: str, table_node, x_column: str, series: list,
              plot_type: str = "scatter", label_column: str | None = None):
    """A plot chart node with one plot series node per (series name, y column) of ``table_node``."""
    import slicer

    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    for k, (series_name, y_column) in enumerate(series):
        node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name}: {series_name}"))
        node.SetAndObserveTableNodeID(table_node.GetID())
        node.SetXColumnName(x_column)
        node.SetYColumnName(y_column)
        if plot_type == "bar":
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        else:
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        if label_column:
            node.SetLabelColumnName(label_column)
        node.SetColor(*COLOURS[k % len(COLOURS)])
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
    return chart


# ---------------------------------------------------------------------------------------------- training log


class TrainingLogReader:
    """Reads the JSON lines a running training appends to ``train_log.jsonl``; only complete lines, once each."""

    def __init__(self, path):
        self.path = Path(path)
        self._offset = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        records = []
        for line in data[: end + 1].splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # not ours; the trainer writes whole lines
            if isinstance(record, dict):
                records.append(record)
        return records


class TrainingPlots:
    """Tables and plot charts of one model folder's training log, updated as the log grows (``update()``)."""

    def __init__(self, scene, model_folder, name: str | None = None):
        from radiomicgan.jobs import LOG_NAME

        self.scene = scene
        self.folder = Path(model_folder)
        self.reader = TrainingLogReader(self.folder / LOG_NAME)
        name = name or self.folder.name
        self.epochs = new_table(scene, f"{name} epochs", numeric=EPOCH_COLUMNS)
        self.steps = new_table(scene, f"{name} steps", numeric=STEP_COLUMNS)
        tables = {"epochs": self.epochs, "steps": self.steps}
        self.charts = {}
        for key, (title, y_title, table, x_column, series) in TRAINING_CHARTS.items():
            self.charts[key] = new_chart(scene, f"{name} {key}", title, x_column, y_title, tables[table], x_column, series)
        self.status: str | None = None
        self.records: list[dict] = []

    def update(self) -> list[dict]:
        """Append what the log gained since the last call; returns the new records."""
        new = self.reader.read_new()
        for record in new:
            event = record.get("event")
            if event == "epoch":
                window = record.get("window") or [None, None]
                append_row(self.epochs, {**{k: record.get(k) for k in EPOCH_COLUMNS}, "epoch": record["epoch"] + 1,
                                         "window_lo": window[0], "window_hi": window[1]})
            elif event == "step":
                append_row(self.steps, {k: record.get(k) for k in STEP_COLUMNS})
            elif event == "end":
                self.status = record.get("status")
        self.records += new
        return new

    @property
    def nodes(self) -> list:
        return [self.epochs, self.steps, *self.charts.values()]

    def series_nodes(self) -> list:
        return [chart.GetNthPlotSeriesNode(k) for chart in self.charts.values() for k in range(chart.GetNumberOfPlotSeriesNodes())]


def load_cam_samples(scene, model_folder, name: str | None = None):
    """The Grad-CAM samples a training wrote (gradcam_samples.npz: source, synthesized, cam), as volume nodes whose
    slices are the samples: (synthesized node, Grad-CAM node); None when the folder has none yet."""
    import numpy as np

    from radiomicgan.jobs import CAM_SAMPLES
    from radiomicgan.volume import CTVolume

    from .mrml import add_map_node, add_volume_node

    path = Path(model_folder) / CAM_SAMPLES
    if not path.is_file():
        return None
    with np.load(path) as data:
        synthesized, cam = data["synthesized"], data["cam"]
    name = name or Path(model_folder).name
    like = CTVolume(hu=synthesized.astype(np.float32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), source=str(path))
    image = add_volume_node(scene, like, f"{name} Grad-CAM samples: synthesized")
    cam_node = add_map_node(scene, cam.astype(np.float32), like, f"{name} Grad-CAM samples: map")
    return image, cam_node


# ---------------------------------------------------------------------------------------------- comparison


def read_ccc_csv(path) -> tuple[list[str], list[dict]]:
    """(candidate names, rows) of an evaluate output's ccc.csv; CCC '' (undefined) becomes NaN."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        candidates = header[4:]
        rows = []
        for row in reader:
            values = {c: (float(v) if v != "" else math.nan) for c, v in zip(candidates, row[4:])}
            rows.append({"group": row[0], "feature": row[1], "image_type": row[2], "feature_class": row[3], "ccc": values})
    return candidates, rows


def ccc_tables(scene, report_folder, threshold: float | None = None) -> dict:
    """{candidate: table node} with one row per ROI group and feature: CCC and whether it is reproducible."""
    report_folder = Path(report_folder)
    summary = json.loads((report_folder / "summary.json").read_text())
    threshold = summary["threshold"] if threshold is None else threshold
    candidates, rows = read_ccc_csv(report_folder / "ccc.csv")
    tables = {}
    for candidate in candidates:
        table = new_table(scene, f"RadiomicGAN CCC {candidate}", text=("ROI group", "feature", "image type", "class",
                                                                        "reproducible"), numeric=("CCC",))
        for row in rows:
            value = row["ccc"][candidate]
            verdict = "undefined" if math.isnan(value) else ("yes" if value > threshold else "no")
            append_row(table, {"ROI group": row["group"], "feature": row["feature"], "image type": row["image_type"],
                               "class": row["feature_class"], "CCC": value, "reproducible": verdict})
        _tag(table, report_folder, summary)
        tables[candidate] = table
    return tables


SUMMARY_TEXT = ("candidate", "ROI group", "note")
SUMMARY_NUMBERS = ("ROIs", "reproducible", "bootstrap mean", "bootstrap SD", "undefined", "PSNR (dB)", "SSIM")


def summary_table(scene, report_folder):
    """Reproducible counts per candidate and ROI group, with PSNR/SSIM of each candidate, as one table node."""
    report_folder = Path(report_folder)
    summary = json.loads((report_folder / "summary.json").read_text())
    table = new_table(scene, "RadiomicGAN reproducibility", text=SUMMARY_TEXT, numeric=SUMMARY_NUMBERS)
    for group, entry in summary["groups"].items():
        for candidate in summary["candidates"]:
            metrics = summary["image_metrics"][candidate]
            if candidate not in entry:  # too few ROIs for a count: said, not counted
                append_row(table, {"candidate": candidate, "ROI group": group, "ROIs": entry.get("rois"),
                                   "note": entry.get("too_small") or entry.get("skipped") or "not counted",
                                   "PSNR (dB)": metrics["psnr_db"], "SSIM": metrics["ssim"]})
                continue
            counts = entry[candidate]
            append_row(table, {"candidate": candidate, "ROI group": group, "ROIs": entry["rois"],
                               "reproducible": counts["reproducible"], "bootstrap mean": counts["bootstrap_mean"],
                               "bootstrap SD": counts["bootstrap_sd"], "undefined": counts["excluded_undefined"],
                               "PSNR (dB)": metrics["psnr_db"], "SSIM": metrics["ssim"]})
    _tag(table, report_folder, summary)
    return table


def counts_chart(scene, report_folder):
    """A bar plot of reproducible counts: one bar series per candidate over the measured ROI groups.
    Returns (table node, chart node)."""
    report_folder = Path(report_folder)
    summary = json.loads((report_folder / "summary.json").read_text())
    candidates = summary["candidates"]
    groups = [g for g, entry in summary["groups"].items() if all(c in entry for c in candidates)]
    table = new_table(scene, "RadiomicGAN reproducible counts", text=("ROI group",), numeric=("group", *candidates))
    for k, group in enumerate(groups):
        entry = summary["groups"][group]
        append_row(table, {"ROI group": group, "group": k, **{c: entry[c]["reproducible"] for c in candidates}})
    chart = new_chart(scene, "RadiomicGAN reproducible counts", f"Reproducible features (CCC > {summary['threshold']:g}) of "
                      f"{summary['features']}", "ROI group", "features", table, "group", [(c, c) for c in candidates],
                      plot_type="bar", label_column="ROI group")
    _tag(table, report_folder, summary)
    return table, chart


def _tag(node, report_folder: Path, summary: dict) -> None:
    node.SetAttribute("RadiomicGAN.Report", str(report_folder / "report.html"))
    node.SetAttribute("RadiomicGAN.Threshold", str(summary["threshold"]))
    node.SetAttribute("RadiomicGAN.Features", str(summary["features"]))

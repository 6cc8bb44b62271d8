"""The ROI radiomics comparison from Slicer: loaded volumes and ROIs are written to a work folder, the core's
``radiomicgan evaluate`` runs in one background process (its pyradiomics pool, if any, lives there, never in
Slicer's process), and its report folder becomes table nodes and a bar plot. Its ``--progress-json`` lines drive
``progress`` (0..1) and ``status_text()``. No qt; the widget polls."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from radiomicgan.jobs import PROGRESS_OPTION, staged_leftovers

from .process import Job, JobStatus, core_command

FEATURES_SHARE = 0.95  # of the progress bar: measuring the ROIs; the rest is CCC, bootstrap and the report


@dataclass
class ComparisonResults:
    report_folder: Path
    summary: dict
    ccc_tables: dict  # candidate name -> table node (ROI group, feature, CCC, reproducible)
    summary_table: object  # reproducible counts per candidate and ROI group, PSNR/SSIM
    counts_table: object
    counts_chart: object

    @property
    def report(self) -> Path:
        return self.report_folder / "report.html"

    @property
    def nodes(self) -> list:
        return [*self.ccc_tables.values(), self.summary_table, self.counts_table, self.counts_chart]


def _cli_name(name: str) -> str:
    return name.replace("=", "-").strip() or "candidate"


class ComparisonRun(Job):
    """Reference and candidate volume nodes compared on ROIs: segments of a segmentation, markups ROI boxes and
    a label map (each its own ROI group), or, when none is given, random ROIs in HU ranges of the reference.
    The ``Job`` contract; ``result`` (also ``results``) is the ``ComparisonResults`` once completed."""

    what = "comparison"

    def __init__(self, scene, reference_node, candidate_nodes, report_folder, *, segmentation_node=None,
                 segment_ids=None, roi_nodes=(), label_node=None, hu_ranges=None, per_range: int = 20,
                 roi_size_mm: float = 10.0, roi_slices: int = 3, whole_image: bool = False, params=None,
                 workers: int | None = None, threshold: float = 0.85, bootstrap: int = 100, seed: int = 0,
                 on_output=None):
        if reference_node is None:
            raise ValueError("select a reference volume (the standard kernel)")
        if isinstance(candidate_nodes, dict):
            candidates = dict(candidate_nodes)
        else:
            candidates = {}
            for node in candidate_nodes:
                name, n = _cli_name(node.GetName()), 2
                while name in candidates:
                    name, n = f"{_cli_name(node.GetName())} ({n})", n + 1
                candidates[name] = node
        candidates = {_cli_name(k): v for k, v in candidates.items() if v is not None and v is not reference_node}
        if not candidates:
            raise ValueError("select at least one candidate volume other than the reference")
        super().__init__(on_output=on_output)
        self.scene = scene
        self.reference_node = reference_node
        self.candidates = candidates
        self.report_folder = Path(report_folder)
        if self.report_folder.exists() and any(self.report_folder.iterdir()):
            raise ValueError(f"{self.report_folder}: already exists and is not empty; choose a new report folder")
        self.segmentation_node, self.segment_ids = segmentation_node, segment_ids
        self.roi_nodes, self.label_node = [n for n in roi_nodes if n is not None], label_node
        self.hu_ranges, self.per_range, self.roi_size_mm, self.roi_slices = hu_ranges, per_range, roi_size_mm, roi_slices
        self.whole_image, self.params, self.workers = whole_image, params, workers
        self.threshold, self.bootstrap, self.seed = threshold, bootstrap, seed
        self.work = None
        self.legend: dict = {}
        self._command: list[str] | None = None
        self.progress, self.stage = 0.0, "starting"
        self.record: dict | None = None  # the core's last progress record
        self.workers_text = ""  # how many worker processes the core measures with, and why (its first line)
        for name, node in candidates.items():  # voxels are compared index by index, whatever the views show
            if node.GetTransformNodeID() != reference_node.GetTransformNodeID():
                self.warnings.append(f"{name}: under another transform than the reference {reference_node.GetName()}; "
                                     "compared voxel by voxel on the volumes' own grids")

    def roi_groups(self) -> dict:
        from .rois import BOXES_GROUP, LABELS_GROUP, SEGMENTS_GROUP, labelmap_masks, roi_box_masks, segment_masks

        groups = {}
        if self.segmentation_node is not None:
            groups[SEGMENTS_GROUP] = segment_masks(self.segmentation_node, self.reference_node, self.segment_ids)
        if self.roi_nodes:
            groups[BOXES_GROUP] = roi_box_masks(self.roi_nodes, self.reference_node)
        if self.label_node is not None:
            groups[LABELS_GROUP] = labelmap_masks(self.label_node, self.reference_node, notes=self.warnings)
        return groups

    def prepare(self) -> list[str]:
        """Write the inputs to a fresh work folder; returns the command line."""
        from radiomicgan.io import write_volume

        from .mrml import volume_from_node
        from .rois import write_roi_label_maps

        self.work = Path(tempfile.mkdtemp(prefix="radiomicgan-compare-"))
        try:
            reference_path = self.work / "reference.nrrd"
            write_volume(volume_from_node(self.reference_node), reference_path)
            args = ["evaluate", "--reference", str(reference_path), "--reference-name", _cli_name(self.reference_node.GetName()),
                    "--out", str(self.report_folder), "--threshold", repr(float(self.threshold)),
                    "--bootstrap", str(self.bootstrap), "--seed", str(self.seed)]
            for k, (name, node) in enumerate(self.candidates.items()):
                path = self.work / f"candidate{k}.nrrd"
                write_volume(volume_from_node(node), path)
                args += ["--candidate", f"{name}={path}"]
            groups = self.roi_groups()
            if groups:
                label_args, self.legend = write_roi_label_maps(groups, self.reference_node, self.work / "rois")
                if not label_args:
                    raise ValueError("the selected ROIs do not cover any voxel of the reference")
                args += label_args
            else:
                if self.hu_ranges:
                    args += ["--ranges", *[f"{lo:g}:{hi:g}" for lo, hi in self.hu_ranges]]
                args += ["--per-range", str(self.per_range), "--roi-size", repr(float(self.roi_size_mm)),
                         "--roi-slices", str(self.roi_slices)]
                if self.whole_image:
                    args.append("--whole-image")
            if self.params:
                args += ["--params", str(self.params)]
            if self.workers:
                args += ["--workers", str(self.workers)]
            args.append(PROGRESS_OPTION)  # the core ships inside the extension: it always has the option
        except BaseException:
            self.cleanup()
            raise
        return core_command(*args)

    def command(self) -> list[str]:
        return self._command

    def start(self) -> "ComparisonRun":
        self._command = self.prepare()
        return super().start()

    @property
    def results(self) -> ComparisonResults | None:
        return self.result

    def on_progress(self, record: dict) -> None:
        self.record, self.stage = record, record.get("stage", self.stage)
        if "workers" in record:
            self.workers_text = f"; {record['workers']} worker process{'es' if record['workers'] > 1 else ''}: {record.get('workers_reason', '')}"
        fraction = float(record.get("fraction", 0.0))
        self.progress = FEATURES_SHARE * fraction if self.stage == "features" else FEATURES_SHARE + (1 - FEATURES_SHARE) * fraction

    def _finished(self, code: int) -> JobStatus:
        if code != 0:
            return JobStatus.CANCELLED
        if self.legend:  # which label of which label-map file was which segment or box
            import json

            (self.report_folder / "roi_names.json").write_text(json.dumps(self.legend, indent=2) + "\n")
        if self.scene is not None:
            self.result = load_results(self.scene, self.report_folder)
        self.progress, self.stage = 1.0, "completed"
        return JobStatus.COMPLETED

    def status_text(self) -> str:
        """One line for the panel: what the background process is doing."""
        record = self.record or {}
        if self.stage == "features":
            return (f"Radiomic features: {record.get('done', 0)} of {record.get('total', '?')} ROI measurements "
                    f"({record.get('images', '?')} volumes x {record.get('rois', '?')} ROIs{self.workers_text})")
        if self.stage == "report":
            return "Reproducibility (CCC) and the report..."
        if self.stage == "completed":
            return "Comparison completed"
        return "Reading the volumes and ROIs..."

    def _cleanup(self) -> None:
        """The work folder goes; so does whatever a killed core had staged for the report (it is written
        atomically: nothing half-written stays)."""
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
        if self.status is not JobStatus.COMPLETED:
            for leftover in staged_leftovers(self.report_folder):
                shutil.rmtree(leftover, ignore_errors=True)

    cleanup = _cleanup


def load_results(scene, report_folder) -> ComparisonResults:
    """Table nodes and the counts plot of an evaluate report folder."""
    import json

    from .plots import ccc_tables, counts_chart, summary_table

    report_folder = Path(report_folder)
    summary = json.loads((report_folder / "summary.json").read_text())
    counts, chart = counts_chart(scene, report_folder)
    return ComparisonResults(report_folder, summary, ccc_tables(scene, report_folder), summary_table(scene, report_folder),
                             counts, chart)

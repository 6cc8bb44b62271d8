"""Cohort mode from Slicer: ``radiomicgan cohort ... --progress-json`` in a background process (a pool, if any, lives
inside that process, never inside Slicer), progress and warnings from its output lines, and the QA table as data
for a table node when it ends. Cancel kills the process tree; the core's markers make a second Start resume.

No qt here: the widget polls ``CohortJob.poll()`` from a timer; the console and the tests call ``wait()``.
"""

from __future__ import annotations

from pathlib import Path

from .process import BackgroundProcess, CoreOutput, core_command, parse_progress


def qa_rows(out_folder) -> list[dict]:
    """The rows of OUT/qa.csv (flagged and failed scans first, as the core writes them); [] when absent."""
    from radiomicgan.cohort import read_qa_csv

    path = Path(str(out_folder)) / "qa.csv"
    return read_qa_csv(path) if path.is_file() else []


def qa_table_node(scene, rows: list[dict], name: str = "Cohort QA", node=None):
    """A vtkMRMLTableNode with one column per QA column (text cells) and one row per scan; ``node`` is refilled
    when given (a second run replaces the table, it does not add another)."""
    from radiomicgan.cohort import QA_COLUMNS

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        node.RemoveAllColumns()
    for column in QA_COLUMNS:
        node.AddColumn().SetName(column)
    for r, row in enumerate(rows):
        node.AddEmptyRow()
        for c, column in enumerate(QA_COLUMNS):
            node.SetCellText(r, c, str(row.get(column, "")))
    node.SetAttribute("RadiomicGAN.Cohort", "qa")
    return node


class CohortJob(CoreOutput):
    """One cohort run of the core in the background. ``status``: running, completed (every scan done; some may
    have failed: ``failed`` says how many), cancelled or failed (the run itself could not proceed: ``error``)."""

    def __init__(self, input_folder, model_dir, out_folder, *, device: str = "auto", rois: str = "none",
                 workers: int | None = None, params: str | None = None, extra_args: list[str] | None = None, env=None,
                 on_output=None):
        from radiomicgan.cohort import EXIT_SCANS_FAILED_BASE

        self.input, self.model_dir, self.out = str(input_folder), str(model_dir), Path(str(out_folder))
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.on_output = on_output
        self.progress, self.done, self.total, self.eta_s = 0.0, 0, 0, None
        self.failed = 0
        self.status = "running"
        self.rows: list[dict] = []
        self._failed_base = EXIT_SCANS_FAILED_BASE
        args = [self.input, "--model", self.model_dir, "--out", str(self.out), "--device", device, "--rois", rois,
                "--progress-json"]
        if workers:
            args += ["--workers", str(int(workers))]
        if params:
            args += ["--params", str(params)]
        args += list(extra_args or [])
        self.process = BackgroundProcess(core_command("cohort", *args), env=env, on_output=self._line).start()

    def on_progress(self, record: dict) -> None:
        if record.get("task") != "cohort":
            return
        self.done, self.total = int(record.get("done", 0)), int(record.get("total", 0))
        self.progress = float(record.get("fraction", 0.0))
        self.eta_s = record.get("eta_s")
        self.failed = int(record.get("failed", self.failed) or 0)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def error(self) -> str | None:
        return self.errors[-1] if self.errors else None

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def status_text(self) -> str:
        if self.status == "running":
            eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
            return f"{self.done} of {self.total} scans{eta}" + (f"; {self.failed} failed" if self.failed else "")
        if self.status == "completed":
            flagged = sum(r.get("flagged") == "True" for r in self.rows)
            return (f"Done: {sum(r['status'] == 'harmonized' for r in self.rows)} harmonized, {self.failed} failed, "
                    f"{flagged} flagged, {sum(r['status'] == 'skipped' for r in self.rows)} skipped")
        return {"cancelled": "Cancelled; finished scans are kept and a new Start resumes."}.get(self.status, f"Failed: {self.error}")

    def poll(self) -> str:
        if self.status != "running":
            return self.status
        code = self.process.poll()
        if code is None:
            return self.status
        if code == 0 or self._failed_base < code < self._failed_base + 64:
            self.failed = max(0, code - self._failed_base) if code else 0
            self.rows = qa_rows(self.out)
            self.progress, self.status = 1.0, "completed"
        else:
            self.status = "failed"
            if self.error is None:
                tail = [line for line in self.process.lines if line.strip() and parse_progress(line) is None][-5:]
                self.errors.append(f"cohort run failed (exit status {code})" + (": " + " | ".join(tail) if tail else ""))
        return self.status

    def wait(self, timeout: float | None = None) -> "CohortJob":
        self.process.wait(timeout)
        self.poll()
        if self.status != "completed":
            raise RuntimeError(self.error or f"cohort run {self.status}")
        return self

    def cancel(self) -> None:
        if self.status != "running":
            return
        self.process.cancel()
        self.status = "cancelled"

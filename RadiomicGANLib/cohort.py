"""Cohort mode from Slicer: ``radiomicgan cohort ... --progress-json`` in a background process (a pool, if any, lives
inside that process, never inside Slicer), progress and warnings from its output lines, and the QA table as data
for a table node when it ends. Cancel kills the process tree; the core's markers make a second Start resume.

No qt here: the widget polls ``CohortJob.poll()`` from a timer; the console and the tests call ``wait()``.
"""

from __future__ import annotations

from pathlib import Path

from radiomicgan.jobs import PROGRESS_OPTION, ExitCode, failed_scans

from .process import Job, JobStatus, core_command


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


class CohortJob(Job):
    """One cohort run of the core in the background (the ``Job`` contract: ``poll()`` from a timer, ``cancel()``,
    ``wait()``), started by the constructor. ``status``: running, completed (every scan done; ``failed`` says how
    many of them failed, as the core's exit status does), cancelled (finished scans are kept: a new job on the same
    output resumes) or failed (the run itself could not proceed: ``error``). ``rows``: the QA rows once completed."""

    what = "cohort run"

    def __init__(self, input_folder, model_dir, out_folder, *, device: str = "auto", rois: str = "none",
                 workers: int | None = None, params: str | None = None, extra_args: list[str] | None = None, env=None,
                 on_output=None):
        super().__init__(on_output=on_output, env=env)
        self.input, self.model_dir, self.out = str(input_folder), str(model_dir), Path(str(out_folder))
        self.progress, self.done, self.total, self.eta_s = 0.0, 0, 0, None
        self.failed = 0
        self.rows: list[dict] = []
        self.tableNode = None
        self.args = [self.input, "--model", self.model_dir, "--out", str(self.out), "--device", device, "--rois", rois,
                     PROGRESS_OPTION]
        if workers:
            self.args += ["--workers", str(int(workers))]
        if params:
            self.args += ["--params", str(params)]
        self.args += list(extra_args or [])
        self.start()

    def command(self) -> list[str]:
        return core_command("cohort", *self.args)

    def on_progress(self, record: dict) -> None:
        if record.get("task") != "cohort":
            return
        self.done, self.total = int(record.get("done", 0)), int(record.get("total", 0))
        self.progress = float(record.get("fraction", 0.0))
        self.eta_s = record.get("eta_s")
        self.failed = int(record.get("failed", self.failed) or 0)

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def status_text(self) -> str:
        if self.status is JobStatus.RUNNING:
            eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
            return f"{self.done} of {self.total} scans{eta}" + (f"; {self.failed} failed" if self.failed else "")
        if self.status is JobStatus.COMPLETED:
            flagged = sum(r.get("flagged") == "True" for r in self.rows)
            return (f"Done: {sum(r['status'] == 'harmonized' for r in self.rows)} harmonized, {self.failed} failed, "
                    f"{flagged} flagged, {sum(r['status'] == 'skipped' for r in self.rows)} skipped")
        if self.status is JobStatus.CANCELLED:
            return "Cancelled; finished scans are kept and a new Start resumes."
        return f"Failed: {self.error}"

    def poll(self) -> JobStatus:
        """As ``Job.poll``; an exit status that counts failed scans (``radiomicgan.cohort.exit_status``) is a
        completed run."""
        if self.status is JobStatus.RUNNING and not self.cancelled:
            code = self.process.poll()
            if code is not None and code != ExitCode.OK and failed_scans(code) is not None:
                self.exit_code = code
                self.status = self._finished(code)
                return self.status
        return super().poll()

    def _finished(self, code: int) -> JobStatus:
        if code == ExitCode.CANCELLED:
            return JobStatus.CANCELLED
        self.failed = failed_scans(code) or 0
        self.rows = qa_rows(self.out)
        self.progress = 1.0
        return JobStatus.COMPLETED

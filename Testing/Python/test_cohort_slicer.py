"""Cohort mode from Slicer without Slicer: the core's ``radiomicgan cohort`` really runs as a background process
(progress lines, cancel that kills it, a second start that resumes), and its QA rows become a vtkMRMLTableNode of
slicer-core."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_ct_series

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is a test requirement")

from RadiomicGANLib.cohort import CohortJob, qa_rows, qa_table_node  # noqa: E402

from radiomicgan.cohort import QA_COLUMNS  # noqa: E402
from radiomicgan.simulate import phantom_pair, simulate_phantom_pairs  # noqa: E402
from radiomicgan.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer_cohort")
    simulate_phantom_pairs(root / "pairs", cases=1, size=32, slices=2, seed=3)
    train(root / "pairs", root / "model", TrainConfig(method="filter"), progress=False)
    for k in range(3):
        write_ct_series(root / "study" / f"p{k}", phantom_pair(size=32, slices=4, seed=20 + k)[0].hu, kernel="B30f", shuffle=False,
                        spacing_z=1.0)
    write_ct_series(root / "study" / "mr", np.zeros((4, 32, 32), np.float32), kernel="B30f", modality="MR", spacing_z=1.0)
    return root


def test_cohort_job_runs_the_core_and_fills_a_table_node(cohort, tmp_path):
    out = tmp_path / "out"
    records = []
    job = CohortJob(cohort / "study", cohort / "model", out, device="cpu", workers=1)
    job.on_progress = lambda record, original=job.on_progress: (records.append(record), original(record))
    assert job.wait(timeout=300) == "completed" and job.failed == 0 and job.report.is_file()
    assert records and records[-1]["done"] == records[-1]["total"] == 3 and job.progress == 1.0
    assert "3 harmonized" in job.status_text() and "1 skipped" in job.status_text()
    scene = slicer.vtkMRMLScene()
    node = qa_table_node(scene, job.rows)
    assert node.GetNumberOfColumns() == len(QA_COLUMNS) and node.GetNumberOfRows() == 4
    assert [node.GetColumnName(c) for c in range(node.GetNumberOfColumns())] == list(QA_COLUMNS)
    scans = {node.GetCellText(r, 0): node.GetCellText(r, QA_COLUMNS.index("status")) for r in range(4)}
    assert scans == {"p0": "harmonized", "p1": "harmonized", "p2": "harmonized", "mr": "skipped"}
    assert qa_rows(out) == job.rows
    again = qa_table_node(scene, job.rows[:2], node=node)  # a second run refills the same table
    assert again is node and node.GetNumberOfRows() == 2 and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_cancel_kills_the_run_and_a_second_start_resumes(cohort, tmp_path):
    out = tmp_path / "out"
    job = CohortJob(cohort / "study", cohort / "model", out, device="cpu", workers=1)
    job.cancel()  # a stop request on its standard input, at once
    assert job.wait(timeout=120) == "cancelled" and not job.process.running and "resumes" in job.status_text()
    assert not (out / "qa.csv").exists()
    again = CohortJob(cohort / "study", cohort / "model", out, device="cpu", workers=1)
    assert again.wait(timeout=300) == "completed" and sum(r["status"] == "harmonized" for r in again.rows) == 3

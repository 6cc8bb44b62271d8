"""The contract between the core's command line and the programs that run it in the background (the Slicer
modules, through ``RadiomicGANLib.process``): exit codes, the progress and message lines, the stop request, and
the names of the files the core writes. Both sides import these names; nothing here imports torch or Slicer.

- Exit codes (``ExitCode``): 0 done, every output written; 2 a problem with the user's input (one
  ``radiomicgan: error: ...`` line, no traceback); 130 cancelled (Ctrl-C, SIGTERM, SIGHUP or a stop request): staged files
  removed, a training keeps its last complete epoch; 64 + n (at most 127) a cohort run in which n scans failed
  alone (the rest done); 1 anything else (a bug: a traceback). A process killed from
  outside has a negative status on POSIX.
- Progress (``--progress-json``): lines ``PROGRESS {json}`` on stderr, flushed, made by ``progress_line`` and read
  by ``parse_progress``. Keys ``task`` ("harmonize", "train", "evaluate"), ``stage``, ``done``, ``total`` (integers,
  done <= total), ``fraction`` (0..1) and the stage's own keys. A stage's first and last lines are always printed,
  others at most every 0.25 s. harmonize: stage "harmonize" counts slices; with Grad-CAM a line "gradcam" 0 of 1
  follows (the maps take about as long again). train: stage "epoch" after each complete epoch, ``done`` = epoch
  index + 1 of the configured epochs, with the epoch record's keys (``EPOCH_KEYS``). evaluate: stage "features"
  counts ROI measurements (``images`` x ``rois``), then "report" 0 of 1; its first line also says how many worker
  processes measure and why (``workers``, ``workers_reason``). cohort: stage "scans" counts finished scans, with
  ``eta_s``, ``failed`` and, under torchrun, ``rank``.
- Warnings and errors: lines starting ``WARNING_PREFIX`` / ``ERROR_PREFIX``.
- Stop request (``--stop-on-stdin``): the core reads its standard input; a line ``stop`` (or the input closing:
  the program that started it is gone) takes Ctrl-C's path. harmonize and evaluate remove what they staged and
  exit 130; train stops after the current step and keeps its last complete epoch (a second ``stop`` aborts the
  step). This works on every platform, Windows included, where there is no SIGTERM to a process group.
- Files: outputs are staged under ``radiomicgan.staging.staging_name`` (marked ``STAGING_MARK``) and renamed into place; ``staged_leftovers`` finds what a killed
  run left. ``gradcam_paths`` names the Grad-CAM maps and windows of ``harmonize --gradcam``; ``MODEL_FIGURES``
  the figures training writes into a model folder.
"""

from __future__ import annotations

import json
import sys
import threading
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # an unexpected failure (a traceback)
    BAD_INPUT = 2  # one "radiomicgan: error:" line
    CANCELLED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
    SCANS_FAILED = 64  # cohort: 64 + n when n scans failed alone (capped at 127); the others are done


def scans_failed_status(failed: int) -> int:
    """A cohort run's exit status: 0 when no scan failed, else 64 + the number failed (at most 127)."""
    return 0 if failed <= 0 else int(ExitCode.SCANS_FAILED) + min(int(failed), 63)


def failed_scans(code: int | None) -> int | None:
    """How many scans a cohort run's exit status says failed (0 for success), or None for any other status."""
    if code == ExitCode.OK:
        return 0
    if code is not None and ExitCode.SCANS_FAILED < code < ExitCode.SCANS_FAILED + 64:
        return code - ExitCode.SCANS_FAILED
    return None


PROGRESS_PREFIX = "PROGRESS "
WARNING_PREFIX = "radiomicgan: warning: "
ERROR_PREFIX = "radiomicgan: error: "
PROGRESS_INTERVAL_S = 0.25
EPOCH_KEYS = ("epoch", "window", "next_window", "loss_g", "loss_d", "l1", "accuracy", "val_psnr_db", "val_input_psnr_db")
STOP_WORD = "stop"
STOP_OPTION = "--stop-on-stdin"
PROGRESS_OPTION = "--progress-json"

# files training writes into a model folder (see radiomicgan.train): its log, the window history, the Grad-CAM
# samples, and the flag file that stops it at the next step (for programs that cannot write to its stdin)
LOG_NAME, CANCEL_NAME = "train_log.jsonl", "CANCEL"
WINDOWS_PLOT, CAM_PLOT, CAM_SAMPLES = "windows.png", "gradcam_samples.png", "gradcam_samples.npz"
MODEL_FIGURES = (WINDOWS_PLOT, CAM_PLOT)
STAGING_MARK = "-partial-"  # no dot: a staged DICOM folder has no suffix (its format)


def progress_line(task: str, stage: str, done: int, total: int, **extra) -> str:
    record = {"task": task, "stage": stage, "done": int(done), "total": int(total),
              "fraction": round(done / total, 4) if total else 1.0, **extra}
    return PROGRESS_PREFIX + json.dumps(record)


def parse_progress(line: str) -> dict | None:
    """The record of a ``PROGRESS {json}`` line, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        record = json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def warning_text(line: str) -> str | None:
    return line[len(WARNING_PREFIX):] if line.startswith(WARNING_PREFIX) else None


def error_text(line: str) -> str | None:
    return line[len(ERROR_PREFIX):] if line.startswith(ERROR_PREFIX) else None


def staged_leftovers(path) -> list[Path]:
    """What runs killed before their clean-up staged for ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{STAGING_MARK}*")) if path.parent.is_dir() else []


def gradcam_paths(cam_output, suffix: str) -> tuple[Path, Path, Path]:
    """(map of the result, map of the input, hot-spot windows JSON) for ``harmonize --gradcam cam_output``, whose
    image suffix (.nrrd, .nii.gz, ...) is ``suffix``."""
    cam_output = Path(cam_output)
    stem = cam_output.name[: -len(suffix)] if suffix else cam_output.name
    return cam_output, cam_output.with_name(f"{stem}_input{suffix}"), cam_output.with_name(f"{stem}_windows.json")


def watch_stdin_for_stop(stream=None) -> threading.Thread:
    """Start a daemon thread that turns a ``stop`` line on stdin, or stdin closing, into Ctrl-C for the main
    thread: SIGINT to it on POSIX (which also wakes a blocking wait), ``_thread.interrupt_main`` elsewhere.
    Called from the main thread. A process started in the background of a shell (``cmd &``, nohup, an application
    launched that way) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the stop request
    would be lost and Cancel would do nothing, so Python's own handler is put back; the caller asked to be stoppable."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    stream = sys.stdin if stream is None else stream

    def interrupt() -> None:
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:
            import _thread

            _thread.interrupt_main()

    def watch() -> None:
        try:
            for line in stream:
                if line.strip() == STOP_WORD:
                    interrupt()
        except (OSError, ValueError):
            pass
        interrupt()  # stdin closed: whoever started this process is gone, or wants it gone

    thread = threading.Thread(target=watch, name="radiomicgan stop request", daemon=True)
    thread.start()
    return thread

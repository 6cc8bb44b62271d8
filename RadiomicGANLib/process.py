"""Long jobs (harmonize, train, evaluate) run as the core's command line in a background process, so Slicer's GUI
thread never computes and Cancel can kill everything at once. A pool belongs inside that process, never inside
Slicer (there ``sys.executable`` is Slicer's launcher: BrokenProcessPool or a hang, Slicer issue 7445).

No qt here: the widget polls ``BackgroundProcess.poll()`` from a ``qt.QTimer``; the console and the tests call
``wait()``. Output (stdout and stderr merged, one line at a time) is read by a thread into a queue.

Machine-readable output of the core's command line (``radiomicgan harmonize|train|evaluate ... --progress-json``):

- progress: a line ``PROGRESS {json}`` on stderr, flushed; read it with ``parse_progress(line)``. Keys:
  ``task`` ("harmonize", "train" or "evaluate"), ``stage``, ``done``, ``total`` (integers, done <= total) and ``fraction``
  (done / total, 0..1). A stage's first and last lines are always printed, others at most every 0.25 s.
  harmonize: stage "harmonize" counts slices; with Grad-CAM, a line stage "gradcam" done 0 of 1 follows when the
  slices are done (the maps take about as long again); then the outputs are written: exit status 0 means all
  written. train: one line per completed epoch, stage "epoch", ``done`` = epoch index + 1 (a resumed run goes on
  counting) of ``total`` = the configured epochs, with the epoch record's
  ``epoch`` (0-based), ``window``, ``next_window``, ``loss_g``, ``loss_d``, ``l1``, ``accuracy``, ``val_psnr_db``
  and ``val_input_psnr_db`` where present (closed-form methods, filter and histmatch, print none). Per-step
  values are in the model folder's ``train_log.jsonl`` (read it for plots).
  evaluate: stage "features" counts ROI measurements (each ROI on each image: ``images`` x ``rois``, both keys in
  the record), from 0; when all are measured, a line stage "report" done 0 of 1 follows (CCC, bootstrap, report
  files); exit status 0 means the report folder is complete.
- warnings: lines starting ``radiomicgan: warning: `` (CPU fallback, kernel mismatch, ...); ``warning_text(line)``.
- a problem with the user's input: one line ``radiomicgan: error: ...`` and exit status 2; cancelled by Ctrl-C
  (SIGINT): exit status 130. A killed process (``cancel()``) has a negative status on POSIX.
- training stops gracefully at the next step when the file ``--cancel-file`` (default OUT/CANCEL) appears, keeping
  the last complete epoch (resumable); ``cancel()`` kills at once (the folder then holds the last complete epoch
  too, as checkpoints are written atomically).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

PROGRESS_PREFIX = "PROGRESS "
WARNING_PREFIX = "radiomicgan: warning: "
ERROR_PREFIX = "radiomicgan: error: "


def parse_progress(line: str) -> dict | None:
    """The progress record of a ``PROGRESS {json}`` line, or None for any other line."""
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


class CoreOutput:
    """What a background job keeps of the core's output lines: progress records go to ``on_progress``, warnings and
    errors into ``warnings`` and ``errors``; every line also reaches ``on_output`` (the widget's log)."""

    on_output = None

    def on_progress(self, record: dict) -> None:
        pass

    def _line(self, line: str) -> None:
        record = parse_progress(line)
        if record is not None:
            self.on_progress(record)
        elif warning_text(line) is not None:
            self.warnings.append(warning_text(line))
        elif error_text(line) is not None:
            self.errors.append(error_text(line))
        if self.on_output is not None:
            self.on_output(line)


def _slicer_app():
    """Slicer's application object when running inside Slicer (slicer-core, used by the tests, has none)."""
    module = sys.modules.get("slicer")
    return getattr(module, "app", None) if module is not None else None


def python_command() -> list[str]:
    """The Python that runs the core: PythonSlicer inside Slicer (its ``sys.executable`` is the application
    itself), this interpreter outside."""
    app = _slicer_app()
    if app is None:
        return [sys.executable]
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = [shutil.which("PythonSlicer"), Path(sys.executable).parent / name,
                  Path(str(getattr(app, "slicerHome", ""))) / "bin" / name]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise RuntimeError("PythonSlicer was not found next to Slicer; the background process cannot start")


def wait_for_exit(poll: Callable[[], int | None], timeout: float | None, what: str, interval: float = 0.1) -> int:
    """Call ``poll`` (a job's own, which also gathers its results) until it returns an exit code; TimeoutError
    after ``timeout`` seconds. For the jobs built on BackgroundProcess (training, comparison)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        code = poll()
        if code is not None:
            return code
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} still running after {timeout} s")
        time.sleep(interval)


def core_command(*args: str) -> list[str]:
    return python_command() + ["-m", "radiomicgan.cli", *args]


def core_environment(extra: dict | None = None) -> dict:
    """The environment for the core: Slicer's start-up environment inside Slicer (PythonSlicer sets up its own
    paths from it), plus the folder holding the ``radiomicgan`` package (an extension's scripted-module folder is
    not on PythonSlicer's path), unbuffered output and an un-coloured, non-interactive console."""
    app = _slicer_app()
    if app is not None:
        import slicer.util  # only inside Slicer

        env = dict(slicer.util.startupEnvironment())
    else:
        env = dict(os.environ)
    import radiomicgan

    core_parent = str(Path(radiomicgan.__file__).resolve().parent.parent)
    paths = [core_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != core_parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


class BackgroundProcess:
    """Runs a command (normally ``core_command(...)``) in a background process.

    ``on_output(line)`` is called for each output line from ``poll()``/``wait()``, i.e. on the caller's thread
    (the GUI thread in Slicer), never on the reader thread. Every line is also kept in ``lines``.
    """

    def __init__(self, args: list[str], *, cwd=None, env=None, on_output: Callable[[str], None] | None = None):
        self.args = [str(a) for a in args]
        self.cwd = cwd
        self.env = core_environment() if env is None else env
        self.on_output = on_output
        self.lines: list[str] = []
        self.cancelled = False
        self.terminate_grace_s = 10.0  # a cancelled core gets this long to remove its staged files before a kill
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._returncode: int | None = None

    def start(self) -> "BackgroundProcess":
        if self._process is not None:
            raise RuntimeError("already started")
        options = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True  # its own process group: cancel() reaches its children too
        self._process = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1, **options,
        )
        self._reader = threading.Thread(target=self._read, name="RadiomicGAN output reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        stream = self._process.stdout
        for line in iter(stream.readline, ""):
            self._queue.put(line.rstrip("\r\n"))
        stream.close()

    def _deliver(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            self._handle(line)

    def _handle(self, line: str) -> None:
        self.lines.append(line)
        if self.on_output is not None:
            self.on_output(line)

    def poll(self) -> int | None:
        """Deliver pending lines; the exit status once the process ended and all its output was delivered."""
        if self._process is None:
            raise RuntimeError("not started")
        if self._returncode is None and self._process.poll() is not None and not self._reader.is_alive():
            self._returncode = self._process.returncode
        self._deliver()
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (delivering output meanwhile); TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"still running after {timeout} s: {' '.join(self.args[:4])} ...")
            try:  # sleep until a line arrives or a short while passes
                self._handle(self._queue.get(timeout=0.05))
            except queue.Empty:
                pass

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def cancel(self) -> None:
        """Kill the whole process tree (the launcher, the interpreter and any workers it started) and wait for it."""
        if self._process is None:
            return
        self.cancelled = True
        if self._process.poll() is None:
            _terminate_tree(self._process)  # the core removes its staged files on SIGTERM, as on Ctrl-C
            try:
                self._process.wait(timeout=self.terminate_grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self._process.poll() is None or _tree_alive(self._process):
            _kill_tree(self._process)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        self.poll()


def _terminate_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (POSIX; the launcher and the interpreter); elsewhere nothing: kill follows."""
    if os.name == "nt":
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _tree_alive(process: subprocess.Popen) -> bool:
    if os.name == "nt":
        return False
    try:
        os.killpg(process.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        if os.name == "nt":
            return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    try:  # also reaches children that outlived their parent (still in the session's process group)
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

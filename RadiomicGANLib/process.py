"""Long jobs (harmonize, train, evaluate) run as the core's command line in a background process, so Slicer's GUI
thread never computes. A pool belongs inside that process, never inside Slicer (there ``sys.executable`` is
Slicer's launcher: BrokenProcessPool or a hang, Slicer issue 7445).

One contract for every job (``Job``): ``start()``; ``poll()`` delivers output and returns a ``JobStatus``;
``cancel()`` asks the core to stop (a ``stop`` line on its standard input: ``--stop-on-stdin``, which works on
Windows too) and returns at once; a core that has not stopped ``grace_s`` seconds later is killed, tree and all, by
a later ``poll()``, so the GUI thread never waits; ``wait()`` polls until the end and returns the status; the
outcome is in ``result``. No qt: the widget polls from a ``qt.QTimer``; the console and the tests call ``wait()``.
The exit codes, the progress protocol and the names of the files the core writes are ``radiomicgan.jobs``, which
the core's command line uses too.
"""

from __future__ import annotations

import enum
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

from radiomicgan.jobs import (  # noqa: F401  (re-exported for the modules)
    ERROR_PREFIX,
    PROGRESS_OPTION,
    PROGRESS_PREFIX,
    STOP_OPTION,
    STOP_WORD,
    WARNING_PREFIX,
    ExitCode,
    error_text,
    parse_progress,
    warning_text,
)


class JobStatus(str, enum.Enum):
    """What ``Job.poll()`` and ``Job.wait()`` return (a str, so ``status == "completed"`` reads naturally)."""

    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


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
            self.args, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
            if self._process.stdin is not None:
                self._process.stdin.close()
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

    def ask_to_stop(self) -> None:
        """A ``stop`` line on the process's standard input (the core's ``--stop-on-stdin``); returns at once."""
        if self._process is None or self._process.poll() is not None:
            return
        try:
            self._process.stdin.write(STOP_WORD + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError):  # it closed its input or already ended
            pass

    def kill(self) -> None:
        """Kill the whole process tree (the launcher, the interpreter and any workers it started); returns at
        once: a later ``poll()`` sees the exit."""
        if self._process is not None:
            _kill_tree(self._process)


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
        if os.name == "nt":
            return
    if os.name == "nt":  # without psutil: taskkill ends the tree; not waited for
        subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        return
    try:  # also reaches children that outlived their parent (still in the session's process group)
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Job(CoreOutput):
    """A core command in the background, with one contract for harmonize, train and evaluate.

    Subclasses give ``command()`` (the core's arguments, without ``--stop-on-stdin``, added here) and
    ``_finished(code)`` (load the results of a run that exited 0 and return the status), and may override
    ``_cleanup()`` (temporary files) and ``_tick()`` (work on every poll, e.g. live plots).
    """

    grace_s = 10.0  # a stop request gets this long (the core removes its staged files) before the kill
    what = "job"

    def __init__(self, on_output: Callable[[str], None] | None = None, env: dict | None = None):
        self.on_output = on_output
        self.env = env
        self.status: JobStatus | None = None
        self.exit_code: int | None = None
        self.result = None
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.process: BackgroundProcess | None = None
        self.cancel_requested_at: float | None = None
        self.killed = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Job":
        if self.process is not None:
            raise RuntimeError("already started")
        try:
            self.process = BackgroundProcess([*self.command(), STOP_OPTION], env=self.env, on_output=self._line).start()
        except BaseException:
            self._cleanup()
            raise
        self.status = JobStatus.RUNNING
        return self

    @property
    def running(self) -> bool:
        return self.status is JobStatus.RUNNING

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested_at is not None

    @property
    def error(self) -> str | None:
        """The message for the user: the core's last error line, or why the run failed."""
        return self.errors[-1] if self.errors else None

    def poll(self) -> JobStatus:
        """Deliver output; once the process has ended, gather the result (or clean up). Never blocks."""
        if self.status is not JobStatus.RUNNING:
            return self.status
        code = self.process.poll()
        self._tick()
        if code is None:
            if self.cancelled and not self.killed and time.monotonic() - self.cancel_requested_at > self.grace_s:
                self.killed = True
                self.process.kill()
            return self.status
        self.exit_code = code
        try:
            if code == ExitCode.OK:
                self.status = self._finished(code)
            elif self.cancelled or code == ExitCode.CANCELLED:
                self.status = self._finished(code) if code == ExitCode.CANCELLED else JobStatus.CANCELLED
            else:
                self.status = JobStatus.FAILED
                if self.error is None:
                    tail = [line for line in self.process.lines if line.strip() and parse_progress(line) is None][-5:]
                    self.errors.append(f"{self.what} failed (exit status {code})" + (": " + " | ".join(tail) if tail else ""))
        except Exception as exc:  # unreadable output: report it, add nothing
            self.status = JobStatus.FAILED
            self.errors.append(f"could not load the result: {exc}")
        finally:
            self._cleanup()
        return self.status

    def cancel(self) -> None:
        """Ask the core to stop and return at once; ``poll()`` kills it if it has not stopped after ``grace_s``."""
        if self.status is not JobStatus.RUNNING:
            return
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()
        self.process.ask_to_stop()

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobStatus:
        """Poll until the job ends; its status. TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is JobStatus.RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.what} still running after {timeout} s")
            time.sleep(interval)
        return self.status

    def _finished(self, code: int) -> JobStatus:
        return JobStatus.COMPLETED if code == ExitCode.OK else JobStatus.CANCELLED

    def _tick(self) -> None:
        pass

    def _cleanup(self) -> None:
        pass

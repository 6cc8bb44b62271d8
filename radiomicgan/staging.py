"""Staged writes: every output is written under a hidden sibling name and renamed into place only when complete,
so a failed, cancelled or killed run leaves the previous output or none, never half a file or folder.

One place for it and for the signals around it::

    with staged(path) as tmp:            # a file: write to tmp; renamed to path when the block ends
        torch.save(state, tmp)
    with staged(folder, directory=True, owned=is_ours) as tmp:   # a folder, made empty for the block
        ...
    with staged_many([volume, cam]) as (tmp_volume, tmp_cam):   # several outputs: all of them or none
        ...

The staging name ``.NAME-partial-PID-TOKEN[SUFFIX]`` is unique per process and keeps the target's suffix (SimpleITK
and numpy pick the format from it). Files are flushed to disk (fsync) before the rename. On any exception,
Ctrl-C, SIGTERM or SIGHUP (``sigterm_as_interrupt`` turns them into Ctrl-C's ``KeyboardInterrupt``) the staging is
removed; the renames themselves run with those signals held (``signals_deferred``), so a cancel finds all outputs or
none. A write that fails (a full disk, a file-size limit: an ``OSError``, or the ``RuntimeError`` text SimpleITK's
writers and ``torch.save`` raise) ends as one ``OutputWriteError`` naming the output and what was being written.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import CTInputError, RadiomicGANError
from .jobs import STAGING_MARK  # the mark programs look for to clean up after a killed run (jobs.staged_leftovers)

COMPOUND_SUFFIXES = (".nii.gz",)
FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))  # no room: the disk, a quota, a size limit
# what a writer's RuntimeError says when the file system refused its bytes (SimpleITK/ITK's image IO, torch.save's
# zip writer); any other RuntimeError (a bug, a shape mismatch, CUDA memory) is left as it is
WRITE_FAULT_TEXT = re.compile(r"error writing|failed to write|could ?n[o']t write|unable to write|write failed|"
                              r"failed writing|iostream error|unexpected pos|no space left|file too large|quota",
                              re.IGNORECASE)


class OutputWriteError(RadiomicGANError):
    """An output could not be written (a full disk, a quota, a size limit, ...): ``cannot write PATH (what): why``.
    Its staging is removed; the previous output, if any, stays."""

    def __init__(self, path: Path, what: str, reason: str):
        self.path, self.what, self.reason = Path(path), what, reason
        super().__init__(f"cannot write {self.path} ({what}): {reason}")


_active: dict[Path, Path] = {}  # staging -> its target, so that a write nested in another's staging names the target

_WHAT = {".pt": "PyTorch weights", ".json": "JSON", ".md": "text", ".npz": "arrays", ".png": "figure",
         ".csv": "table", ".html": "report page", ".txt": "text", ".jsonl": "log"}


def describe(target: Path, directory: bool = False) -> str:
    """What an output is, for the message of a failed write."""
    if directory:
        return "folder"
    name = Path(target).name.lower()
    if any(name.endswith(s) for s in (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")):
        return "image"
    return _WHAT.get(Path(name).suffix, "file")


def public_path(path: str | os.PathLike) -> Path:
    """``path`` with any staging it lies in replaced by that staging's target: the name the user gave."""
    path = Path(path)
    for _ in range(8):  # stagings nest a few deep at most
        for tmp, target in sorted(_active.items(), key=lambda item: -len(item[0].parts)):  # the innermost first
            if path == tmp or tmp in path.parents:
                path = target / path.relative_to(tmp)
                break
        else:
            return path
    return path


def write_fault(exc: BaseException, tmps: Sequence[Path], targets: Sequence[Path], what: str) -> OutputWriteError | None:
    """The one-line error for a failed write into the stagings ``tmps`` of ``targets``, or None when ``exc`` is no
    write fault (an error reading an input, a bug: left as it is)."""
    if isinstance(exc, OutputWriteError):  # from a write nested in one of ours: name the user's path
        path = public_path(exc.path)
        return None if path == exc.path else OutputWriteError(path, exc.what, exc.reason)
    ours = [*tmps, *targets]
    if isinstance(exc, OSError):
        name = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
        mine = name is not None and any(name == p or p in name.parents for p in ours)
        if exc.errno not in FULL and not mine:
            return None
        reason = os.strerror(errno.ENOSPC) if exc.errno in FULL else (exc.strerror or str(exc).splitlines()[0])
        # a size limit (EFBIG) or a quota is the same to the user as a full disk: no room for the output
        return OutputWriteError(public_path(name) if mine else _named(str(exc), tmps, targets), what, reason)
    if isinstance(exc, RuntimeError) and WRITE_FAULT_TEXT.search(str(exc)):
        return OutputWriteError(_named(str(exc), tmps, targets), what, os.strerror(errno.ENOSPC))
    return None


def _named(text: str, tmps: Sequence[Path], targets: Sequence[Path]) -> Path:
    """The target whose staging the writer's message names; the first (or their folder) when it names none."""
    for tmp, target in zip(tmps, targets):
        if tmp.name in text:
            return target
    return targets[0] if len(targets) == 1 else targets[0].parent


def staging_name(target: Path) -> Path:
    """A hidden sibling of ``target``, unique per process, with the target's suffix."""
    target = Path(target)
    suffix = next((s for s in COMPOUND_SUFFIXES if target.name.lower().endswith(s)), target.suffix)
    return target.with_name(f".{target.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def check_owned(folder: Path, owned: Callable[[Path], bool]) -> None:
    """--overwrite replaces only what this tool wrote: refuse a folder that holds anything else."""
    for entry in sorted(Path(folder).iterdir()):
        if not (entry.is_file() and not entry.is_symlink() and owned(entry)):
            raise CTInputError(f"{folder}: holds {entry.name}, which this tool did not write; refusing to replace the "
                               "folder (move that file or choose another output)")


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_into(tmp: Path, target: Path, *, overwrite: bool = True, owned: Callable[[Path], bool] | None = None) -> None:
    """Rename a completed staging into place. An existing folder is swapped out first (and removed after); with
    ``owned``, a folder holding anything this tool did not write is refused; without ``overwrite``, a non-empty one."""
    tmp, target = Path(tmp), Path(target)
    _fsync_tree(tmp)
    if target.is_dir() and not target.is_symlink():
        if any(target.iterdir()) and not overwrite:
            raise CTInputError(f"{target}: already exists; refusing to overwrite")
        if owned is not None:
            check_owned(target, owned)  # checked again here: the folder may have changed during the run
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextmanager
def staged_many(targets: Sequence[str | os.PathLike], *, directory: bool = False, overwrite: bool = True,
                owned: Callable[[Path], bool] | None = None, what: str | None = None) -> Iterator[list[Path]]:
    """Staging paths for ``targets``, renamed into place together when the block ends without an exception;
    removed otherwise. ``directory``: each staging is made as an empty folder (else nothing is made: the block
    writes a file, or a folder of its own, there). ``what`` the outputs are, for the message of a failed write
    (``OutputWriteError``, raised in place of the writer's OSError or RuntimeError)."""
    targets = [Path(t) for t in targets]
    tmps = []
    try:
        try:
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmps.append(staging_name(target))
                _active[tmps[-1]] = target
                if directory:
                    tmps[-1].mkdir()
            yield tmps
            with signals_deferred():  # milliseconds: a cancel then finds every output or none, never a part
                for tmp, target in zip(tmps, targets):
                    replace_into(tmp, target, overwrite=overwrite, owned=owned)
        except (OSError, RuntimeError, OutputWriteError) as exc:
            fault = write_fault(exc, tmps, targets, what or describe(targets[0], directory))
            if fault is None:
                raise
            raise fault from None
    finally:
        for tmp in tmps:
            _active.pop(tmp, None)
            _remove(tmp)


@contextmanager
def staged(target: str | os.PathLike, *, directory: bool = False, overwrite: bool = True,
           owned: Callable[[Path], bool] | None = None, what: str | None = None) -> Iterator[Path]:
    """One staged output (see ``staged_many``)."""
    with staged_many([target], directory=directory, overwrite=overwrite, owned=owned, what=what) as (tmp,):
        yield tmp


def write_text(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    with staged(path, what=what) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------------------------- signals


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM while finished outputs are renamed into place; one that arrives meanwhile is
    dropped, since the run is then complete (in the main thread only, where Python delivers signals)."""
    if not _main_thread():
        yield
        return
    names = [n for n in ("SIGINT",) + CANCEL_SIGNALS if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), lambda *_: None) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


# signals that cancel a run as Ctrl-C does: SIGTERM (a program stopping this one, e.g. the Slicer modules) and SIGHUP
# (the terminal closing, an ssh session dropping)
CANCEL_SIGNALS = ("SIGTERM", "SIGHUP")


def _terminated(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM and SIGHUP take Ctrl-C's path, so every staging is removed on the way out."""
    names = [n for n in CANCEL_SIGNALS if hasattr(signal, n)]
    if not (_main_thread() and names):
        yield
        return
    previous = {n: signal.signal(getattr(signal, n), _terminated) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


@contextmanager
def on_interrupt(handler: Callable[[], None]):
    """Call ``handler`` on Ctrl-C instead of raising (training stops at its next step); main thread only."""
    if not (_main_thread() and hasattr(signal, "SIGINT")):
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

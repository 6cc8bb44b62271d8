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
Ctrl-C or SIGTERM (``sigterm_as_interrupt`` turns it into Ctrl-C's ``KeyboardInterrupt``) the staging is removed;
the renames themselves run with those signals held (``signals_deferred``), so a cancel finds all outputs or none.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import CTInputError
from .jobs import STAGING_MARK  # the mark programs look for to clean up after a killed run (jobs.staged_leftovers)

COMPOUND_SUFFIXES = (".nii.gz",)


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
                owned: Callable[[Path], bool] | None = None) -> Iterator[list[Path]]:
    """Staging paths for ``targets``, renamed into place together when the block ends without an exception;
    removed otherwise. ``directory``: each staging is made as an empty folder (else nothing is made: the block
    writes a file, or a folder of its own, there)."""
    targets = [Path(t) for t in targets]
    tmps = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(staging_name(target))
            if directory:
                tmps[-1].mkdir()
        yield tmps
        with signals_deferred():  # milliseconds: a cancel then finds every output or none, never a part
            for tmp, target in zip(tmps, targets):
                replace_into(tmp, target, overwrite=overwrite, owned=owned)
    finally:
        for tmp in tmps:
            _remove(tmp)


@contextmanager
def staged(target: str | os.PathLike, *, directory: bool = False, overwrite: bool = True,
           owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """One staged output (see ``staged_many``)."""
    with staged_many([target], directory=directory, overwrite=overwrite, owned=owned) as (tmp,):
        yield tmp


def write_text(path: str | os.PathLike, text: str) -> None:
    with staged(path) as tmp:
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
    names = [n for n in ("SIGINT", "SIGTERM") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), lambda *_: None) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


def _terminated(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a program cancelling this one, e.g. the Slicer modules) takes Ctrl-C's path, so every staging is
    removed on the way out."""
    if not (_main_thread() and hasattr(signal, "SIGTERM")):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

"""An OS-level lock on an output, held while a run writes it: a second run on the same output (train's model folder,
harmonize's volume, evaluate's report folder, a cohort's output) is refused at once in one line instead of
interleaving its files with the first's.

The lock is ``fcntl.flock`` (``msvcrt.locking`` on Windows) on a small hidden file, not a marker file: the operating
system releases it when the process ends, however it ends (SIGKILL included), so a killed run never leaves an output
stuck. The lock file sits beside the output (``.NAME.lock``), or inside a folder the output owns (a cohort's
``.cohort.lock``); one made beside the output is removed again on release.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RadiomicGANError

LOCK_SUFFIX = ".lock"


class OutputInUseError(RadiomicGANError):
    """Another run holds the lock on this output."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output: a hidden ``.NAME.lock`` beside it (the output itself may not exist yet)."""
    path = Path(output).absolute()
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def _try_lock(fh) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class OutputLock:
    """``with OutputLock(out, "train"):`` holds the lock on ``out`` for the run, or raises ``OutputInUseError``.

    ``path`` names the lock file when it is not the default beside the output (``lock_path``); ``remove`` deletes
    the lock file on release (the default for one beside the output, so that a finished run leaves only its output).
    Folders made to hold the lock file are removed again on release when still empty (a refused run leaves nothing).
    """

    def __init__(self, output: str | os.PathLike, what: str = "run", path: str | os.PathLike | None = None,
                 remove: bool | None = None):
        self.output = Path(output)
        self.what = what
        self.path = Path(path) if path is not None else lock_path(output)
        self.remove = path is None if remove is None else remove
        self._fh = None
        self._made: list[Path] = []

    def _make_parents(self) -> None:
        missing, folder = [], self.path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first

    def _remove_made(self) -> None:
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> OutputLock:
        self._make_parents()
        for _ in range(20):  # another run may remove the file between our open and our lock: open it again
            try:
                fh = open(self.path, "a+")
            except OSError:
                self._remove_made()
                raise
            if not _try_lock(fh):
                fh.close()
                self._remove_made()
                raise OutputInUseError(f"{self.output}: another {self.what} is writing there (lock {self.path}); "
                                       "wait for it to finish or choose another output")
            try:
                same = os.name == "nt" or os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fh = fh
                return self
            fh.close()
        raise OutputInUseError(f"{self.output}: its lock {self.path} keeps changing; is another run starting there?")

    def __exit__(self, *exc) -> None:
        if self._fh is None:
            return
        if self.remove and os.name != "nt":
            try:  # unlinked while still held: a run waiting on the old file sees it gone and opens the new one
                self.path.unlink()
            except OSError:
                pass
        if os.name == "nt":
            import msvcrt

            try:
                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        self._fh.close()
        self._fh = None
        if self.remove and os.name == "nt":
            try:
                self.path.unlink()
            except OSError:
                pass
        self._remove_made()


# what each subcommand writes, by its argparse names; cohort locks inside run_cohort (rank 0 of a torchrun job only)
_COMMAND_OUTPUTS = {"train": ("out",), "harmonize": ("out",), "evaluate": ("out",), "simulate": ("pairs", "out"),
                    "demo": ("out",), "calibrate": ("out",)}


class _Locks:
    def __init__(self, locks: list[OutputLock]):
        self.locks, self.held = locks, []

    def __enter__(self):
        try:
            for lock in self.locks:
                try:
                    lock.__enter__()
                except OutputInUseError:
                    raise
                except OSError:
                    continue  # the output cannot be created there: the command's own checks say why, in one line
                self.held.append(lock)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self.held:
            self.held.pop().__exit__(None, None, None)


def command_lock(command: str, args) -> _Locks:
    """The locks a subcommand holds while it runs (its ``--out`` and the like); a torchrun rank other than 0 runs
    beside rank 0 on the same output and takes none."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return _Locks([])
    outputs = [getattr(args, name, None) for name in _COMMAND_OUTPUTS.get(command, ())]
    return _Locks([OutputLock(out, f"{command} run") for out in outputs if out])

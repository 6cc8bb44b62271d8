"""Training from Slicer: the core's ``radiomicgan train`` in a background process, its log as live plot nodes.

Cancel first asks the trainer to stop (a ``stop`` line on its standard input; it stops after the current step), so
the model folder keeps its last complete epoch; only when it has not stopped after a grace period is the process
tree killed (still safe: the trainer replaces its files atomically). No qt; the widget polls ``TrainingRun.poll()``.
"""

from __future__ import annotations

from pathlib import Path

from radiomicgan.jobs import CAM_SAMPLES, PROGRESS_OPTION, ExitCode

from .process import Job, JobStatus, core_command

CANCEL_GRACE_S = 60.0


class TrainingSettings:
    """The panel's choices for ``radiomicgan train``, by the core's setting names (``radiomicgan.settings``);
    a setting left out or None keeps the core's default, a learning rate of 0 the method's own."""

    def __init__(self, extra_args=(), **values):
        from radiomicgan.settings import to_arguments

        to_arguments(values)  # an unknown name or a value out of range fails here, not in the background process
        self.values = values
        self.extra_args = list(extra_args)

    def arguments(self) -> list[str]:
        from radiomicgan.settings import to_arguments

        return to_arguments(self.values) + [str(a) for a in self.extra_args]


def panel_parameters() -> list[tuple[str, type, object, tuple]]:
    """The Train panel's training fields: (parameter name, type, default, choices or (minimum, maximum)), one for
    each setting marked ``panel`` in ``radiomicgan.settings``, so the panel cannot drift from the core."""
    from radiomicgan.settings import PANEL_SETTINGS

    fields = []
    for s in PANEL_SETTINGS:
        if s.choices:
            bounds = tuple(s.choices)
        elif s.kind in (int, float):
            bounds = (s.minimum if s.minimum is not None else 0, s.maximum if s.maximum is not None else s.panel_maximum)
        else:
            bounds = ()
        default = s.default if s.default is not None else (0.0 if s.kind is float else s.choices[0] if s.choices else "")
        fields.append((s.panel, s.kind, default, bounds))
    return fields


def settings_from_slicer_names(**values) -> dict:
    """Settings by their Slicer-side names (the panel's, else camelCase: ``stepsPerEpoch``, ``vggWeights``) as the
    core's names (``steps_per_epoch``)."""
    from radiomicgan.settings import SETTINGS, camel

    by_slicer_name = {s.panel or camel(s.name): s.name for s in SETTINGS}
    unknown = set(values) - set(by_slicer_name)
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    return {by_slicer_name[k]: v for k, v in values.items()}


def write_pairs_from_nodes(source_node, target_node, folder, source_kernel: str | None = None,
                           target_kernel: str | None = None) -> Path:
    """Two loaded volumes of one scan (non-standard and standard kernel) as a one-pair training set in ``folder``
    (the core's manifest format); returns the manifest path. The nodes are only read."""
    from radiomicgan.dataset import manifest_entry, write_manifest
    from radiomicgan.io import write_volume

    from .mrml import volume_from_node

    source, target = volume_from_node(source_node), volume_from_node(target_node)
    if not source.same_geometry(target):
        raise ValueError(f"{source_node.GetName()} and {target_node.GetName()} must be the same scan on the same grid "
                         f"(shapes {source.shape} and {target.shape})")
    # unnamed and untagged stays empty (not a placeholder a scan's tag would then be compared with)
    source_kernel = source_kernel or source.meta.kernel.split("\\")[0].strip()
    target_kernel = target_kernel or target.meta.kernel.split("\\")[0].strip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(source, folder / "pair0_source.nrrd", overwrite=True)
    write_volume(target, folder / "pair0_target.nrrd", overwrite=True)
    entry = manifest_entry("pair0", "pair0_source.nrrd", "pair0_target.nrrd", source_kernel, target_kernel)
    return write_manifest(folder, [entry], {"made_by": "RadiomicGAN Train module from loaded volumes",
                                            "source_node": source_node.GetName(), "target_node": target_node.GetName()})


class TrainingRun(Job):
    """One ``radiomicgan train`` run in the background (the ``Job`` contract), with its log turned into plot nodes
    when a scene is given.

    ``start()``, then ``poll()`` until it returns a final ``JobStatus``: completed, or cancelled (``cancel()`` asks
    the trainer to stop after its current step; the folder keeps the last complete epoch; a trainer still running
    ``grace_s`` later is killed). ``result`` is the ``TrainingPlots`` (None without a scene), ``progress`` the last
    progress record, ``warnings`` the core's warnings."""

    what = "training"

    def __init__(self, pairs, model_folder, settings: TrainingSettings, *, resume: bool = False, scene=None,
                 on_output=None, on_epoch=None, grace_s: float = CANCEL_GRACE_S):
        from radiomicgan.jobs import CANCEL_NAME

        super().__init__(on_output=on_output)
        self.pairs = Path(pairs)
        self.folder = Path(model_folder)
        self.settings = settings
        self.resume = resume
        self.scene = scene
        self.on_epoch = on_epoch
        self.grace_s = grace_s
        self.cancel_flag = self.folder / CANCEL_NAME
        self.plots = None
        self.progress: dict | None = None
        self._created = False
        self._cam_mtime: float | None = None

    def command(self) -> list[str]:
        args = ["train", "--pairs", str(self.pairs), "--out", str(self.folder), *self.settings.arguments(), PROGRESS_OPTION]
        return core_command(*args, *(["--resume"] if self.resume else []))

    def start(self) -> "TrainingRun":
        if self.cancel_flag.exists():  # left by another program's cancel: the trainer would stop at once
            self.cancel_flag.unlink()
        self._created = not self.folder.exists()
        if self.scene is not None:
            from .plots import TrainingPlots

            self.plots = TrainingPlots(self.scene, self.folder)  # on resume, the earlier epochs are plotted too
        return super().start()

    def on_progress(self, record: dict) -> None:
        self.progress = record

    def _tick(self) -> None:
        """Every poll: new log records become plot points."""
        if self.plots is not None:
            for record in self.plots.update():
                if record.get("event") == "epoch" and self.on_epoch is not None:
                    self.on_epoch(record)

    def _finished(self, code: int) -> JobStatus:
        """OK: completed; CANCELLED: stopped after an epoch (or before the first), the folder as the core left it."""
        self.result = self.plots
        return JobStatus.COMPLETED if code == ExitCode.OK else JobStatus.CANCELLED

    def _cleanup(self) -> None:
        """A run that ended without a model (failed or killed before its first epoch) leaves nothing behind: no
        folder it created, no empty plot nodes."""
        import shutil

        from radiomicgan.modelio import CARD_NAME

        if self.cancel_flag.exists():
            self.cancel_flag.unlink()
        if self.exit_code != ExitCode.OK and self._created and not (self.folder / CARD_NAME).exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.exit_code != ExitCode.OK and self.plots is not None and not self.plots.records:
            for node in self.plots.series_nodes() + self.plots.nodes:
                self.scene.RemoveNode(node)
            self.plots = self.result = None

    def cam_samples_changed(self) -> bool:
        """True once each time the training (re)writes its Grad-CAM samples."""
        path = self.folder / CAM_SAMPLES
        if not path.is_file():
            return False
        mtime = path.stat().st_mtime
        if mtime == self._cam_mtime:
            return False
        self._cam_mtime = mtime
        return True

"""Harmonize a loaded volume in the background: the input node is written to a temporary NRRD, the core's
command line (``radiomicgan harmonize ... --progress-json``) runs in a ``BackgroundProcess``, and the results are
loaded back as new nodes only when it succeeded. A cancelled or failed run adds nothing to the scene and leaves
no file behind; the views are the widget's business and are only touched after success.

Everything takes the scene as an argument and imports no qt: it runs under pytest with slicer-core.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from radiomicgan.jobs import MODEL_FIGURES, gradcam_paths

from .process import Job, JobStatus, core_command



# ------------------------------------------------------------------------------------------------ model card


def read_model_card(folder):
    """The model's card (``radiomicgan.card.ModelCard``) without loading torch; ValueError with a one-line reason
    otherwise."""
    from radiomicgan.card import ModelCard
    from radiomicgan.errors import ModelError
    from radiomicgan.modelio import WEIGHTS_NAME

    if not folder or not str(folder).strip() or not Path(str(folder)).is_dir():
        raise ValueError("select a model folder made by 'radiomicgan train'")
    folder = Path(str(folder))
    try:
        card = ModelCard.read(folder)
    except ModelError as exc:
        raise ValueError(str(exc)) from None
    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_NAME}")
    return card


def supports_gradcam(card) -> bool:
    """Only methods with a discriminator have Grad-CAM (``radiomicgan.methods``)."""
    from radiomicgan.methods import REGISTRY

    return REGISTRY[card.method].discriminator


def model_figures(folder) -> list[Path]:
    """The validation figures training wrote into the folder (window history, Grad-CAM samples, ...)."""
    folder = Path(str(folder))
    return [folder / name for name in MODEL_FIGURES if (folder / name).is_file()]


def describe_model(card) -> str:
    """The card in a few lines for the panel: kernels, method, window, VGG source, validation figures."""
    training, validation, window = card.training, card.validation, card.final_window
    lines = [
        f"{card.source_kernel or '?'} -> {card.target_kernel or '?'} ({card.method}"
        + (f", schedule {card.schedule}" if card.schedule else "") + ")",
        f"Final training window: [{window[0]:.0f}, {window[1]:.0f}] HU" if window else "Final training window: -",
        f"Encoder: {card.architecture.get('vgg_source', 'none (no VGG encoder)')}",
    ]
    if validation is not None:
        lines.append(f"Validation PSNR: input {validation.input_psnr_db:.2f} dB -> model "
                     f"{validation.psnr_db:.2f} dB ({validation.slices} slices)")
    if training is not None:
        lines.append(f"Trained {training.epochs_done} of {training.epochs} epochs "
                     f"({training.status or 'completed'}) on {training.device}")
    if not supports_gradcam(card):
        lines.append("No discriminator: no Grad-CAM for this model")
    return "\n".join(lines)


def available_devices() -> list[tuple[str, str]]:
    """(label, device) pairs: auto, each CUDA GPU by name, the CPU. torch is only asked when installed."""
    devices = [("auto (GPU when there is one)", "auto")]
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            for index in range(torch.cuda.device_count()):
                devices.append((f"cuda:{index} ({torch.cuda.get_device_name(index)})", f"cuda:{index}"))
        except Exception:  # a broken CUDA set-up must not stop the panel: the CPU still works
            pass
    devices.append(("CPU", "cpu"))
    return devices


# ------------------------------------------------------------------------------------------------ the job


@dataclass
class HarmonizeResult:
    volume: object  # the harmonized vtkMRMLScalarVolumeNode
    gradcam: object = None  # Grad-CAM map of the result (0..1), shown thresholded
    gradcam_input: object = None  # Grad-CAM map of the input
    windows: dict | None = None  # hot-spot windows of input and result (the core's _windows.json)
    warnings: list[str] = field(default_factory=list)

    def __iter__(self):  # output, cam, windows = logic.process(...) reads naturally on the console
        return iter((self.volume, self.gradcam, self.windows))


class HarmonizeJob(Job):
    """A harmonization running in the background (the ``Job`` contract: ``poll()`` from a timer, ``cancel()``,
    ``wait()``); ``result`` is a ``HarmonizeResult`` once completed. Started by the constructor.

    ``kernel``: the input's reconstruction kernel when the node does not record it (e.g. read from its DICOM
    files), so the core can warn about a kernel the model was not trained for.

    ``status`` a ``JobStatus``; ``progress`` 0..1 and ``stage`` from the core's PROGRESS lines; ``warnings``
    (CPU fallback, kernel mismatch, ...) and ``error`` for the user.
    """

    what = "harmonization"

    def __init__(self, scene, input_node, model_dir, *, device: str = "auto", batch: int | None = None,
                 gradcam: bool | None = None, th_fail: float = 0.5, output_node=None, on_output=None, env=None,
                 kernel: str | None = None):
        from radiomicgan.io import write_volume

        from .mrml import volume_from_node

        card = read_model_card(model_dir)
        if gradcam is None:
            gradcam = supports_gradcam(card)
        if gradcam and not supports_gradcam(card):
            raise ValueError(f"method '{card.method}' has no discriminator: no Grad-CAM; harmonize without it")
        if output_node is not None and input_node is not None and output_node.GetID() == input_node.GetID():
            raise ValueError("the output volume must not be the input volume (inputs are never modified)")
        volume = volume_from_node(input_node, kernel)  # raises for an empty or non-scalar node
        super().__init__(on_output=on_output, env=env)
        self.scene, self.input_node, self.output_node = scene, input_node, output_node
        self.model_dir, self.card, self.gradcam, self.th_fail = Path(str(model_dir)), card, gradcam, th_fail
        self.progress, self.stage = 0.0, "starting"
        self.workdir = Path(tempfile.mkdtemp(prefix="RadiomicGAN-harmonize-"))
        try:
            self.input_path = write_volume(volume, self.workdir / "input.nrrd")
            self.output_path = self.workdir / "harmonized.nrrd"
            self.cam_path, self.cam_input_path, self.windows_path = gradcam_paths(self.workdir / "gradcam.nrrd", ".nrrd")
            self.args = [str(self.input_path), "--model", str(self.model_dir), "--out", str(self.output_path),
                         "--device", device, "--th-fail", str(th_fail), "--progress-json"]
            if batch:
                self.args += ["--batch", str(int(batch))]
            if gradcam:
                self.args += ["--gradcam", str(self.cam_path)]
        except BaseException:
            self._cleanup()
            raise
        self.start()

    def command(self) -> list[str]:
        return core_command("harmonize", *self.args)

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def on_progress(self, record: dict) -> None:
        self.stage = record.get("stage", self.stage)
        fraction = float(record.get("fraction", 0.0))
        # slices are the first 50 % when Grad-CAM follows (it takes about as long again)
        self.progress = (0.5 * fraction if self.stage == "harmonize" else 0.5 + 0.5 * fraction) if self.gradcam else fraction

    def _finished(self, code: int) -> JobStatus:
        if code != 0:
            return JobStatus.CANCELLED
        self.result = self._load()
        self.progress = 1.0
        return JobStatus.COMPLETED

    def _load(self) -> HarmonizeResult:
        from radiomicgan.io import read_volume

        from .mrml import add_map_node, add_volume_node, place_like, set_volume_node, show_thresholded

        volume = read_volume(self.output_path)
        name = f"{self.input_node.GetName()}_harmonized"
        cam = cam_input = windows = None
        if self.gradcam:  # read everything before adding any node
            cam = read_volume(self.cam_path, check_hu=False)
            cam_input = read_volume(self.cam_input_path, check_hu=False)
            windows = json.loads(self.windows_path.read_text())
        if self.output_node is not None:
            output = set_volume_node(self.output_node, volume)
            if output.GetDisplayNode() is None:  # e.g. made with the selector's "Create new volume"
                output.CreateDefaultDisplayNodes()
        else:
            output = add_volume_node(self.scene, volume, name)
        output.SetAttribute("RadiomicGAN.HarmonizedTo", str(self.card.target_kernel))
        output.SetAttribute("RadiomicGAN.Model", str(self.model_dir))
        place_like(output, self.input_node)  # a transformed input's result shows where the input shows
        result = HarmonizeResult(volume=output, windows=windows, warnings=list(self.warnings))
        if self.gradcam:
            result.gradcam = add_map_node(self.scene, cam.hu, volume, f"{name}_GradCAM")
            result.gradcam_input = add_map_node(self.scene, cam_input.hu, volume, f"{self.input_node.GetName()}_GradCAM")
            for node in (result.gradcam, result.gradcam_input):
                show_thresholded(node, self.th_fail)
                place_like(node, self.input_node)
        return result


def hot_spot_windows(windows: dict | None) -> dict:
    """{"input": (lo, hi) or None, "harmonized": (lo, hi) or None} from the core's windows record."""
    out = {}
    for key in ("input", "harmonized"):
        span = ((windows or {}).get(key) or {}).get("hot_spot_window_hu")
        out[key] = (float(span[0]), float(span[1])) if span else None
    return out


def format_windows(windows: dict | None) -> tuple[str, str]:
    """Texts for the input and result columns: hot-spot HU window, hot fraction, 'standard' probability."""
    texts = []
    for key in ("input", "harmonized"):
        entry = (windows or {}).get(key)
        if not entry:
            texts.append("-")
            continue
        span = entry.get("hot_spot_window_hu")
        texts.append((f"[{span[0]:.0f}, {span[1]:.0f}] HU" if span else "no hot spots")
                     + f"\nhot spots {100 * entry.get('hot_fraction', 0):.1f} % of voxels"
                     + f"\np(standard) = {entry.get('standard_probability', float('nan')):.2f}")
    return texts[0], texts[1]

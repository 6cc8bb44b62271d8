"""The model card: what a model folder's ``model.json`` holds, typed and versioned.

Format ``radiomicgan-model/1`` (``FORMAT``): a JSON object with

- ``format``: the string ``radiomicgan-model/1``; ``method``: one of ``radiomicgan.methods.METHODS``;
- ``source_kernel``, ``target_kernel``: the kernels the model converts from and to;
- ``hu_range``: [LO, HI], the standardization range harmonized at inference (outside it the input is carried over);
- ``schedule``: the window schedule (dwt, fixed, dynamic, none; null for closed-form baselines);
- ``config``: every training setting (``radiomicgan.settings``) as trained;
- ``architecture``: what rebuilds the networks (encoder, VGG source, ...) or ``{"baseline": method}``;
- ``window_scaling``, ``inference_window``, ``final_window``, ``window_history``: Dynamic Window-based Training;
- ``training`` (device, precision, epochs done, status, ...), ``validation`` (PSNR on held-out slices),
  ``data`` (manifest, pairs, slices), ``versions`` (packages).

Keys this version does not know are kept (``extra``) and written back unchanged. ``MODEL_CARD.md`` is the same
card for people, written beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ModelError
from .staging import write_text
from .window import STANDARD_RANGE

FORMAT = "radiomicgan-model/1"
CARD_NAME, CARD_MD = "model.json", "MODEL_CARD.md"


@dataclass
class TrainingRecord:
    device: str = "cpu"
    precision: str = "float32"
    world_size: int = 1
    epochs: int = 0
    epochs_done: int = 0
    steps_done: int = 0
    best_epoch: int | None = None
    last_val_psnr_db: float | None = None
    status: str | None = None  # completed or cancelled
    closed_form: bool | None = None  # fitted in closed form (no epochs)


@dataclass
class ValidationRecord:
    psnr_db: float
    input_psnr_db: float
    slices: int
    epoch: int | None = None


@dataclass
class DataRecord:
    manifest: str = ""
    pairs: int = 0
    slices: int | None = None
    validation: str | None = None  # which pair validated


@dataclass
class ModelCard:
    method: str
    source_kernel: str
    target_kernel: str
    hu_range: tuple[float, float] = STANDARD_RANGE
    schedule: str | None = None
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    data: DataRecord = field(default_factory=DataRecord)
    architecture: dict = field(default_factory=dict)
    window_scaling: str | None = None
    inference_window: tuple[float, float] | None = None
    final_window: tuple[float, float] | None = None
    window_history: list | None = None
    training: TrainingRecord = field(default_factory=TrainingRecord)
    validation: ValidationRecord | None = None
    format: str = FORMAT
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    # ------------------------------------------------------------------------------------------ dict and JSON

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": self.format}
        for f in fields(self):
            if f.name in ("format", "extra"):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, (TrainingRecord, ValidationRecord, DataRecord)):
                value = {k: v for k, v in asdict(value).items() if v is not None}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "model card") -> "ModelCard":
        """A card from its JSON object; ``ModelError`` (one line naming ``where``) when it is not a valid one."""
        from .methods import METHODS

        if not isinstance(raw, dict):
            raise ModelError(f"{where}: not a {FORMAT} card (a JSON {type(raw).__name__}, not an object)")
        if raw.get("format") != FORMAT or raw.get("method") not in METHODS:
            raise ModelError(f"{where}: not a {FORMAT} card (format {raw.get('format')!r}, method {raw.get('method')!r})")
        hu_range = raw.get("hu_range", list(STANDARD_RANGE))
        if not _is_range(hu_range):
            raise ModelError(f"{where}: hu_range must be two numbers [LO, HI] with LO < HI, not {json.dumps(hu_range)}")
        for key in ("inference_window", "final_window"):
            if raw.get(key) is not None and not _is_range(raw[key]):
                raise ModelError(f"{where}: {key} must be two numbers [LO, HI] with LO < HI, not {json.dumps(raw[key])}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        try:
            for key, record in (("training", TrainingRecord), ("data", DataRecord)):
                if key in values:
                    values[key] = _record(record, values[key])
            if values.get("validation") is not None:
                values["validation"] = _record(ValidationRecord, values["validation"])
            for key in ("hu_range", "inference_window", "final_window"):
                if values.get(key) is not None:
                    values[key] = tuple(float(v) for v in values[key])
            for key in ("config", "versions", "architecture"):
                if not isinstance(values.get(key, {}), dict):
                    raise TypeError(f"{key} is not an object")
            card = cls(**{"source_kernel": "", "target_kernel": "", **values},
                       extra={k: v for k, v in raw.items() if k not in known})
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed {FORMAT} card ({str(exc).splitlines()[0][:160]})") from None
        return card

    @classmethod
    def read(cls, folder: str | Path) -> "ModelCard":
        folder = Path(folder)
        path = folder / CARD_NAME
        if not path.is_file():
            raise ModelError(f"{folder}: not a RadiomicGAN model folder (no {CARD_NAME})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise ModelError(f"{path}: unreadable ({exc.strerror or exc})") from None
        return cls.from_dict(raw, str(path))

    def write(self, folder: str | Path) -> None:
        """``model.json`` and ``MODEL_CARD.md``, each replaced whole (staged)."""
        folder = Path(folder)
        write_text(folder / CARD_NAME, json.dumps(self.to_dict(), indent=2) + "\n", what="model card")
        write_text(folder / CARD_MD, self.markdown(), what="model card")

    # ------------------------------------------------------------------------------------------ for people

    def markdown(self) -> str:
        t, v, d = self.training, self.validation, self.data
        nan = float("nan")
        lines = [
            f"# RadiomicGAN model card: {self.method}",
            "",
            f"- Converts kernel **{self.source_kernel or '?'}** to **{self.target_kernel or '?'}**",
            f"- Method: {self.method}; schedule: {self.schedule if self.schedule is not None else None}",
            f"- HU range harmonized: {list(self.hu_range)}; outside it the input is carried over",
            f"- Final training window: {list(self.final_window) if self.final_window else '-'}",
            *self._growing_line(),
            f"- Pretrained encoder: {self.architecture.get('vgg_source', 'none')}",
            f"- Trained epochs: {t.epochs_done} of {t.epochs}, steps: {t.steps_done}, "
            f"device: {t.device}, precision: {t.precision}, processes: {t.world_size}",
            f"- Data: {d.pairs} training pair(s), {d.slices if d.slices is not None else '-'} slices, validation: {d.validation or '-'}",
            f"- Validation PSNR: input {v.input_psnr_db if v else nan:.2f} dB -> model {v.psnr_db if v else nan:.2f} dB",
            f"- Packages: {', '.join(f'{k} {val}' for k, val in self.versions.items())}",
            "",
            "Weights are plain tensors (`weights.pt`, loaded with `torch.load(..., weights_only=True)`).",
        ]
        return "\n".join(lines) + "\n"

    def _growing_line(self) -> list[str]:
        """How fixed growing was paced (older cards, paced by epochs only, lack the share)."""
        c = self.config
        if self.schedule not in ("dwt", "fixed") or "th_eta" not in c:
            return []
        share = c.get("growing_share", 0.0)
        limit = f"at most {share:.0%} of the steps in all, {c['th_eta']} epoch(s) per window" if share else f"at most {c['th_eta']} epoch(s) per window"
        return [f"- Fixed growing: windows widened by {c.get('window_step', 256.0):.0f} HU, {limit}, earlier when generator accuracy > {c.get('th_acc')}"]


def _is_range(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] < value[1])


def _record(cls, raw):
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} is not an object")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})

"""HU windows and Dynamic Window-based Training (DWT) schedules.

A window [lo, hi] is the HU range a model sees in one epoch: input and target are clipped to it, then scaled
to the network's [-1, 1] in one of three ways (``window_scaling``):
- ``window``: min-max over the window itself, as the paper does, so a narrow window stretches CT contrast
  over the network's input range (a lung window magnifies lung texture eightfold);
- ``fixed``: over the standardization range ([-1024, 1000] HU by default) in every epoch, so one network unit
  means the same HU throughout and DWT is a clip-only curriculum;
- ``focus``: nothing is clipped to the window: the images are scaled as at inference, and the window picks the
  pixels the L1 loss weighs (target HU inside it; ``window_weight``): the curriculum without clipped images the
  model never meets at inference. Measured (README, dev split, one seed) below ``fixed``: not the default.
Training ends with consolidation epochs at the inference window (the whole range unless a card says
otherwise), so both variants end on the scale they are used at. At inference, pixels outside the inference
window are carried over from the input (see ``carry_weight``).

Schedules (paper section 2.2):
- ``fixed`` (RadiomicGAN-1): fixed growing from [-1024, -769], widening the upper bound by 256 HU when the
  generator accuracy exceeds th_acc or the window has trained th_eta epochs, until the range is covered; with a
  growing share, a window also widens after its share of the run's steps (within an epoch if need be);
- ``dynamic`` (RadiomicGAN-2): after each epoch, dynamic selection from Grad-CAM hot spots sets the window;
- ``dwt`` (RadiomicGAN): fixed growing, then dynamic selection;
- ``none``: the whole range every epoch (plain pix2pix).
Every schedule but ``none`` ends with ``consolidate`` epochs at the inference window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

STANDARD_RANGE = (-1024.0, 1000.0)
SCHEDULES = ("dwt", "fixed", "dynamic", "none")
WINDOW_SCALINGS = ("window", "fixed", "focus")
CARRY_MARGIN_HU = 50.0  # blend width between harmonized and carried-over pixels at the range edges


def to_unit(hu, hu_range=STANDARD_RANGE):
    """HU -> [-1, 1] over the standardization range (works on numpy arrays and torch tensors)."""
    lo, hi = hu_range
    return (hu - lo) * (2.0 / (hi - lo)) - 1.0


def from_unit(unit, hu_range=STANDARD_RANGE):
    lo, hi = hu_range
    return (unit + 1.0) * ((hi - lo) / 2.0) + lo


def scale_range(window, hu_range=STANDARD_RANGE, scaling: str = "fixed") -> tuple[float, float]:
    """The HU interval that maps to the network's [-1, 1] for a window under a window-scaling mode."""
    if scaling not in WINDOW_SCALINGS:
        raise ValueError(f"unknown window scaling '{scaling}'; choose one of {', '.join(WINDOW_SCALINGS)}")
    return (float(window[0]), float(window[1])) if scaling == "window" else (float(hu_range[0]), float(hu_range[1]))


def apply_window(hu, window, hu_range=STANDARD_RANGE, scaling: str = "fixed"):
    """Clip HU to the window, then scale to [-1, 1] (over the window, or over the standardization range); with
    ``focus`` scaling, clip to the standardization range only, as at inference."""
    if scaling == "focus":
        window = hu_range
    clipped = hu.clip(window[0], window[1]) if hasattr(hu, "clip") else np.clip(hu, window[0], window[1])
    return to_unit(clipped, scale_range(window, hu_range, scaling))


def window_weight(target_hu: np.ndarray, window, hu_range=STANDARD_RANGE, scaling: str = "fixed") -> np.ndarray | None:
    """``focus`` scaling: 1 where the target's HU lie in the window, else 0 (a bound at the standardization
    range's edge is open, so the whole-range window weighs every pixel); None for the other scalings."""
    if scaling != "focus":
        return None
    inside = np.ones(target_hu.shape, dtype=bool)
    if window[0] > hu_range[0]:
        inside &= target_hu >= window[0]
    if window[1] < hu_range[1]:
        inside &= target_hu <= window[1]
    return inside.astype(np.float32)


def carry_weight(hu, hu_range=STANDARD_RANGE, margin: float = CARRY_MARGIN_HU):
    """1 where the model's output is used, 0 where the input is carried over (outside the range), with a
    linear ramp of ``margin`` HU inside the upper edge so there is no seam; below the air floor (padding outside
    the field of view) the input is carried over. Works on numpy arrays and torch tensors."""
    lo, hi = hu_range
    return ((hi - hu) / margin).clip(0.0, 1.0) * (hu >= lo - margin)


@dataclass
class WindowSchedule:
    """State of DWT between epochs; serialisable (plain numbers) so a run can resume."""

    schedule: str = "dwt"
    hu_range: tuple[float, float] = STANDARD_RANGE
    start_upper: float = -769.0
    step: float = 256.0
    th_acc: float = 0.5
    th_eta: int = 2
    epochs: int = 0  # the run's length, for consolidation (0: no consolidation)
    consolidate: int = 0  # last epochs trained at the inference window
    steps_per_window: int = 0  # cap on the steps one fixed-growing window trains (0: paced by epochs only)
    phase: str = ""
    window: tuple[float, float] = (0.0, 0.0)
    epochs_in_window: int = 0
    steps_in_window: int = 0
    epoch_windows: list = field(default_factory=list)  # every window of the current epoch, once fixed growing widened within it
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        self.hu_range = tuple(float(v) for v in self.hu_range)
        if not self.phase:
            self.phase = {"dwt": "fixed", "fixed": "fixed", "dynamic": "dynamic", "none": "full"}[self.schedule]
            lo, hi = self.hu_range
            self.window = (lo, min(self.start_upper, hi)) if self.phase == "fixed" else (lo, hi)
            self._consolidate_if_due(0)
        self.window = tuple(float(v) for v in self.window)

    @property
    def full(self) -> tuple[float, float]:
        return self.hu_range

    @property
    def needs_cam(self) -> bool:
        """Whether the next window comes from dynamic selection (so Grad-CAM must run after this epoch); not when
        consolidation takes over next, which would discard the selection."""
        next_epoch = len(self.history) + 1  # the epoch being trained is len(history)
        consolidating_next = self.consolidate > 0 and next_epoch >= self.epochs - self.consolidate
        return self.phase == "dynamic" and not consolidating_next

    @property
    def inference_window(self) -> tuple[float, float]:
        return self.hu_range

    def _consolidate_if_due(self, next_epoch: int) -> None:
        """From ``epochs - consolidate`` on, train at the inference window: the model ends on the window and
        scale it is used at, whatever the curriculum before."""
        if self.schedule != "none" and self.consolidate > 0 and next_epoch >= self.epochs - self.consolidate:
            self.phase = "consolidation"
            self.window = self.inference_window

    def end_step(self) -> tuple[float, float]:
        """Count a training step; with ``steps_per_window``, fixed growing widens after that many steps, within an
        epoch if need be, so a short run's curriculum takes the share of steps it was given."""
        if self.phase == "fixed" and self.steps_per_window > 0:
            self.steps_in_window += 1
            if self.window[1] < self.hu_range[1] and self.steps_in_window >= self.steps_per_window:
                self.epoch_windows = self.epoch_windows or [list(self.window)]
                self._widen()
                self.epoch_windows.append(list(self.window))
        return self.window

    def _widen(self) -> None:
        lo, hi = self.hu_range
        self.window = (lo, min(self.window[1] + self.step, hi))
        self.epochs_in_window = 0
        self.steps_in_window = 0

    def end_epoch(self, epoch: int, accuracy: float, selected: tuple[float, float] | None = None) -> tuple[float, float]:
        """Record the epoch just trained (the window it started with, and all it trained when fixed growing
        widened within it) and return the next epoch's window."""
        entry = {"epoch": epoch, "phase": self.phase, "lo": self.window[0], "hi": self.window[1], "accuracy": accuracy}
        if self.epoch_windows:
            entry.update(lo=self.epoch_windows[0][0], hi=self.epoch_windows[0][1], windows=self.epoch_windows)
            self.epoch_windows = []
        self.history.append(entry)
        self.epochs_in_window += 1
        if self.phase == "consolidation":
            return self.window
        lo, hi = self.hu_range
        if self.phase == "fixed":
            covered = self.window[1] >= hi
            if covered and self.schedule == "dwt":
                self.phase = "dynamic"
            elif not covered and (accuracy > self.th_acc or (self.epochs_in_window >= self.th_eta and not self.steps_per_window)):
                self._widen()
        if self.phase == "dynamic" and self.history[-1]["phase"] == "dynamic":
            if selected is not None:
                self.window = (max(lo, selected[0]), min(hi, selected[1]))
                self.epochs_in_window = 0
        self._consolidate_if_due(epoch + 1)
        return self.window

    def state(self) -> dict:
        return asdict(self)


def fixed_growing_windows(hu_range=STANDARD_RANGE, start_upper: float = -769.0, step: float = 256.0) -> list[tuple[float, float]]:
    """The windows fixed growing passes through: [-1024, -769], [-1024, -513], ... up to the range."""
    lo, hi = hu_range
    windows, upper = [], start_upper
    while True:
        windows.append((lo, min(upper, hi)))
        if upper >= hi:
            return windows
        upper += step


def growing_steps_per_window(share: float, epochs: int, steps_per_epoch: int, th_eta: int, hu_range=STANDARD_RANGE,
                             start_upper: float = -769.0, step: float = 256.0) -> int:
    """The most steps one fixed-growing window trains when fixed growing may take at most ``share`` of the run
    (never more than th_eta epochs); 0 when ``share`` is 0 (paced by epochs only). The paper paced it in epochs of
    a 14,000-slice data set; over a short run, windows that stop below soft tissue teach the whole range almost
    nothing (measured on the real slice, README), so the share bounds what the curriculum costs."""
    if share <= 0:
        return 0
    windows = len(fixed_growing_windows(hu_range, start_upper, step))
    return max(1, min(int(share * epochs * steps_per_epoch) // windows, th_eta * steps_per_epoch))


def select_window(
    cams: list[np.ndarray], hu_images: list[np.ndarray], th_fail: float = 0.5, hu_range=STANDARD_RANGE, min_width: float = 256.0
) -> tuple[tuple[float, float] | None, dict]:
    """Dynamic selection: the HU values of pixels whose CAM exceeds ``th_fail``, per image; values seen only
    once dropped as noise; the lists merged; the window spans what remains (at least ``min_width`` HU, within
    the range). Returns (window or None when there are no hot spots, details)."""
    kept_all = []
    for cam, hu in zip(cams, hu_images):
        values = np.rint(np.asarray(hu)[np.asarray(cam) > th_fail]).astype(np.int64)
        if values.size == 0:
            continue
        uniq, counts = np.unique(values, return_counts=True)
        kept_all.append(uniq[counts > 1])
    merged = np.unique(np.concatenate(kept_all)) if kept_all else np.array([], dtype=np.int64)
    details = {"hot_values": int(merged.size)}
    window = span_window(merged, hu_range, min_width)
    if window is None:
        return None, details
    details.update(lo=window[0], hi=window[1])
    return window, details


def span_window(values: np.ndarray, hu_range=STANDARD_RANGE, min_width: float = 256.0) -> tuple[float, float] | None:
    """The window merged hot HU values span, within the range, at least ``min_width`` HU wide (a narrower one is
    widened around its centre: too narrow to train on); None without values."""
    if values.size == 0:
        return None
    lo, hi = max(float(values.min()), hu_range[0]), min(float(values.max()), hu_range[1])
    if hi - lo < min_width:
        centre = (lo + hi) / 2.0
        lo = max(hu_range[0], min(centre - min_width / 2.0, hu_range[1] - min_width))
        hi = lo + min_width
    return lo, hi

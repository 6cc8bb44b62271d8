"""Every training setting, defined once: name, type, default, range and help.

``TrainConfig`` is the list (one field each, its ``Setting`` in the field's metadata); from it come the command
line's options (``add_arguments``), the checks (``TrainConfig.check``), the model card's ``config`` and the
argument list a program passes to ``radiomicgan train`` (``to_arguments``, used by the Slicer modules, whose Train
panel shows the settings marked ``panel``). Adding a hyperparameter is one field here. Imports neither torch nor
the packages Slicer lacks (numpy it has): the Slicer panels read it before those are installed.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import methods
from .errors import TrainingError

from .window import SCHEDULES, STANDARD_RANGE, WINDOW_SCALINGS  # noqa: E402  (numpy only: Slicer has it)

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


@dataclass(frozen=True)
class Setting:
    """One setting. ``minimum``/``maximum`` bound numbers (``open_minimum``/``open_maximum``: excluded);
    ``choices`` or ``pattern`` bound text; ``optional``: None is allowed and means a default derived elsewhere
    (the method's learning rate, ...); ``panel``: its name on the Slicer Train panel's parameter node."""

    name: str
    kind: type  # int, float, str, bool, tuple (two floats: LO < HI)
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    choices: tuple | None = None
    pattern: str | None = None
    optional: bool = False
    cli: bool = True
    panel: str | None = None
    panel_maximum: float | None = None  # the panel's spin box ends here where the setting has no maximum
    flags: tuple[str, ...] = ()  # booleans: (flag setting True, flag setting False); default from the name
    off_help: str = ""  # booleans: the help of the flag setting False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value, or ValueError with a one-line reason (no option name: the caller adds it)."""
        if value is None and (self.optional or self.default is None):
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"'{value}' is not true or false")
            return value
        if self.kind is tuple:
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ValueError(f"'{value}': expected two numbers LO HI")
            lo, hi = (self._number(float, v) for v in value)
            if not lo < hi:
                raise ValueError(f"LO {lo:g} must be below HI {hi:g}")
            return (lo, hi)
        if self.kind is str:
            value = str(value)
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"'{value}': choose one of {', '.join(self.choices)}")
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise ValueError(f"'{value}': expected {self.help_choices()}")
            return value
        value = self._number(self.kind, value)
        lo, hi = self.minimum, self.maximum
        if (lo is not None and (value < lo or (self.open_minimum and value == lo))) or \
                (hi is not None and (value > hi or (self.open_maximum and value == hi))):
            raise ValueError(f"'{value:g}': {self.range_text()}")
        return value

    def parse(self, text: str) -> Any:
        """For argparse: the checked value of the text, or ArgumentTypeError."""
        try:
            return self.check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def range_text(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"must be in {'(' if self.open_minimum else '['}{lo:g}, {hi:g}{')' if self.open_maximum else ']'}"
        if lo is not None:
            return f"must be {'above' if self.open_minimum else 'at least'} {lo:g}"
        return f"must be {'below' if self.open_maximum else 'at most'} {hi:g}"

    def help_choices(self) -> str:
        return "auto, cpu, cuda or cuda:N" if self.pattern == DEVICE_PATTERN else self.pattern or ""

    def _number(self, kind, value):
        if isinstance(value, bool):
            raise ValueError(f"'{value}' is not a number")
        try:
            number = kind(value) if kind is float or not isinstance(value, float) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and value != int(value)):
            raise ValueError(f"'{value}' is not a {'whole number' if kind is int else 'number'}")
        if kind is float and not math.isfinite(number):
            raise ValueError(f"'{value}': must be a finite number")
        return number


def setting(kind: type, default: Any, help: str, **options) -> Any:
    """A ``TrainConfig`` field whose metadata is its ``Setting`` (the name is filled in from the field)."""
    return field(default=default, metadata={"setting": dict(kind=kind, default=default, help=help, **options)})


@dataclass
class TrainConfig:
    method: str = setting(str, "radiomicgan", "RadiomicGAN or a baseline trained on the same data", choices=methods.METHODS,
                          panel="method")
    schedule: str | None = setting(
        str, None, "windows: dwt (RadiomicGAN), fixed (RadiomicGAN-1), dynamic (RadiomicGAN-2), none; default dwt for "
        "radiomicgan, none otherwise", choices=SCHEDULES, optional=True, panel="schedule")
    epochs: int = setting(int, 30, "maximum epochs, the paper's 30", minimum=1, panel="epochs", panel_maximum=1000)
    steps_per_epoch: int = setting(int, 100, "optimisation steps per epoch", minimum=1, panel="stepsPerEpoch",
                              panel_maximum=100000)
    batch: int = setting(int, 4, "crops per step", minimum=1, panel="batch", panel_maximum=256)
    crop: int = setting(int, 128, "training crop size in pixels", minimum=8)
    lr: float | None = setting(float, None, "Adam learning rate (default: the method's, 4e-4 for radiomicgan, measured; 2e-4 for "
                               "pix2pix; 1e-4 for choe, as published)", minimum=0.0, open_minimum=True, optional=True,
                               panel="learningRate", panel_maximum=0.1)
    beta1: float = setting(float, 0.5, "Adam beta1, the paper's momentum", minimum=0.0, maximum=1.0, open_maximum=True)
    lr_decay: bool = setting(bool, True, "pix2pix's learning rate schedule: constant for the first half of the steps, then "
                             "linearly to zero (default)", flags=("--lr-decay", "--no-lr-decay"),
                             off_help="keep the learning rate constant")
    lambda_l1: float = setting(float, 100.0, "weight of L1 against the adversarial loss", minimum=0.0)
    adversarial_warmup: int = setting(int, 0, "first steps trained on L1 alone (the discriminator trains meanwhile)",
                                      minimum=0)
    contrast_jitter: float = setting(float, 0.0, "training crops' HU scaled about air by 1 +- this (0: off)", minimum=0.0,
                                     maximum=1.0, open_maximum=True)
    window_scaling: str = setting(str, "fixed", "scale each window to [-1, 1] over the window itself (window, the paper's), "
                                  "over --hu-range (fixed; default, chosen by measurement: see README), or over --hu-range "
                                  "with the L1 weighing the window's pixels (focus)", choices=WINDOW_SCALINGS)
    consolidate: float = setting(float, 0.25, "fraction of the epochs (at least one) that end training at the inference "
                                 "window", minimum=0.0, maximum=1.0, open_maximum=True)
    th_acc: float = setting(float, 0.5, "fixed growing: widen when generator accuracy exceeds this", minimum=0.0, maximum=1.0,
                            panel="thAcc")
    th_eta: int = setting(int, 2, "fixed growing: widen after this many epochs in a window", minimum=1, panel="thEta", panel_maximum=100)
    growing_share: float = setting(float, 0.25, "fixed growing: most of the run's steps it may take; a window widens after "
                                   "its part of them, within an epoch if need be (measured: see README; 0: paced by "
                                   "--th-eta epochs only)", minimum=0.0, maximum=1.0, panel="growingShare")
    growing_start: float = setting(float, -769.0, "fixed growing: the first window is [LO of --hu-range, this] HU "
                                   "(the paper's [-1024, -769])")
    window_step: float = setting(float, 256.0, "fixed growing step in HU", minimum=0.0, open_minimum=True)
    th_fail: float = setting(float, 0.5, "dynamic selection: CAM value that marks a hot spot", minimum=0.0, maximum=1.0,
                             panel="thFail")
    cam_subset: int = setting(int, 8, "dynamic selection: slices in the random subset P", minimum=1)
    hu_range: tuple[float, float] = setting(tuple, STANDARD_RANGE, "standardization range harmonized at inference")
    vgg_weights: str = setting(str, "imagenet", "encoder weights: imagenet (torchvision download/cache), a weights file, "
                               "or random")
    finetune_vgg: bool | None = setting(bool, None, "train the VGG layers (the default for random weights)", optional=True,
                                        flags=("--finetune-vgg", "--freeze-vgg"),
                                        off_help="keep the VGG layers frozen (the default for pretrained weights, as in the paper)")
    head_gain: float = setting(float, 1.0, "initial gain of the generator's residual head", cli=False)
    device: str = setting(str, "auto", "auto, cpu, cuda or cuda:N", pattern=DEVICE_PATTERN, panel="device")
    seed: int = setting(int, 0, "random seed")
    val_slices: int = setting(int, 8, "validation slices measured after each epoch", minimum=1)
    log_every: int = setting(int, 10, "steps between two step records in train_log.jsonl", minimum=1, cli=False)

    def check(self) -> "TrainConfig":
        """Each setting against its range, then what the method needs; fills in the method's defaults."""
        for s in SETTINGS:
            try:
                setattr(self, s.name, s.check(getattr(self, s.name)))
            except ValueError as exc:
                raise TrainingError(f"{s.flag}: {exc}") from None
        method = methods.get(self.method)
        if self.lr is None:
            self.lr = method.default_lr or 1e-4
        if self.schedule is None:
            self.schedule = method.default_schedule or "none"
        if not method.network and self.schedule != "none":
            raise TrainingError(f"--schedule {self.schedule}: method {self.method} is fitted in closed form and has no "
                                "training windows; leave --schedule out (or give none)")
        if method.network and not method.windows and self.schedule != "none":
            raise TrainingError(f"method '{self.method}' trains on the whole range: use --schedule none")
        if self.crop % method.crop_multiple:
            raise TrainingError(f"crop {self.crop} must be a multiple of {method.crop_multiple} (three poolings in the U-Net)")
        if self.crop < method.min_crop:
            raise TrainingError(f"crop {self.crop}: {self.method} needs at least {method.min_crop}x{method.min_crop} pixels "
                                f"(smaller, its bottleneck and discriminator shrink to 1x1); use --crop {method.min_crop} or more")
        if not self.hu_range[0] < self.growing_start <= self.hu_range[1]:
            raise TrainingError(f"--growing-start {self.growing_start:g} must lie inside --hu-range {self.hu_range[0]:g} {self.hu_range[1]:g}")
        return self

    def as_card(self) -> dict:
        """The settings as the model card records them (``config``)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


SETTINGS: tuple[Setting, ...] = tuple(Setting(name=f.name, **f.metadata["setting"]) for f in fields(TrainConfig))
BY_NAME = {s.name: s for s in SETTINGS}
PANEL_SETTINGS = tuple(s for s in SETTINGS if s.panel)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line's option for each setting, with its type check, default and help."""
    for s in SETTINGS:
        if not s.cli:
            continue
        if s.kind is bool:
            on, off = s.flags or (s.flag, "--no-" + s.flag[2:])
            group = parser.add_mutually_exclusive_group()
            group.add_argument(on, dest=s.name, action="store_true", default=s.default, help=s.help)
            group.add_argument(off, dest=s.name, action="store_false", help=s.off_help or argparse.SUPPRESS)
        elif s.kind is tuple:
            parser.add_argument(s.flag, type=finite_float, nargs=2,
                                action=_Pair, default=list(s.default), metavar=("LO", "HI"), help=_help(s))
        else:
            parser.add_argument(s.flag, type=s.parse, default=s.default, help=_help(s),
                                **({"metavar": "{" + ",".join(s.choices) + "}"} if s.choices else {}))


def _help(s: Setting) -> str:
    return s.help + ("" if s.default is None or "default" in s.help else f" (default {s.default if s.kind is not tuple else ' '.join(f'{v:g}' for v in s.default)})")


def finite_float(text: str) -> float:
    """argparse type: a finite number (inf and nan refused in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}': must be a finite number")
    return value


class _Pair(argparse.Action):
    """LO HI with LO < HI."""

    def __call__(self, parser, namespace, values, option_string=None):
        lo, hi = values
        if not lo < hi:
            parser.error(f"argument {option_string}: LO {lo:g} must be below HI {hi:g}")
        setattr(namespace, self.dest, [lo, hi])


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed command-line options."""
    values = {s.name: getattr(args, s.name) for s in SETTINGS if s.cli}
    values["hu_range"] = tuple(values["hu_range"])
    return TrainConfig(**values)


def to_arguments(values: dict) -> list[str]:
    """``radiomicgan train`` options for the given settings (name -> value); None leaves the core's default."""
    args: list[str] = []
    for name, value in values.items():
        if name not in BY_NAME:
            raise TypeError(f"unknown training setting '{name}'")
        s = BY_NAME[name]
        if value is None or (s.optional and s.kind is float and value == 0):  # 0: the panel's "the method's default"
            continue
        value = s.check(value)
        if not s.cli:
            raise TypeError(f"training setting '{name}' has no command-line option")
        if s.kind is bool:
            on, off = s.flags or (s.flag, "--no-" + s.flag[2:])
            args.append(on if value else off)
        elif s.kind is tuple:
            args += [s.flag, repr(float(value[0])), repr(float(value[1]))]
        else:
            args += [s.flag, repr(float(value)) if s.kind is float else str(value)]
    return args


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)

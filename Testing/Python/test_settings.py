"""One definition of every training setting (radiomicgan.settings) and of every method (radiomicgan.methods):
the command line, the checks, the model card and the Slicer side's arguments all come from them."""

from __future__ import annotations

import dataclasses
import re

import pytest

from helpers import REPO
from radiomicgan import methods
from radiomicgan.cli import build_parser
from radiomicgan.errors import TrainingError
from radiomicgan.settings import BY_NAME, SETTINGS, TrainConfig, from_arguments, to_arguments


def _other_value(s):
    """A valid value of the setting that is not its default."""
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.kind is bool:
        return not s.default if s.default is not None else False
    if s.kind is tuple:
        return (-1000.0, 900.0)
    if s.kind is str:
        return "cpu" if s.pattern else "random"
    if s.name == "growing_start":
        return -500.0
    lo = s.minimum if s.minimum is not None else 0
    value = (lo + (s.maximum if s.maximum is not None else lo + 10)) / 2 if s.kind is float else int(lo) + 3
    return value if value != s.default else value + (1 if s.kind is int else 0.125)


def test_every_setting_round_trips_through_the_command_line():
    values = {s.name: _other_value(s) for s in SETTINGS if s.cli}
    args = build_parser().parse_args(["train", "--pairs", "p", "--out", "o", *to_arguments(values)])
    config = from_arguments(args)
    assert {name: getattr(config, name) for name in values} == values
    defaults = from_arguments(build_parser().parse_args(["train", "--pairs", "p", "--out", "o"]))
    assert dataclasses.asdict(defaults) == dataclasses.asdict(TrainConfig())  # the options' defaults are the settings'


@pytest.mark.parametrize("name, bad", [("epochs", 0), ("th_fail", 1.5), ("consolidate", 1.0), ("beta1", 1.0), ("lr", 0.0),
                                       ("crop", 4), ("window_step", 0.0), ("lambda_l1", -1.0), ("hu_range", (5.0, 5.0)),
                                       ("device", "tpu"), ("method", "unet"), ("schedule", "weekly"), ("th_eta", 1.5)])
def test_out_of_range_values_are_refused_the_same_way_everywhere(name, bad, capsys):
    with pytest.raises(TrainingError, match=f"--{name.replace('_', '-')}"):
        TrainConfig(**{name: bad}).check()
    argv = ["train", "--pairs", "p", "--out", "o", BY_NAME[name].flag, *([str(v) for v in bad] if isinstance(bad, tuple) else [str(bad)])]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and BY_NAME[name].flag in capsys.readouterr().err


def test_methods_bring_their_own_defaults_and_needs():
    assert TrainConfig(method="choe").check().lr == methods.REGISTRY["choe"].default_lr == 1e-4
    assert TrainConfig().check().lr == 4e-4 and TrainConfig().check().schedule == "dwt"
    assert TrainConfig(method="pix2pix").check().schedule == "none"
    with pytest.raises(TrainingError, match="fitted in closed form"):
        TrainConfig(method="filter", schedule="dwt").check()
    with pytest.raises(TrainingError, match="trains on the whole range"):
        TrainConfig(method="choe", schedule="fixed").check()
    with pytest.raises(TrainingError, match="multiple of 8"):
        TrainConfig(method="pix2pix", crop=36).check()
    assert TrainConfig(method="choe", crop=36).check().crop == 36  # no U-Net, no poolings
    with pytest.raises(TrainingError, match="needs at least 32x32"):
        TrainConfig(crop=24).check()
    with pytest.raises(TrainingError, match="--growing-start 2000 must lie inside --hu-range"):
        TrainConfig(growing_start=2000.0).check()
    for name, method in methods.REGISTRY.items():
        assert method.network == (method.build is not None) and (not method.network) == (method.fit is not None)
        assert not method.discriminator or method.loss == "gan"


def test_fixed_growing_starts_where_the_setting_says():
    from radiomicgan.train import _window_schedule

    assert _window_schedule(TrainConfig().check()).window == (-1024.0, -769.0)  # the paper's first window
    assert _window_schedule(TrainConfig(growing_start=-500.0).check()).window == (-1024.0, -500.0)


def test_the_model_card_records_every_setting():
    config = TrainConfig(growing_start=-600.0).check()
    assert list(config.as_card()) == [s.name for s in SETTINGS] and config.as_card()["hu_range"] == [-1024.0, 1000.0]


def test_no_method_name_test_outside_the_registry():
    """Methods are told apart by what the registry says they need, never by comparing their names."""
    names = "|".join(methods.METHODS)
    pattern = re.compile(rf"""method\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\["']|==\s*["']({names})["']|\(\s*["']({names})["'],\s*["']""")
    files = [p for folder in ("radiomicgan", "RadiomicGANLib", "RadiomicGANTrain", "RadiomicGANHarmonize")
             for p in (REPO / folder).glob("*.py") if p.name != "methods.py"]
    assert len(files) > 20
    hits = [f"{p.name}:{n}: {line.strip()}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits

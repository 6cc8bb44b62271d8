"""Checks before ``train --resume`` continues a run folder: the folder holds what a resume needs (a readable
``checkpoint.pt`` and ``model.json``), the run is continued with the settings its weights were trained with, and
the checkpoint's tensors fit the networks. Each problem is one ``TrainingError`` naming the file and the cause; a
resume never goes on with weights trained for another window, scaling or kernel direction (it would rewrite the
card while the weights carry on from the old settings: a model whose card is wrong).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ModelError
from .modelio import CARD_NAME, CHECKPOINT_NAME, safe_load
from .errors import TrainingError

# settings the weights depend on: a resume must keep them (epochs, steps, learning rate... may change)
RESUME_KEYS = ("method", "schedule", "hu_range", "window_scaling")
CHECKPOINT_KEYS = ("generator", "opt_g", "epoch", "steps_done", "schedule")
GAN_KEYS = ("discriminator", "opt_d")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b)
    return a == b


def _show(value) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def previous_card(out: Path) -> dict:
    """The run folder's card, or a TrainingError saying what is wrong with the folder."""
    out = Path(out)
    checkpoint, card_path = out / CHECKPOINT_NAME, out / CARD_NAME
    if not out.is_dir():
        raise TrainingError(f"{out}: nothing to resume (no such folder)")
    if not checkpoint.is_file():
        raise TrainingError(f"{out}: nothing to resume (no {CHECKPOINT_NAME}); no epoch was completed: train without "
                            "--resume to start it anew")
    if not card_path.is_file():
        raise TrainingError(f"{out}: cannot resume: {CARD_NAME} is missing ({CHECKPOINT_NAME} alone does not say how "
                            "the run was trained); train anew in another folder")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{card_path}: cannot resume: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(card, dict):
        raise TrainingError(f"{card_path}: cannot resume: a JSON {type(card).__name__}, not a model card")
    return card


def check_resume(out: Path, config, kernels: tuple[str, str]) -> dict:
    """Refuse a resume whose folder is damaged or whose settings or kernel direction differ from the run's."""
    card = previous_card(out)
    current = {"method": config.method, "schedule": config.schedule, "hu_range": list(config.hu_range),
               "window_scaling": config.window_scaling}
    for key in RESUME_KEYS:
        if key == "window_scaling" and key not in card:
            continue  # a card older than the option: only the default existed
        if not _same(card.get(key), current[key]):
            raise TrainingError(f"{out}: was trained with {key} {_show(card.get(key))}, not {_show(current[key])}; "
                                "cannot resume (give the run's settings, or train anew in another folder)")
    before = (card.get("source_kernel"), card.get("target_kernel"))
    if before != tuple(kernels):
        raise TrainingError(f"{out}: was trained from {before[0]} to {before[1]}; these pairs go from {kernels[0]} to "
                            f"{kernels[1]}; cannot resume (one model learns one direction)")
    return card


def load_checkpoint(out: Path, gan: bool) -> dict:
    """``checkpoint.pt`` as a dict holding every key a resume reads."""
    path = Path(out) / CHECKPOINT_NAME
    try:
        state = safe_load(path)
    except ModelError as exc:
        raise TrainingError(f"cannot resume: {exc}") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: cannot resume: holds a {type(state).__name__}, not a training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS + (GAN_KEYS if gan else ()) if k not in state]
    if missing:
        raise TrainingError(f"{path}: cannot resume: not a complete training checkpoint (no {', '.join(missing)})")
    return state


def restore(path: Path, what: str, module, state) -> None:
    """``module.load_state_dict(state)``, a mismatch (tensors of another shape, other layers) named in one line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise TrainingError(f"{path}: cannot resume: its {what} does not fit this network ({first})") from None

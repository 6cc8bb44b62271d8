"""Model folders: a readable card, weights loadable as data only, and harmonization of HU slices with them.

A model folder holds ``model.json`` (the card, machine-readable), ``MODEL_CARD.md`` (the same for people),
``weights.pt`` (state dicts of plain tensors: loaded with ``torch.load(..., weights_only=True)``; a file that
needs code to unpickle is refused), and, for trained networks, ``checkpoint.pt`` (optimisers and schedule, to
resume), ``train_log.jsonl``, the window history and Grad-CAM samples. Harmonizing with a loaded model:
``radiomicgan.harmonize``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .jobs import staging_name
from .errors import RadiomicGANError
from .window import STANDARD_RANGE

MODEL_FORMAT = "radiomicgan-model/1"
CARD_NAME, CARD_MD, WEIGHTS_NAME, CHECKPOINT_NAME = "model.json", "MODEL_CARD.md", "weights.pt", "checkpoint.pt"
NETWORK_METHODS = ("radiomicgan", "pix2pix", "choe")
METHODS = (*NETWORK_METHODS, "filter", "histmatch")


class ModelError(RadiomicGANError):
    """A model folder that is missing, malformed, or does not match its architecture."""


def resolve_device(name: str) -> str:
    """'auto' -> CUDA when there is one, else the CPU; a CUDA request without CUDA is a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise RadiomicGANError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RadiomicGANError(f"device {name} requested but CUDA is not available here; use --device cpu")
    return name


def build_networks(card: dict):
    """(generator, discriminator or None) for a card's method and architecture, weights not loaded."""
    from .models import ChoeCNN, PatchDiscriminator, RadiomicGANGenerator, UNetGenerator

    method, arch = card["method"], card.get("architecture", {})
    if method == "radiomicgan":
        generator = RadiomicGANGenerator(vgg_weights=arch.get("vgg_weights", "random"), finetune_vgg=arch.get("finetune_vgg"),
                                         decoder_channels=tuple(arch.get("decoder_channels", (256, 128, 64, 32))),
                                         head_gain=arch.get("head_gain", 1.0))
    elif method == "pix2pix":
        generator = UNetGenerator(tuple(arch.get("channels", (32, 64, 128, 256))))
    elif method == "choe":
        generator = ChoeCNN(arch.get("channels", 64), arch.get("layers", 6))
    else:
        raise ModelError(f"method '{method}' has no network")
    discriminator = PatchDiscriminator(arch.get("discriminator_channels", 64)) if method != "choe" else None
    return generator, discriminator


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    tmp = staging_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = staging_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safe_load(path: Path) -> Any:
    """``torch.load`` as data only; a pickle that would run code is refused with a clear error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: the file holds Python objects or code, not plain weights ({str(exc).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"{path}: not a readable weights file ({type(exc).__name__}: {(str(exc).splitlines() or ['empty file'])[0][:120]})") from None


def write_card(folder: Path, card: dict) -> None:
    atomic_write_text(folder / CARD_NAME, json.dumps(card, indent=2) + "\n")
    atomic_write_text(folder / CARD_MD, render_card(card))


def render_card(card: dict) -> str:
    t, v, d = card.get("training", {}), card.get("validation", {}), card.get("data", {})
    lines = [
        f"# RadiomicGAN model card: {card['method']}",
        "",
        f"- Converts kernel **{card.get('source_kernel', '?')}** to **{card.get('target_kernel', '?')}**",
        f"- Method: {card['method']}; schedule: {card.get('schedule', '-')}",
        f"- HU range harmonized: {card.get('hu_range')}; outside it the input is carried over",
        f"- Final training window: {card.get('final_window', '-')}",
        *_growing_line(card),
        f"- Pretrained encoder: {card.get('architecture', {}).get('vgg_source', 'none')}",
        f"- Trained epochs: {t.get('epochs_done', '-')} of {t.get('epochs', '-')}, steps: {t.get('steps_done', '-')}, "
        f"device: {t.get('device', '-')}, precision: {t.get('precision', '-')}, processes: {t.get('world_size', 1)}",
        f"- Data: {d.get('pairs', '-')} training pair(s), {d.get('slices', '-')} slices, validation: {d.get('validation', '-')}",
        f"- Validation PSNR: input {v.get('input_psnr_db', float('nan')):.2f} dB -> model {v.get('psnr_db', float('nan')):.2f} dB",
        f"- Packages: {', '.join(f'{k} {val}' for k, val in card.get('versions', {}).items())}",
        "",
        "Weights are plain tensors (`weights.pt`, loaded with `torch.load(..., weights_only=True)`).",
    ]
    return "\n".join(lines) + "\n"


def _growing_line(card: dict) -> list[str]:
    """How fixed growing was paced (older cards, paced by epochs only, lack the share)."""
    c = card.get("config", {})
    if card.get("schedule") not in ("dwt", "fixed") or "th_eta" not in c:
        return []
    share = c.get("growing_share", 0.0)
    limit = f"at most {share:.0%} of the steps in all, {c['th_eta']} epoch(s) per window" if share else f"at most {c['th_eta']} epoch(s) per window"
    return [f"- Fixed growing: windows widened by {c.get('window_step', 256.0):.0f} HU, {limit}, earlier when generator accuracy > {c.get('th_acc')}"]


@dataclass
class LoadedModel:
    card: dict
    generator: Any = None
    discriminator: Any = None
    baseline: Any = None

    @property
    def method(self) -> str:
        return self.card["method"]

    @property
    def hu_range(self) -> tuple[float, float]:
        return tuple(self.card.get("hu_range", STANDARD_RANGE))

    @property
    def inference_window(self) -> tuple[float, float]:
        """HU the model harmonizes; outside it the input is carried over."""
        return tuple(self.card.get("inference_window", self.hu_range))

    @property
    def scale_range(self) -> tuple[float, float]:
        """HU that map to the network's [-1, 1] at inference (see ``radiomicgan.window``)."""
        from .window import scale_range

        return scale_range(self.inference_window, self.hu_range, self.card.get("window_scaling", "fixed"))


def load_model(folder: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a model folder for harmonization; every problem is a ``ModelError`` naming the folder."""
    folder = Path(folder)
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelError(f"{folder}: not a RadiomicGAN model folder (no {CARD_NAME})")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{card_path}: not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: not a {MODEL_FORMAT} card (a JSON {type(card).__name__}, not an object)")
    if card.get("format") != MODEL_FORMAT or card.get("method") not in METHODS:
        raise ModelError(f"{card_path}: not a {MODEL_FORMAT} card (format {card.get('format')!r}, method {card.get('method')!r})")
    for key in ("hu_range", "inference_window"):  # an inverted window would harmonize nothing, silently
        value = card.get(key, STANDARD_RANGE)
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and value[0] < value[1]):
            raise ModelError(f"{card_path}: {key} must be two numbers [LO, HI] with LO < HI, not {json.dumps(value)}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ModelError(f"{folder}: no {WEIGHTS_NAME}")
    state = safe_load(folder / WEIGHTS_NAME)
    if not isinstance(state, dict):
        raise ModelError(f"{folder / WEIGHTS_NAME}: holds no state dict")
    model = LoadedModel(card=card)
    if card["method"] == "filter":
        from .baselines import FilterHarmonizer

        model.baseline = _from_state(FilterHarmonizer, state, folder)
        return model
    if card["method"] == "histmatch":
        from .baselines import HistMatchHarmonizer

        model.baseline = _from_state(HistMatchHarmonizer, state, folder)
        return model
    card = {**card, "architecture": {**card.get("architecture", {}), "vgg_weights": "random"}}  # the file has them
    generator, discriminator = build_networks(card)
    _load_state(generator, state.get("generator"), folder, "generator")
    if discriminator is not None:
        _load_state(discriminator, state.get("discriminator"), folder, "discriminator")
        discriminator.to(device).eval()
    model.generator = generator.to(device).eval()
    model.discriminator = discriminator
    return model


def _from_state(cls, state, folder):
    try:
        return cls.from_state(state)
    except (KeyError, AttributeError) as exc:
        raise ModelError(f"{folder / WEIGHTS_NAME}: does not hold {cls.method} parameters (missing {exc})") from None


def _load_state(module, state, folder: Path, name: str) -> None:
    if not isinstance(state, dict):
        raise ModelError(f"{folder / WEIGHTS_NAME}: no {name} weights")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2] or [str(exc)[:160]]
        raise ModelError(
            f"{folder}: {name} weights do not match the {module.__class__.__name__} architecture in the card "
            f"({first[0][:200]})"
        ) from None

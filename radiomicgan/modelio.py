"""Model folders: a readable card, weights loadable as data only, and harmonization of HU slices with them.

A model folder holds ``model.json`` (the card, machine-readable), ``MODEL_CARD.md`` (the same for people),
``weights.pt`` (state dicts of plain tensors: loaded with ``torch.load(..., weights_only=True)``; a file that
needs code to unpickle is refused), and, for trained networks, ``checkpoint.pt`` (optimisers and schedule, to
resume), ``train_log.jsonl``, the window history and Grad-CAM samples. Harmonizing with a loaded model:
``radiomicgan.harmonize``.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .card import CARD_MD, CARD_NAME, FORMAT as MODEL_FORMAT, ModelCard
from .errors import ModelError, RadiomicGANError
from .methods import METHODS, NETWORK_METHODS, REGISTRY
from .staging import staged

WEIGHTS_NAME, CHECKPOINT_NAME = "weights.pt", "checkpoint.pt"
__all__ = ["CARD_MD", "CARD_NAME", "MODEL_FORMAT", "METHODS", "NETWORK_METHODS", "ModelCard", "ModelError", "WEIGHTS_NAME",
           "CHECKPOINT_NAME"]


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


def build_networks(method: str, arch: dict):
    """(generator, discriminator or None) for a method and a card's architecture, weights not loaded."""
    if method not in REGISTRY or REGISTRY[method].build is None:
        raise ModelError(f"method '{method}' has no network")
    return REGISTRY[method].build(arch)


def atomic_torch_save(obj: Any, path: Path, what: str = "model weights") -> None:
    import torch

    with staged(path, what=what) as tmp:
        torch.save(obj, tmp)


def safe_load(path: Path) -> Any:
    """``torch.load`` as data only; a pickle that would run code is refused with a clear error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: the file holds Python objects or code, not plain weights ({str(exc).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"{path}: not a readable weights file ({type(exc).__name__}: {(str(exc).splitlines() or ['empty file'])[0][:120]})") from None


@dataclass
class LoadedModel:
    card: ModelCard
    generator: Any = None
    discriminator: Any = None
    baseline: Any = None

    @property
    def method(self) -> str:
        return self.card.method

    @property
    def hu_range(self) -> tuple[float, float]:
        return tuple(self.card.hu_range)

    @property
    def inference_window(self) -> tuple[float, float]:
        """HU the model harmonizes; outside it the input is carried over."""
        return tuple(self.card.inference_window or self.hu_range)

    @property
    def scale_range(self) -> tuple[float, float]:
        """HU that map to the network's [-1, 1] at inference (see ``radiomicgan.window``)."""
        from .window import scale_range

        return scale_range(self.inference_window, self.hu_range, self.card.window_scaling or "fixed")


def load_model(folder: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a model folder for harmonization; every problem is a ``ModelError`` naming the folder."""
    folder = Path(folder)
    card = ModelCard.read(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise ModelError(f"{folder}: no {WEIGHTS_NAME}")
    state = safe_load(folder / WEIGHTS_NAME)
    if not isinstance(state, dict):
        raise ModelError(f"{folder / WEIGHTS_NAME}: holds no state dict")
    model = LoadedModel(card=card)
    method = REGISTRY[card.method]
    if not method.network:
        model.baseline = _from_state(method, state, folder)
        return model
    generator, discriminator = build_networks(card.method, {**card.architecture, "vgg_weights": "random"})  # the file has them
    _load_state(generator, state.get("generator"), folder, "generator")
    if discriminator is not None:
        _load_state(discriminator, state.get("discriminator"), folder, "discriminator")
        discriminator.to(device).eval()
    model.generator = generator.to(device).eval()
    model.discriminator = discriminator
    return model


def _from_state(method, state, folder):
    try:
        return method.load(state)
    except (KeyError, AttributeError) as exc:
        raise ModelError(f"{folder / WEIGHTS_NAME}: does not hold {method.name} parameters (missing {exc})") from None


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

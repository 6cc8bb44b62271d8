"""Paired training data: a manifest of (source-kernel, target-kernel) volumes of the same scans, and slice
sampling from it.

A manifest is JSON beside the volumes; paths in it are relative to its folder so a data set can be moved::

    {"format": "radiomicgan-pairs/1",
     "pairs": [{"id": "case000", "source": "case000_B30.nrrd", "target": "case000_B50.nrrd",
                "source_kernel": "B30", "target_kernel": "B50", "labels": "case000_labels.nrrd"}]}

Kernel names left out are read from the volumes' ConvolutionKernel tags (``name_kernels``), so a manifest that
only lists two DICOM series of one scan (e.g. Toshiba FC51 and FC13) trains a model whose card names them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CTInputError, DatasetError
from .io import read_volume
from .kernels import same_kernel
from .volume import CTVolume

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "radiomicgan-pairs/1"
AIR_HU = -1024.0


@dataclass
class Pair:
    id: str
    source: Path
    target: Path
    source_kernel: str = ""
    target_kernel: str = ""
    labels: Path | None = None


@dataclass
class Manifest:
    path: Path
    pairs: list[Pair]
    info: dict = field(default_factory=dict)

    @property
    def kernels(self) -> tuple[str, str]:
        """(source, target) kernel names; every pair must convert the same ones (compared by name, any vendor)."""
        source, target = self.pairs[0].source_kernel, self.pairs[0].target_kernel
        for q in self.pairs[1:]:
            for mine, first in ((q.source_kernel, source), (q.target_kernel, target)):
                if (mine or first) and not same_kernel(mine, first):
                    raise DatasetError(f"{self.path}: pair '{q.id}' converts {q.source_kernel or '?'} -> {q.target_kernel or '?'}, "
                                       f"pair '{self.pairs[0].id}' {source or '?'} -> {target or '?'}; one model learns one direction")
        return source, target


def manifest_entry(pair_id: str, source: str, target: str, source_kernel: str, target_kernel: str, labels: str | None = None) -> dict:
    entry = {"id": pair_id, "source": source, "target": target, "source_kernel": source_kernel, "target_kernel": target_kernel}
    if labels:
        entry["labels"] = labels
    return entry


def write_manifest(folder: Path, entries: list[dict], info: dict | None = None) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "info": info or {}, "pairs": entries}, indent=2) + "\n")
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest file, or the manifest.json of a folder; every listed file must exist."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise DatasetError(f"{p}: no manifest here (expected a {MANIFEST_NAME} or a folder holding one)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{p}: not a RadiomicGAN pairs manifest (format must be '{MANIFEST_FORMAT}')")
    entries = data.get("pairs")
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{p}: lists no pairs")
    pairs = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "source" not in entry or "target" not in entry:
            raise DatasetError(f"{p}: pair {k} needs 'source' and 'target'")
        for key in ("source", "target", "labels"):
            if key in entry and entry[key] is not None and not (isinstance(entry[key], str) and entry[key]):
                raise DatasetError(f"{p}: pair {k}: '{key}' must be a file name (a string), not {json.dumps(entry[key])}")
        pair = Pair(
            id=str(entry.get("id", f"pair{k:03d}")),
            source=(p.parent / entry["source"]),
            target=(p.parent / entry["target"]),
            source_kernel=str(entry.get("source_kernel", "")),
            target_kernel=str(entry.get("target_kernel", "")),
            labels=(p.parent / entry["labels"]) if entry.get("labels") else None,
        )
        for f in (pair.source, pair.target, pair.labels):
            if f is not None and not f.exists():
                raise DatasetError(f"{p}: pair '{pair.id}' names {f}, which does not exist")
        pairs.append(pair)
    kernels = {(q.source_kernel, q.target_kernel) for q in pairs}
    if len(kernels) > 1:
        raise DatasetError(f"{p}: pairs mix kernel directions {sorted(kernels)}; one model learns one direction")
    return Manifest(path=p, pairs=pairs, info=data.get("info", {}))


def name_kernels(pairs: list[Pair], volumes: list[tuple[CTVolume, CTVolume]]) -> None:
    """Kernel names from the scans themselves: a pair whose manifest entry leaves a kernel unnamed takes it from
    the volume's ConvolutionKernel tag (any vendor: B30f, FC51); a named kernel whose tag names another is kept,
    with a warning. Pairs whose tags name one kernel differently (B30f, B31f) take the first pair's name."""
    for pair, volumes_of_pair in zip(pairs, volumes):
        for side, volume in zip(("source", "target"), volumes_of_pair):
            named, tag = getattr(pair, f"{side}_kernel"), volume.meta.kernel.split("\\")[0].strip()
            if not named and tag:
                first = getattr(pairs[0], f"{side}_kernel")
                setattr(pair, f"{side}_kernel", first if first and same_kernel(first, tag) else tag)
            elif named and tag and not same_kernel(named, tag):
                warnings.warn(f"pair '{pair.id}': the manifest names the {side} kernel '{named}', the scan's tag says '{tag}'")


def check_pair(pair_id: str, source: CTVolume, target: CTVolume) -> None:
    """Training pairs must be the same scan voxel for voxel: same grid, same place in the patient."""
    if not source.same_geometry(target):
        raise DatasetError(
            f"pair '{pair_id}': source {source.source} and target {target.source} differ in geometry "
            f"(shape {source.shape} vs {target.shape}, spacing {source.spacing} vs {target.spacing}, "
            f"origin {source.origin} vs {target.origin})"
        )


def load_pair(pair: Pair) -> tuple[CTVolume, CTVolume]:
    try:
        source, target = read_volume(pair.source), read_volume(pair.target)
    except CTInputError as exc:
        raise DatasetError(f"pair '{pair.id}': {exc}") from None
    check_pair(pair.id, source, target)
    return source, target


class SliceSampler:
    """Random paired crops from random slices of a manifest's volumes, with the same flips and quarter
    turns applied to both images of a pair (kernels are rotation invariant, anatomy is not learnt).

    ``contrast`` > 0 also scales both crops' HU about air by one factor drawn from [1 - contrast, 1 + contrast]:
    a reconstruction kernel is linear, so the scaled pair is still a pair of the two kernels (another patient's
    contrast and noise level, same kernels). Zoom is left out: it would change the kernels' response per pixel."""

    def __init__(self, manifest: Manifest, crop: int | None = 128, augment: bool = True, seed: int = 0, contrast: float = 0.0):
        self.manifest = manifest
        self.crop = crop
        self.augment = augment
        self.contrast = contrast
        self.rng = np.random.default_rng(seed)
        self.volumes = [load_pair(p) for p in manifest.pairs]
        name_kernels(manifest.pairs, self.volumes)
        self.slice_index = [(v, k) for v, (s, _) in enumerate(self.volumes) for k in range(s.shape[0])]

    def __len__(self) -> int:
        return len(self.slice_index)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch, crop, crop) source and target HU arrays."""
        sources, targets = [], []
        for _ in range(batch):
            v, k = self.slice_index[self.rng.integers(len(self.slice_index))]
            s, t = self.volumes[v][0].hu[k], self.volumes[v][1].hu[k]
            s, t = self._crop(s, t)
            if self.augment:
                turns = int(self.rng.integers(4))
                s, t = np.rot90(s, turns), np.rot90(t, turns)
                if self.rng.random() < 0.5:
                    s, t = s[:, ::-1], t[:, ::-1]
            if self.contrast > 0:
                gain = 1.0 + self.rng.uniform(-self.contrast, self.contrast)
                s, t = AIR_HU + gain * (s - AIR_HU), AIR_HU + gain * (t - AIR_HU)
            sources.append(np.ascontiguousarray(s))
            targets.append(np.ascontiguousarray(t))
        return np.stack(sources), np.stack(targets)

    def _crop(self, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.crop is None:
            return s, t
        c = self.crop
        pad = [(0, max(0, c - n)) for n in s.shape]
        if any(p[1] for p in pad):  # smaller than the crop: surround with air
            s = np.pad(s, pad, constant_values=AIR_HU)
            t = np.pad(t, pad, constant_values=AIR_HU)
        y = int(self.rng.integers(s.shape[0] - c + 1))
        x = int(self.rng.integers(s.shape[1] - c + 1))
        return s[y : y + c, x : x + c], t[y : y + c, x : x + c]

    def slices(self) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
        """Every whole slice in order, for validation: (pair id, slice index, source, target)."""
        for pair, (s, t) in zip(self.manifest.pairs, self.volumes):
            for k in range(s.shape[0]):
                yield pair.id, k, s.hu[k], t.hu[k]

"""The procedural chest phantom: plausible HU per tissue, every structure present, seeded, any size."""

from __future__ import annotations

import numpy as np
import pytest

from radiomicgan.phantom import LABELS, make_chest_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(192, 24, seed=5, slice_thickness=2.0)


@pytest.mark.parametrize(
    "tissue, low, high",
    [("lung", -900, -780), ("fat", -120, -70), ("soft_tissue", 15, 70), ("heart", 25, 60), ("vessel", 30, 50)],
)
def test_tissue_hu_plausible(phantom, tissue, low, high):
    values = phantom.hu[phantom.labels == LABELS[tissue]]
    assert values.size > 50
    assert low <= np.median(values) <= high


def test_bone_air_and_airway(phantom):
    bone = phantom.hu[phantom.labels == LABELS["bone"]]
    assert np.percentile(bone, 95) > 700 and np.percentile(bone, 5) > 100  # cortex and marrow, nothing soft
    assert np.all(phantom.hu[phantom.labels == LABELS["air"]] == -1000)
    assert np.all(phantom.hu[phantom.labels == LABELS["airway"]] == -1000)
    assert phantom.hu.min() >= -1000 and phantom.hu.max() <= 1200


def test_anatomy_layout(phantom):
    labels = phantom.labels
    lung = labels == LABELS["lung"]
    half = labels.shape[2] // 2
    left, right = lung[:, :, half:].sum(), lung[:, :, :half].sum()
    assert left > 0 and right > 0 and 0.6 < left / right < 1.4  # two lungs, roughly symmetric
    body = (labels > 0) & (labels != LABELS["table"])
    assert not body[:, 0, :].any() and not body[:, :, 0].any()  # body inside the field of view
    table = labels == LABELS["table"]
    assert table[:, :, 0].any() and table[:, :, -1].any() and not table[:, : labels.shape[1] // 2].any()  # under the back, cut by the FOV
    assert (labels == LABELS["nodule"]).any() and phantom.nodules
    for nodule in phantom.nodules:
        x, y, z = nodule["centre_index"]
        assert labels[z, y, x] in (LABELS["nodule"], LABELS["vessel"], LABELS["bone"], LABELS["heart"])
        assert 1.0 < nodule["radius_mm"] < 15.0
    vessel_slices = [(labels[k] == LABELS["vessel"]).sum() for k in range(labels.shape[0])]
    assert min(vessel_slices) > 0  # branching vessels run through every slice


def test_seeded_and_reproducible():
    a = make_chest_phantom(64, 3, seed=1)
    b = make_chest_phantom(64, 3, seed=1)
    c = make_chest_phantom(64, 3, seed=2)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.hu, c.hu)


@pytest.mark.parametrize("size, slices", [(16, 1), (100, 3), (65, 2)])
def test_any_size(size, slices):
    phantom = make_chest_phantom(size, slices, seed=0)
    assert phantom.hu.shape == phantom.labels.shape == (slices, size, size)
    assert phantom.hu.dtype == np.float32 and phantom.labels.dtype == np.uint8
    assert (phantom.labels == LABELS["lung"]).any()


def test_rejects_degenerate_size():
    with pytest.raises(ValueError):
        make_chest_phantom(8, 1)

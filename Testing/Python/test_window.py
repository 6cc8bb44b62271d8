"""Dynamic Window-based Training: the fixed-growing sequence and its triggers, dynamic selection on made-up
CAMs, and the mapping of windows to inference."""

from __future__ import annotations

import numpy as np
import pytest

from radiomicgan.window import (
    STANDARD_RANGE,
    WindowSchedule,
    apply_window,
    carry_weight,
    fixed_growing_windows,
    from_unit,
    growing_steps_per_window,
    scale_range,
    select_window,
    to_unit,
)


def test_fixed_growing_sequence():
    windows = fixed_growing_windows()
    assert windows[0] == (-1024, -769) and windows[1] == (-1024, -513)
    assert [hi for _, hi in windows] == [-769, -513, -257, -1, 255, 511, 767, 1000]
    assert all(lo == -1024 for lo, _ in windows)


def test_fixed_growing_widens_after_th_eta_epochs():
    schedule = WindowSchedule("fixed", th_acc=0.9, th_eta=2)
    seen = [schedule.window]
    for epoch in range(20):
        seen.append(schedule.end_epoch(epoch, accuracy=0.1))
    # two epochs per window, then the whole range stays
    assert seen[:5] == [(-1024, -769), (-1024, -769), (-1024, -513), (-1024, -513), (-1024, -257)]
    assert seen[-1] == (-1024, 1000) and schedule.phase == "fixed"
    assert len(schedule.history) == 20


def test_fixed_growing_widens_early_when_accuracy_exceeds_threshold():
    schedule = WindowSchedule("fixed", th_acc=0.5, th_eta=10)
    assert schedule.end_epoch(0, accuracy=0.4) == (-1024, -769)  # neither trigger
    assert schedule.end_epoch(1, accuracy=0.6) == (-1024, -513)  # accuracy trigger
    assert schedule.end_epoch(2, accuracy=0.5) == (-1024, -513)  # not above the threshold


def test_dwt_switches_to_dynamic_selection_once_the_range_is_covered():
    schedule = WindowSchedule("dwt", th_acc=0.5, th_eta=1)
    for epoch in range(8):
        assert not schedule.needs_cam
        schedule.end_epoch(epoch, accuracy=0.0)
    assert schedule.window == (-1024, 1000) and schedule.phase == "dynamic"
    assert schedule.needs_cam
    assert schedule.end_epoch(8, 0.0, selected=(-900.0, 200.0)) == (-900.0, 200.0)
    assert schedule.end_epoch(9, 0.0, selected=(-2000.0, 5000.0)) == (-1024.0, 1000.0)  # clamped to the range
    assert schedule.end_epoch(10, 0.0, selected=None) == (-1024.0, 1000.0)  # no hot spot: keep the window
    assert [h["phase"] for h in schedule.history] == ["fixed"] * 8 + ["dynamic"] * 3


def test_dynamic_and_none_schedules_start_on_the_whole_range():
    assert WindowSchedule("dynamic").window == STANDARD_RANGE and WindowSchedule("dynamic").needs_cam
    none = WindowSchedule("none")
    assert none.window == STANDARD_RANGE and not none.needs_cam
    assert none.end_epoch(0, 1.0, selected=(-500.0, 0.0)) == STANDARD_RANGE
    with pytest.raises(ValueError, match="unknown schedule"):
        WindowSchedule("cosine")


def test_schedule_state_round_trips():
    schedule = WindowSchedule("dwt", th_eta=1)
    schedule.end_epoch(0, 0.2)
    state = schedule.state()
    again = WindowSchedule(**{**state, "hu_range": tuple(state["hu_range"]), "window": tuple(state["window"])})
    assert again.window == schedule.window and again.history == schedule.history and again.phase == "fixed"


def test_dynamic_selection_threshold_singletons_and_merge():
    hu_a = np.array([[-800, -800, -700], [-650, 100, 100]], dtype=float)
    cam_a = np.array([[0.9, 0.8, 0.9], [0.2, 0.95, 0.7]])
    # hot (> 0.5): -800 twice, -700 once (singleton: dropped), 100 twice; -650 is cold
    hu_b = np.array([[300, 300, -950, -950]], dtype=float)
    cam_b = np.array([[0.6, 0.7, 0.4, 0.3]])  # 300 twice hot; -950 cold
    window, details = select_window([cam_a, cam_b], [hu_a, hu_b], th_fail=0.5)
    assert window == (-800.0, 300.0)
    assert details["hot_values"] == 3  # -800, 100, 300 after merging


def test_dynamic_selection_singletons_are_per_image():
    """A value seen once in each of two images is noise in both: it does not survive the merge."""
    cam = np.array([[0.9, 0.9, 0.9]])
    window, _ = select_window([cam, cam], [np.array([[-500.0, -500.0, 800.0]]), np.array([[-400.0, -400.0, 900.0]])])
    assert window == (-578.0, -322.0)  # -500 and -400 kept, 800/900 singletons dropped; 256 HU around them


def test_dynamic_selection_without_hot_spots():
    window, details = select_window([np.zeros((4, 4))], [np.zeros((4, 4))], th_fail=0.5)
    assert window is None and details["hot_values"] == 0


def test_window_scaling_is_the_same_in_every_window():
    hu = np.array([-1024.0, -769.0, -500.0, 0.0, 1000.0, 2000.0])
    narrow = apply_window(hu, (-1024.0, -769.0))
    full = apply_window(hu, STANDARD_RANGE)
    assert narrow[1] == pytest.approx(full[1])  # -769 HU means the same to the network in both windows
    assert np.all(narrow[2:] == narrow[1])  # clipped to the window
    assert full[-1] == pytest.approx(1.0) and full[0] == pytest.approx(-1.0)
    np.testing.assert_allclose(from_unit(to_unit(hu)), hu, atol=1e-9)


def test_carry_weight_blends_without_seams():
    hu = np.linspace(-3024, 3000, 6025)
    w = carry_weight(hu)
    assert w[np.searchsorted(hu, 0)] == 1.0 and w[np.searchsorted(hu, 1500)] == 0.0
    assert w[np.searchsorted(hu, -2000)] == 0.0  # padding outside the field of view is carried over
    ramp = (hu > 950) & (hu < 1000)
    assert np.all(np.diff(w[ramp]) <= 0) and np.max(np.abs(np.diff(w[ramp]))) < 0.05  # linear, no jump


def test_window_scaling_stretches_the_window_and_round_trips():
    """The paper's variant: min-max over the window itself, so a lung window spans the whole network range."""
    hu = np.array([-1100.0, -1024.0, -900.0, -769.0, -500.0])
    lung = (-1024.0, -769.0)
    stretched = apply_window(hu, lung, STANDARD_RANGE, "window")
    np.testing.assert_allclose(stretched, [-1.0, -1.0, to_unit(-900.0, lung), 1.0, 1.0])
    fixed = apply_window(hu, lung, STANDARD_RANGE, "fixed")
    assert np.ptp(stretched) / np.ptp(fixed) == pytest.approx((1000 + 1024) / 255)  # ~8x the contrast
    for scaling in ("window", "fixed"):  # back to HU through the same scale: the clipped input
        back = from_unit(apply_window(hu, lung, STANDARD_RANGE, scaling), scale_range(lung, STANDARD_RANGE, scaling))
        np.testing.assert_allclose(back, np.clip(hu, *lung), atol=1e-9)
    assert scale_range(lung, STANDARD_RANGE, "fixed") == STANDARD_RANGE
    with pytest.raises(ValueError, match="window scaling"):
        scale_range(lung, STANDARD_RANGE, "per-slice")


def test_focus_windows_weigh_the_loss_and_clip_nothing():
    """``focus``: the network sees what it sees at inference; the window only picks the pixels the L1 weighs."""
    from radiomicgan.window import window_weight

    hu = np.array([-1100.0, -1024.0, -900.0, -769.0, -500.0, 0.0, 1500.0])
    lung = (-1024.0, -769.0)
    np.testing.assert_allclose(apply_window(hu, lung, STANDARD_RANGE, "focus"), apply_window(hu, STANDARD_RANGE))
    assert scale_range(lung, STANDARD_RANGE, "focus") == STANDARD_RANGE
    np.testing.assert_array_equal(window_weight(hu, lung, STANDARD_RANGE, "focus"), [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(window_weight(hu, (-500.0, 0.0), STANDARD_RANGE, "focus"), [0, 0, 0, 0, 1, 1, 0])
    assert window_weight(hu, STANDARD_RANGE, STANDARD_RANGE, "focus").all()  # the whole range weighs every pixel
    assert window_weight(hu, lung, STANDARD_RANGE, "fixed") is None


@pytest.mark.parametrize("name", ["dwt", "fixed", "dynamic"])
def test_consolidation_ends_every_schedule_at_the_inference_window(name):
    schedule = WindowSchedule(name, th_eta=1, epochs=10, consolidate=3)
    windows = []
    for epoch in range(10):
        windows.append((schedule.phase, schedule.window))
        schedule.end_epoch(epoch, accuracy=0.0, selected=(-900.0, -600.0))
    assert [p for p, _ in windows[-3:]] == ["consolidation"] * 3
    assert all(w == STANDARD_RANGE for _, w in windows[-3:]) and schedule.inference_window == STANDARD_RANGE
    assert all(p != "consolidation" for p, _ in windows[:7])
    if name != "fixed":  # the curriculum before consolidation used narrower windows
        assert any(w != STANDARD_RANGE for _, w in windows[:7])
    none = WindowSchedule("none", epochs=10, consolidate=3)
    assert none.phase == "full" and none.window == STANDARD_RANGE


def test_consolidation_survives_a_resume():
    schedule = WindowSchedule("dwt", th_eta=1, epochs=4, consolidate=1)
    for epoch in range(3):
        schedule.end_epoch(epoch, 0.0)
    restored = WindowSchedule(**{**schedule.state(), "hu_range": tuple(schedule.hu_range), "window": tuple(schedule.window)})
    assert restored.phase == "consolidation" and restored.window == STANDARD_RANGE


def _run(schedule: WindowSchedule, epochs: int, steps_per_epoch: int) -> list[tuple[str, float]]:
    """(phase, upper bound) of every training step, as the training loop drives the schedule."""
    trained = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            trained.append((schedule.phase, schedule.window[1]))
            schedule.end_step()
        schedule.end_epoch(epoch, accuracy=0.0, selected=(-1024.0, 200.0) if schedule.needs_cam else None)
    return trained


def test_fixed_growing_takes_its_share_of_a_short_run():
    """The real-slice budget (12 epochs of 25 steps, th_eta 1, a quarter consolidating): paced by epochs, fixed
    growing took 8 of the 9 curriculum epochs and dynamic selection never ran; with a growing share of a quarter it
    covers the range within the first 75 steps and dynamic selection gets the epochs up to consolidation."""
    assert growing_steps_per_window(0.25, 12, 25, th_eta=1) == 9  # 75 steps over 8 windows
    by_epochs = _run(WindowSchedule("dwt", th_eta=1, epochs=12, consolidate=3), 12, 25)
    assert sum(p == "fixed" for p, _ in by_epochs) == 200 and not any(p == "dynamic" and hi < 1000 for p, hi in by_epochs)
    by_share = _run(WindowSchedule("dwt", th_eta=1, epochs=12, consolidate=3, steps_per_window=9), 12, 25)
    fixed = [hi for p, hi in by_share if p == "fixed"]
    assert fixed[:9] == [-769.0] * 9 and fixed[9] == -513.0  # each window trains 9 steps ...
    assert fixed.index(1000.0) == 63 and len(fixed) == 75  # ... the range is covered after 63, the phase ends with epoch 3
    assert sorted(set(hi for hi in fixed)) == [hi for _, hi in fixed_growing_windows()]  # every window, in order
    phases = [p for p, _ in by_share[::25]]
    assert phases == ["fixed"] * 3 + ["dynamic"] * 6 + ["consolidation"] * 3
    assert sum(p == "dynamic" and hi == 200.0 for p, hi in by_share) == 5 * 25  # selected windows trained


def test_growing_share_never_exceeds_th_eta_and_zero_keeps_epoch_pacing():
    assert growing_steps_per_window(0.25, 30, 1000, th_eta=2) == 937  # a long run: the share binds
    assert growing_steps_per_window(1.0, 30, 10, th_eta=2) == 20  # th_eta epochs stay the limit
    assert growing_steps_per_window(0.25, 2, 3, th_eta=1) == 1  # at least one step per window
    assert growing_steps_per_window(0.0, 12, 25, th_eta=1) == 0
    schedule = WindowSchedule("fixed", th_eta=2)  # steps_per_window 0: end_step leaves the window alone
    for _ in range(1000):
        schedule.end_step()
    assert schedule.window == (-1024, -769)


def test_windows_widened_within_an_epoch_are_in_the_history_and_survive_a_resume():
    schedule = WindowSchedule("dwt", th_eta=1, epochs=12, consolidate=3, steps_per_window=9)
    for _ in range(20):
        schedule.end_step()
    state = schedule.state()
    restored = WindowSchedule(**{**state, "hu_range": tuple(state["hu_range"]), "window": tuple(state["window"])})
    for s in (schedule, restored):
        for _ in range(5):
            s.end_step()
        s.end_epoch(0, accuracy=0.0)
        assert s.history[0]["windows"] == [[-1024, -769], [-1024, -513], [-1024, -257]]
        assert (s.history[0]["lo"], s.history[0]["hi"]) == (-1024, -769) and s.window == (-1024, -257)
        s.end_epoch(1, accuracy=0.0)  # no widening within this epoch (it trained no steps): one window
        assert "windows" not in s.history[1] and s.history[1]["hi"] == -257

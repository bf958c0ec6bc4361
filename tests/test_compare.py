"""apla_rt.backends.compare: the one definition of the error metrics (relative RMS above all)
and the seeded inputs every numerics check uses; computed here by hand on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from apla_rt.backends.compare import (compare_outputs, error_stats, opt_inputs, rel_rms, run_check,
                                      seeded_feeds, seeded_inputs, within, worst)
from apla_rt.folder.manifest import Manifest


def test_rel_rms_is_relative_at_unit_size_and_above_absolute_below():
    ref = np.array([3.0, -4.0], np.float32)  # RMS sqrt(12.5)
    got = ref + np.array([0.3, 0.4], np.float32)  # error RMS sqrt(0.125)
    assert rel_rms(ref, got) == pytest.approx(0.1, rel=1e-6)
    small = np.array([1e-3, -1e-3], np.float32)  # RMS 1e-3: the error counts on the unit scale
    assert rel_rms(small, small + 2e-4) == pytest.approx(2e-4, rel=1e-4)
    assert rel_rms(np.zeros(3), np.full(3, 0.5)) == pytest.approx(0.5)  # an all-zero reference
    unit = np.ones(4)  # RMS exactly 1: both readings agree
    assert rel_rms(unit, unit * 1.02) == pytest.approx(0.02)


def test_error_stats_by_hand_and_failures():
    ref = np.array([[1.0, -2.0], [0.5, 0.0]], np.float32)
    got = ref + np.array([[0.1, -0.3], [0.0, 0.2]], np.float32)
    s = error_stats(ref, got)
    assert s["max_abs"] == pytest.approx(0.3, rel=1e-6)
    assert s["mean_abs"] == pytest.approx(0.15, rel=1e-6)
    assert s["rel_rms"] == pytest.approx(np.sqrt((0.01 + 0.09 + 0.04) / 4) / np.sqrt(5.25 / 4), rel=1e-6)
    assert s["ref_abs_max"] == 2.0 and s["finite"] is True
    assert within(s, {"max_abs": 0.31, "rel_rms": 0.2}) and not within(s, {"max_abs": 0.29})
    nan = error_stats(ref, got * np.nan)
    assert nan["finite"] is False and nan["max_abs"] == nan["rel_rms"] == float("inf")
    assert not within(nan, {})
    other_shape = error_stats(ref, got[:1])  # would broadcast; must fail instead
    assert other_shape["finite"] is True and other_shape["max_abs"] == float("inf")


def test_compare_outputs_and_run_check_take_the_worst():
    ref = {"a": np.ones(4, np.float32), "b": np.full(4, 2.0, np.float32)}
    got = {"a": ref["a"] + 0.05, "b": ref["b"] - 0.01}
    assert compare_outputs(ref, got) == pytest.approx({"max_abs": 0.05, "rel_rms": 0.05}, rel=1e-5)
    assert worst([{"x": 1.0}, {"x": 3.0}], ("x",)) == {"x": 3.0}
    calls = iter([got, {k: v + 0.1 for k, v in ref.items()}])
    verdict = run_check(lambda feeds: ref, lambda feeds: next(calls), [{}, {}],
                        {"max_abs": 0.2, "rel_rms": 0.06})
    assert verdict["passed"] is False  # the second feed set's rel_rms (0.1) is over 0.06
    assert verdict["worst"] == pytest.approx({"max_abs": 0.1, "rel_rms": 0.1}, rel=1e-3)
    assert verdict["checks"] == 2 and verdict["tolerance"] == {"max_abs": 0.2, "rel_rms": 0.06}


def test_seeded_inputs_draw_token_rows_and_per_element_timesteps():
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) * 10
    meta = {"input_ids": (np.dtype("int64"), (5, 3)), "timestep": (np.dtype("int64"), (512,)),
            "sample": (np.dtype("float32"), (2, 3))}
    feeds = seeded_inputs(meta, 7, token_ids=ids, timesteps=50)
    assert all(any((row == ids[r, :3]).all() for r in range(3)) for row in feeds["input_ids"])
    t = feeds["timestep"]
    assert t.dtype == np.int64 and 0 <= t.min() and t.max() < 50 and len(np.unique(t)) > 40
    again = seeded_inputs(meta, 7, token_ids=ids, timesteps=50)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_seeded_feeds_are_at_the_profile_opt_shape(fake_engine):
    spec = Manifest.open(fake_engine).network("unet")
    meta = opt_inputs(spec)
    sizes = {d: r[1] for d, r in spec.profile.items()}
    assert meta == {t.name: (t.dtype, t.shape(sizes)) for t in spec.inputs}
    feeds = seeded_feeds(spec, 0, timesteps=1000)
    spec.check_feeds(feeds)  # the network takes them as they are
    assert np.array_equal(feeds["sample"], seeded_inputs(meta, 0)["sample"])

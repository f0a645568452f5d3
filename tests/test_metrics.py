"""cordseg.metrics on hand-made arrays whose answers are known by construction."""
import math

import numpy as np
import pytest

from cordseg import metrics as m


def vol(shape=(10, 10, 10)):
    return np.zeros(shape, dtype=np.uint8)


# --------------------------------------------------------------------------- voxel metrics


def test_dice_known_values_and_empty_conventions():
    a, b = vol(), vol()
    assert m.dice(a, b) == 1.0  # both empty: defined as perfect agreement
    a[0, 0, :4] = 1  # 4 voxels
    assert m.dice(a, b) == 0.0
    b[0, 0, 1:7] = 1  # 6 voxels, 3 shared
    assert m.dice(a, b) == pytest.approx(2 * 3 / 10)
    assert m.dice(a, a) == 1.0


def test_rvd_sensitivity_precision():
    p, r = vol(), vol()
    assert math.isnan(m.relative_volume_difference(p, r))
    assert math.isnan(m.voxel_sensitivity(p, r))
    assert math.isnan(m.voxel_precision(p, r))
    r[2, 2, :8] = 1  # 8 voxels
    p[2, 2, 4:10] = 1  # 6 voxels, 4 shared
    assert m.relative_volume_difference(p, r) == pytest.approx((6 - 8) / 8)
    assert m.voxel_sensitivity(p, r) == pytest.approx(4 / 8)
    assert m.voxel_precision(p, r) == pytest.approx(4 / 6)
    assert m.relative_volume_difference(vol(), r) == -1.0
    assert math.isnan(m.voxel_precision(vol(), r))  # nothing predicted


def test_probability_maps_threshold_at_half_and_shape_mismatch():
    p = np.zeros((4, 4, 4), np.float32)
    p[0, 0, 0], p[0, 0, 1] = 0.5, 0.51
    assert m.binary(p).sum() == 1
    with pytest.raises(ValueError, match="shape"):
        m.dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_volume_mm3_anisotropic():
    a = vol()
    a[1:3, 1:4, 1:5] = 1  # 24 voxels
    assert m.volume_mm3(a, (0.5, 0.5, 3.0)) == pytest.approx(24 * 0.75)


# --------------------------------------------------------------------------- lesions


def test_components_use_26_connectivity():
    a = vol()
    a[1, 1, 1] = a[2, 2, 2] = 1  # corner-touching: one lesion
    a[5, 5, 5] = 1  # isolated
    a[7, 5, 5] = 1  # one-voxel gap from the previous: separate
    labels, n = m.label_lesions(a)
    assert n == 3
    assert labels[1, 1, 1] == labels[2, 2, 2]


def test_no_lesion_in_either():
    d = m.lesion_detection(vol(), vol())
    assert (d.n_pred, d.n_ref, d.tp_pred, d.fp, d.tp_ref, d.fn) == (0, 0, 0, 0, 0, 0)
    assert math.isnan(d.sensitivity) and math.isnan(d.precision)


def test_one_voxel_lesions():
    r = vol()
    r[2, 2, 2] = 1
    r[7, 7, 7] = 1
    p = vol()
    p[2, 2, 2] = 1  # hits the first
    p[4, 8, 1] = 1  # false positive
    d = m.lesion_detection(p, r)
    assert (d.n_pred, d.n_ref, d.tp_pred, d.fp, d.tp_ref, d.fn) == (2, 2, 1, 1, 1, 1)
    assert d.sensitivity == 0.5 and d.precision == 0.5
    assert m.lesion_sensitivity(p, r) == 0.5 and m.lesion_precision(p, r) == 0.5
    # Nothing predicted: sensitivity 0, precision undefined.
    assert m.lesion_sensitivity(vol(), r) == 0.0
    assert math.isnan(m.lesion_precision(vol(), r))
    # Lesions predicted on a lesion-free scan: sensitivity undefined, precision 0.
    assert math.isnan(m.lesion_sensitivity(p, vol()))
    assert m.lesion_precision(p, vol()) == 0.0


def test_touching_lesions_are_one_lesion():
    r = vol()
    r[2:4, 2:4, 2:4] = 1  # 8 voxels
    r[4:6, 4:6, 4:6] = 1  # 8 voxels touching the first at a corner -> one 16-voxel lesion
    p = vol()
    p[2:4, 2:4, 2:4] = 1  # covers 8/16 = 50% of the merged lesion
    d = m.lesion_detection(p, r)
    assert (d.n_ref, d.n_pred, d.tp_ref, d.tp_pred) == (1, 1, 1, 1)
    # Two predicted pieces touching face to face are also one predicted lesion.
    p2 = vol()
    p2[2, 2, 2:4] = 1
    p2[2, 3, 2:4] = 1
    assert m.label_lesions(p2)[1] == 1


def test_exactly_25_percent_is_not_a_match():
    r = vol()
    r[5, 5, 0:8] = 1  # 8 voxels
    p = vol()
    p[5, 5, 0:2] = 1  # 2/8 = 25% exactly -> false positive, manual lesion missed
    d = m.lesion_detection(p, r)
    assert (d.tp_pred, d.fp, d.tp_ref, d.fn) == (0, 1, 0, 1)
    p[5, 5, 2] = 1  # 3/8 = 37.5% -> match
    d = m.lesion_detection(p, r)
    assert (d.tp_pred, d.fp, d.tp_ref, d.fn) == (1, 0, 1, 0)
    # One voxel of a 4-voxel lesion is 25% too.
    r4, p1 = vol(), vol()
    r4[1, 1, 0:4] = 1
    p1[1, 1, 0] = 1
    assert m.lesion_sensitivity(p1, r4) == 0.0


def test_lesion_split_into_two_predictions():
    r = vol()
    r[5, 5, 0:10] = 1  # 10 voxels
    # Two pieces of 20% each: coverage is judged per predicted lesion -> missed, 2 FP.
    p = vol()
    p[5, 5, 0:2] = 1
    p[5, 5, 5:7] = 1
    d = m.lesion_detection(p, r)
    assert (d.n_pred, d.tp_pred, d.fp, d.tp_ref, d.fn) == (2, 0, 2, 0, 1)
    # Two pieces of 30% each: detected, both pieces are true positives.
    p = vol()
    p[5, 5, 0:3] = 1
    p[5, 5, 6:9] = 1
    d = m.lesion_detection(p, r)
    assert (d.n_pred, d.tp_pred, d.fp, d.tp_ref, d.fn) == (2, 2, 0, 1, 0)
    assert d.sensitivity == 1.0 and d.precision == 1.0


def test_one_prediction_spanning_two_lesions():
    r = vol()
    r[1, 1, 0:4] = 1
    r[1, 1, 6:10] = 1
    p = vol()
    p[1, 1, :] = 1  # one predicted lesion covering both manual ones fully
    d = m.lesion_detection(p, r)
    assert (d.n_pred, d.n_ref, d.tp_pred, d.tp_ref) == (1, 2, 1, 2)


def test_lesion_volumes_and_volume_specificity():
    a = vol()
    a[0, 0, 0] = 1
    a[5:7, 5:7, 5:7] = 1
    assert m.lesion_volumes(a, (0.5, 0.5, 2.0)) == pytest.approx([0.5, 8 * 0.5])
    assert m.lesion_volumes(vol(), (1, 1, 1)) == []
    assert m.volume_specificity([vol(), vol(), a]) == pytest.approx(2 / 3)
    assert m.volume_specificity([vol()]) == 1.0
    assert math.isnan(m.volume_specificity([]))


# --------------------------------------------------------------------------- centerline

ZOOMS = (0.5, 2.0, 3.0)  # anisotropic on purpose


def cord(shape=(20, 16, 10), cx=10, cy=8, slices=range(2, 8)):
    """Straight 3x3-voxel cord centred on (cx, cy) on the given axial slices (axis 2)."""
    a = np.zeros(shape, np.uint8)
    for z in slices:
        a[cx - 1:cx + 2, cy - 1:cy + 2, z] = 1
    return a


def line(shape=(20, 16, 10), x=10, y=8, slices=range(2, 8)):
    a = np.zeros(shape, np.uint8)
    for z in slices:
        a[x, y, z] = 1
    return a


def test_axial_axis_follows_orientation():
    assert m.axial_axis(np.diag([-1.0, 1, 1, 1])) == 2
    psr = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # t2's orientation
    assert m.axial_axis(psr) == 1
    sag = np.array([[0, 0, -1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], float)  # I on axis 0
    assert m.axial_axis(sag) == 0


def test_centerline_on_the_centre_is_exact():
    e = m.centerline_errors(line(), cord(), zooms=ZOOMS)
    assert e.mse_mm2 == 0.0
    assert e.localization_rate == 1.0
    assert (e.n_slices_ref, e.n_slices_pred, e.n_slices_compared) == (6, 6, 6)


def test_centerline_shift_uses_anisotropic_mm():
    # one voxel along x (0.5 mm) and one along y (2 mm): 0.25 + 4 = 4.25 mm^2 on every slice
    assert m.centerline_mse(line(x=11), cord(), zooms=ZOOMS) == pytest.approx(0.25)
    assert m.centerline_mse(line(y=9), cord(), zooms=ZOOMS) == pytest.approx(4.0)
    e = m.centerline_errors(line(x=11, y=9), cord(), zooms=ZOOMS)
    assert e.mse_mm2 == pytest.approx(4.25)
    assert e.max_distance_mm == pytest.approx(math.sqrt(4.25))
    assert e.localization_rate == 1.0  # (11, 9) is still inside the 3x3 cord
    # two voxels along x leaves the cord: not localized, 1 mm^2
    e = m.centerline_errors(line(x=12), cord(), zooms=ZOOMS)
    assert e.mse_mm2 == pytest.approx(1.0) and e.localization_rate == 0.0


def test_centerline_missing_and_extra_slices_are_counted():
    pred = line(slices=[2, 4, 5, 6, 7, 9])  # misses slice 3, extra point on slice 9
    pred[:, :, 2] = 0
    pred[11, 8, 2] = 1  # slice 2 shifted by 0.5 mm
    e = m.centerline_errors(pred, cord(), zooms=ZOOMS)
    assert (e.n_slices_ref, e.n_slices_pred, e.n_slices_compared) == (6, 6, 5)
    assert (e.n_slices_missing, e.n_slices_extra) == (1, 1)
    assert e.missing_slices == [3] and e.extra_slices == [9]
    assert e.mse_mm2 == pytest.approx(0.25 / 5)  # averaged over the 5 compared slices
    assert e.localization_rate == pytest.approx(5 / 6)  # the missing slice counts as a miss
    assert m.localization_rate(pred, cord(), zooms=ZOOMS) == pytest.approx(5 / 6)


def test_centerline_nothing_to_compare_is_nan():
    e = m.centerline_errors(line(slices=[9]), cord(), zooms=ZOOMS)
    assert math.isnan(e.mse_mm2) and e.localization_rate == 0.0
    assert e.n_slices_compared == 0


def test_centerline_points_and_any_orientation():
    pts = np.array([[10.4, 8.0, z] for z in range(2, 8)], float)
    assert m.centerline_mse(pts, cord(), zooms=ZOOMS) == pytest.approx((0.4 * 0.5) ** 2)
    # Same data stored with the slice axis first and an affine saying so: same answer.
    ref = np.transpose(cord(), (2, 0, 1))
    pred = np.transpose(line(x=11, y=9), (2, 0, 1))
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2], aff[3, 3] = ZOOMS[2], ZOOMS[0], ZOOMS[1], 1.0
    assert m.axial_axis(aff) == 0
    assert m.centerline_mse(pred, ref, affine=aff) == pytest.approx(4.25)
    assert m.localization_rate(pred, ref, affine=aff) == 1.0


def test_centerline_oblique_in_plane_rotation_keeps_distances():
    t = np.deg2rad(30)
    aff = np.eye(4)
    aff[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    aff[:3, :3] = aff[:3, :3] @ np.diag([1.5, 1.5, 4.0])
    assert m.centerline_mse(line(x=11, y=9), cord(), affine=aff) == pytest.approx(2 * 1.5 ** 2)

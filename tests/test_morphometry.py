"""Cord morphometry on synthetic cords of known section: elliptical tubes, straight or curved, tilted
0-30 degrees, on 0.5-5 mm slices, in several storage orientations and grids."""
from __future__ import annotations

import csv
import functools
import math

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage as ndi

from cordseg.cli_morphometry import morphometry as morphometry_cmd
from cordseg.errors import CordsegError, InputError, OutputError
from cordseg.morphometry import COLUMNS, csv_path_beside, mean_csa, morphometry, parse_range, tube_phantom

SEMI = (5.5, 4.0)  # mm: a (in the plane of the lean), b; an adult cervical cord's size (69 mm2)
TRUE_AREA = math.pi * SEMI[0] * SEMI[1]


def grid(shape, zooms, axcodes=("L", "A", "S")):
    """(native shape, native affine) of an RPI grid centred on 0, stored in the order `axcodes` asks for."""
    sx, sy, sz = zooms
    rpi = np.diag([-sx, sy, sz, 1.0])
    rpi[:3, 3] = -rpi[:3, :3] @ ((np.array(shape) - 1) / 2)
    tr = ornt_transform(axcodes2ornt(("L", "A", "S")), axcodes2ornt(tuple(axcodes)))
    native_shape = apply_orientation(np.zeros(shape, np.uint8), tr).shape
    return native_shape, rpi @ inv_ornt_aff(tr, shape)


def tube(shape=(72, 72, 40), zooms=(0.5, 0.5, 1.0), axcodes=("L", "A", "S"), **kw):
    """A tube phantom stored in the order `axcodes` asks for (built once per set of arguments)."""
    img, true = _rpi_tube(tuple(shape), tuple(zooms), tuple(sorted(kw.items())))
    if tuple(axcodes) == ("L", "A", "S"):
        return nib.Nifti1Image(np.asarray(img.dataobj).copy(), img.affine), true
    # the same voxels in another storage order: flips and transposes with the matching affine (what a scanner
    # writing the same grid in another order would store)
    tr = ornt_transform(axcodes2ornt(("L", "A", "S")), axcodes2ornt(tuple(axcodes)))
    nshape, aff = grid(shape, zooms, axcodes)
    data = apply_orientation(np.asarray(img.dataobj), tr)
    assert data.shape == nshape and np.allclose(aff, img.affine @ inv_ornt_aff(tr, shape))
    return nib.Nifti1Image(np.ascontiguousarray(data), aff), true


@functools.lru_cache(maxsize=None)
def _rpi_tube(shape, zooms, kw):
    kw = dict(kw)
    kw.setdefault("semi_axes", SEMI)
    nshape, aff = grid(shape, zooms)
    return tube_phantom(nshape, aff, **kw)


def ok_areas(table):
    return np.array([m.area for m in table.slices if m.ok])


def lean_deg(m):
    """The slice's angle between cord and slice normal, from its angle_AP and angle_RL."""
    return math.degrees(math.atan(math.hypot(math.tan(math.radians(m.angle_AP)), math.tan(math.radians(m.angle_RL)))))


def n_slices(pz, length_mm=40.0):
    return max(6, int(round(length_mm / pz)))


# --------------------------------------------------------------------------- known areas


@pytest.mark.parametrize("pz", [pytest.param(0.5, marks=pytest.mark.slow), 1.0, 3.0, 5.0])
@pytest.mark.parametrize("tilt", [0.0, 15.0, 30.0])
def test_straight_tilted_tube_area(pz, tilt):
    img, true = tube((72, 72, n_slices(pz)), (0.5, 0.5, pz), tilt_deg=tilt, azimuth_deg=35.0)
    table = morphometry(img)
    areas = ok_areas(table)
    tol = 0.02 if pz <= 1 else 0.05
    assert len(areas) >= 0.8 * len(table.slices)
    assert abs(areas.mean() / true - 1) < tol
    assert np.median(np.abs(areas / true - 1)) < tol
    assert abs(table.mean_area / true - 1) < tol
    # the tangent: lean from the slice normal, and the direction it leans to (RPI x points left)
    lean = [lean_deg(m) for m in table.slices if m.ok]
    assert abs(np.median(lean) - tilt) < 1.0
    if tilt:
        m = table.slices[len(table.slices) // 2]
        direction = math.degrees(math.atan2(math.tan(math.radians(m.angle_RL)), -math.tan(math.radians(m.angle_AP))))
        assert abs(direction - 35.0) < 3.0


def test_anisotropic_pixels():
    img, true = tube((72, 36, 20), (0.5, 1.0, 2.0), tilt_deg=25.0, azimuth_deg=60.0, soft=True)
    table = morphometry(img)
    assert abs(table.mean_area / true - 1) < 0.02
    assert abs(table.rows[0]["MEAN(diameter_RL)"] / (2 * SEMI[1]) - 1) < 0.05  # b lies nearer left-right here


def test_angle_correction_is_what_makes_tilted_areas_right():
    img, true = tube(tilt_deg=30.0, azimuth_deg=0.0)
    corrected = morphometry(img).mean_area
    axial = morphometry(img, angle_correction=False).mean_area
    assert abs(corrected / true - 1) < 0.02
    assert abs(axial * math.cos(math.radians(30.0)) / true - 1) < 0.02  # the cut is area / cos
    assert axial / true > 1.1


@pytest.mark.parametrize("pz", [pytest.param(1.0, marks=pytest.mark.slow), 3.0, 5.0])
def test_curved_tube_area_and_angle_along_it(pz):
    # a circular arc of radius 120 mm, leaning 15 degrees at z=0: 0.5 to 30 degrees over the 60 mm field
    radius, lean0 = 120.0, 15.0
    shape = (96, 96, n_slices(pz, 60.0))
    img, true = tube(shape, (0.5, 0.5, pz), tilt_deg=lean0, azimuth_deg=200.0, curvature_radius=radius)
    table = morphometry(img, perslice=True)
    areas = ok_areas(table)
    tol = 0.02 if pz <= 1 else 0.05
    assert len(areas) == len(table.slices)
    assert abs(areas.mean() / true - 1) < tol
    assert np.median(np.abs(areas / true - 1)) < tol
    # expected lean at each slice's height: sin(lean) = sin(lean0) + z / radius
    aff = table_affine_z(shape, pz)
    errs = []
    for m in table.slices:
        z_mm = aff(m.slice)
        expected = math.degrees(math.asin(math.sin(math.radians(lean0)) + z_mm / radius))
        errs.append(lean_deg(m) - expected)
    assert np.median(np.abs(errs)) < 1.0


def table_affine_z(shape, pz):
    """Scanner z (mm) of an RPI slice index on the grid() above."""
    return lambda k: (k - (shape[2] - 1) / 2) * pz


def test_diameters_are_measured_perpendicular_to_the_cord():
    # a leans towards x (scanner right-left), so it is the RL diameter; the cut is a/cos(30) long
    img, _ = tube(tilt_deg=30.0, azimuth_deg=0.0)
    table = morphometry(img)
    row = table.rows[0]
    assert abs(row["MEAN(diameter_RL)"] / (2 * SEMI[0]) - 1) < 0.03
    assert abs(row["MEAN(diameter_AP)"] / (2 * SEMI[1]) - 1) < 0.03
    ecc = math.sqrt(1 - (SEMI[1] / SEMI[0]) ** 2)
    assert abs(row["MEAN(eccentricity)"] - ecc) < 0.03
    assert row["MEAN(orientation)"] < 5.0
    assert 0.9 < row["MEAN(solidity)"] <= 1.0
    assert abs(row["MEAN(angle_AP)"]) > 25 and abs(row["MEAN(angle_RL)"]) < 1.0
    # length of cord per 1 mm slice at 30 degrees
    assert abs(row["SUM(length)"] / row["N slices"] - 1 / math.cos(math.radians(30))) < 0.02

    turned = morphometry(tube(twist_deg=90.0)[0]).rows[0]
    assert abs(turned["MEAN(diameter_AP)"] / (2 * SEMI[0]) - 1) < 0.03
    assert abs(turned["MEAN(diameter_RL)"] / (2 * SEMI[1]) - 1) < 0.03
    assert turned["MEAN(orientation)"] > 85.0


def test_solidity_sees_a_notch():
    img, _ = tube()
    data = np.asarray(img.dataobj).copy()
    whole = morphometry(img).rows[0]["MEAN(solidity)"]
    data[28:44, 36:40, :] = 0  # a bite into one side, the cord still one piece
    notched = morphometry(nib.Nifti1Image(data, img.affine)).rows[0]["MEAN(solidity)"]
    assert whole > 0.93 and notched < whole - 0.05


# --------------------------------------------------------------------------- orientations and grids


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("P", "S", "R"), ("L", "P", "I"), ("S", "L", "A"),
                                     ("A", "I", "L")])
def test_same_cord_in_every_storage_order(axcodes):
    ref_img, true = tube(tilt_deg=20.0, azimuth_deg=120.0, curvature_radius=150.0)
    img, _ = tube(axcodes=axcodes, tilt_deg=20.0, azimuth_deg=120.0, curvature_radius=150.0)
    ref = morphometry(ref_img, perslice=True)
    got = morphometry(img, perslice=True)
    assert [m.slice for m in got.slices] == [m.slice for m in ref.slices]
    for a, b in zip(ref.slices, got.slices):
        for key in ("area", "angle_AP", "angle_RL", "diameter_AP", "diameter_RL", "solidity", "length"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-6, abs=1e-6), key
    assert abs(got.rows[0]["MEAN(area)"] / true - 1) < 0.02
    # slice numbers run inferior -> superior: the arc leans more the higher it goes
    assert lean_deg(got.slices[-1]) > lean_deg(got.slices[0]) + 8.0


@pytest.mark.slow
def test_tube_sampled_directly_on_a_sagittal_grid():
    kw = dict(semi_axes=SEMI, tilt_deg=20.0, azimuth_deg=120.0, curvature_radius=150.0)
    nshape, aff = grid((72, 72, 40), (0.5, 0.5, 1.0), ("P", "S", "R"))
    direct, true = tube_phantom(nshape, aff, **kw)
    reoriented, _ = tube(axcodes=("P", "S", "R"), **{k: v for k, v in kw.items() if k != "semi_axes"})
    assert np.mean(np.asarray(direct.dataobj) != np.asarray(reoriented.dataobj)) < 1e-3  # float round-off only
    assert abs(morphometry(direct).mean_area / true - 1) < 0.02


def resample_to(img, shape, affine, order=1):
    """img's values at the voxel centres of another grid (scanner coordinates; 0 outside)."""
    to_src = np.linalg.inv(img.affine) @ affine
    idx = np.indices(shape).reshape(3, -1).T
    src = nib.affines.apply_affine(to_src, idx).T
    vals = ndi.map_coordinates(np.asarray(img.dataobj, float), src, order=order, mode="constant")
    return vals.reshape(shape)


def test_same_cord_resampled_to_another_grid():
    src, true = tube((80, 80, 60), (0.5, 0.5, 1.0), tilt_deg=20.0, azimuth_deg=60.0, soft=True)
    src_bin = nib.Nifti1Image((np.asarray(src.dataobj) >= 0.5).astype(np.uint8), src.affine)
    a = morphometry(src_bin).mean_area
    # 0.8 x 0.8 x 2.5 mm, stored P, S, R, turned 8 degrees about the left-right axis, inside src's slab
    shape_rpi = (44, 44, 10)
    nshape, aff = grid(shape_rpi, (0.8, 0.8, 2.5), ("P", "S", "R"))
    c, s = math.cos(math.radians(8)), math.sin(math.radians(8))
    rot = np.eye(4)
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    aff = rot @ aff
    moved = (resample_to(src, nshape, aff) >= 0.5).astype(np.uint8)
    b = morphometry(nib.Nifti1Image(moved, aff)).mean_area
    assert abs(b / a - 1) < 0.02
    assert abs(a / true - 1) < 0.02 and abs(b / true - 1) < 0.05


# --------------------------------------------------------------------------- soft masks


def test_soft_mask_partial_volume_area():
    # 1 mm pixels: a binary mask's staircase moves each slice's area by several %, partial volume does not
    soft, true = tube((36, 36, 15), (1.0, 1.0, 3.0), tilt_deg=25.0, azimuth_deg=10.0, soft=True)
    binary, _ = tube((36, 36, 15), (1.0, 1.0, 3.0), tilt_deg=25.0, azimuth_deg=10.0, soft=False)
    ts, tb = morphometry(soft, perslice=True), morphometry(binary, perslice=True)
    assert ts.soft and not tb.soft
    err_soft = np.abs(ok_areas(ts) / true - 1)
    err_bin = np.abs(ok_areas(tb) / true - 1)
    assert err_soft.max() < 0.02
    assert err_bin.max() > err_soft.max()


def test_soft_values_count_as_fractions():
    data = np.zeros((20, 20, 5), np.float32)
    data[8:12, 8:12, :] = 1.0  # 16 full pixels
    data[7, 8:12, :] = 0.25  # and a rim worth one pixel
    data[12, 8:12, :] = 0.5  # and two pixels
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    table = morphometry(nib.Nifti1Image(data, aff), perslice=True)
    for m in table.slices:
        assert m.area == pytest.approx(19 * 0.25, rel=1e-4)  # upright: no angle correction
        assert m.angle_AP == pytest.approx(0.0, abs=1e-6) and m.angle_RL == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- flags, ranges and levels


def test_two_components_and_edge_are_flagged_not_averaged():
    img, true = tube((72, 72, 30), (0.5, 0.5, 1.0))
    data = np.asarray(img.dataobj).copy()
    data[2:6, 2:6, 10:15] = 1  # a speck on 5 slices
    data[:, 0:2, 20:22] = 0
    data[30:40, 0:3, 20:22] = 1  # touching the field of view's edge on 2 slices
    data[:, :, 25] = 0  # a gap in the cord
    table = morphometry(nib.Nifti1Image(data, img.affine), perslice=True)
    flags = {m.slice: m.flags for m in table.slices}
    assert all(flags[z] == ("several_components",) for z in range(10, 15))
    assert all("touches_edge" in flags[z] for z in (20, 21))
    assert flags[25] == ("empty",)
    assert sum(1 for f in flags.values() if f) == 8
    mean = morphometry(nib.Nifti1Image(data, img.affine)).rows[0]
    assert mean["N slices"] == 22 and mean["Excluded slices"] == 8
    assert "several_components" in mean["Flags"] and "touches_edge" in mean["Flags"]
    assert abs(mean["MEAN(area)"] / true - 1) < 0.02  # the specks did not enter the mean
    specky = [m.area for m in table.slices if "several_components" in m.flags]
    assert min(specky) > true * 1.05  # ... though those slices do hold more than the cord


def test_slice_range_mean():
    img, true = tube((72, 72, 40), (0.5, 0.5, 1.0), tilt_deg=10.0)
    table = morphometry(img, slices="5:14")
    row = table.rows[0]
    assert row["Slice (I->S)"] == "5:14" and row["N slices"] == 10
    per = morphometry(img, perslice=True, slices=(5, 14))
    assert [int(r["Slice (I->S)"]) for r in per.rows] == list(range(5, 15))
    assert row["MEAN(area)"] == pytest.approx(np.mean([r["MEAN(area)"] for r in per.rows]))
    assert row["STD(area)"] == pytest.approx(np.std([r["MEAN(area)"] for r in per.rows]))


def levels_image(img, bands):
    """A level per voxel on img's grid: bands = {level: (z0, z1)} in RPI slices (both included)."""
    from cordseg.orientation import to_rpi

    rpi = to_rpi(img)
    lev = np.zeros(rpi.shape, np.uint8)
    for level, (z0, z1) in bands.items():
        lev[:, :, z0:z1 + 1] = level
    return nib.Nifti1Image(rpi.to_native(lev), img.affine)


def test_levels_per_voxel_and_vert_range():
    img, true = tube((72, 72, 40), (0.5, 0.5, 1.0), axcodes=("P", "S", "R"), tilt_deg=10.0)
    lev = levels_image(img, {4: (0, 9), 3: (10, 24), 2: (25, 39)})
    per_level = morphometry(img, levels=lev)
    assert [r["VertLevel"] for r in per_level.rows] == ["2", "3", "4"]
    assert [r["Slice (I->S)"] for r in per_level.rows] == ["25:39", "10:24", "0:9"]
    assert [r["N slices"] for r in per_level.rows] == [15, 15, 10]
    c23 = morphometry(img, levels=lev, vert="2:3").rows
    assert len(c23) == 1 and c23[0]["VertLevel"] == "2:3" and c23[0]["Slice (I->S)"] == "10:39"
    assert abs(c23[0]["MEAN(area)"] / true - 1) < 0.02
    perslice = morphometry(img, levels=lev, perslice=True)
    assert [r["VertLevel"] for r in perslice.rows][:11] == ["4"] * 10 + ["3"]
    partial = morphometry(img, levels=levels_image(img, {3: (10, 24)}))
    assert [r["VertLevel"] for r in partial.rows] == ["3"]
    assert any("25 cord slice(s) got no vertebral level" in n and "0:9, 25:39" in n for n in partial.notes)


def test_disc_labels_and_labels_on_another_grid():
    img, _ = tube((72, 72, 40), (0.5, 0.5, 1.0))
    # discs stored on a 1 mm grid in another orientation; value n at the disc above vertebra n
    nshape, aff = grid((36, 36, 40), (1.0, 1.0, 1.0), ("R", "S", "A"))
    from cordseg.orientation import to_rpi

    probe = nib.Nifti1Image(np.zeros(nshape, np.uint8), aff)
    rpi = to_rpi(probe)
    discs = np.zeros(rpi.shape, np.uint8)
    for value, z in ((2, 35), (3, 25), (4, 12), (5, 3)):
        discs[18, 18, z] = value
    disc_img = nib.Nifti1Image(rpi.to_native(discs), aff)
    table = morphometry(img, levels=disc_img, perslice=True)
    level = {m.slice: m.level for m in table.slices}
    assert level[34] == 2 and level[25] == 2 and level[24] == 3 and level[12] == 3 and level[11] == 4
    assert level[3] == 4 and level[2] is None and level[36] is None
    rows = morphometry(img, levels=disc_img).rows
    assert [r["VertLevel"] for r in rows] == ["2", "3", "4"]


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_cordseg_errors(tmp_path):
    img, _ = tube((40, 40, 10), (0.5, 0.5, 1.0))
    mri = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 800, (20, 20, 5)).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match="not a cord mask"):
        morphometry(mri)
    labels = nib.Nifti1Image((np.asarray(img.dataobj) * 3).astype(np.uint8), img.affine)
    with pytest.raises(InputError, match="not a cord mask"):
        morphometry(labels)
    with pytest.raises(InputError, match="empty"):
        morphometry(nib.Nifti1Image(np.zeros((10, 10, 4), np.uint8), np.eye(4)))
    with pytest.raises(InputError, match="empty"):
        morphometry(nib.Nifti1Image(np.full((10, 10, 4), 0.3, np.float32), np.eye(4)))
    for bad in ("5:2", "a:b", "1:2:3", "0:10", "-1:3", "1.5:3"):
        with pytest.raises(InputError):
            morphometry(img, slices=bad)
    data = np.asarray(img.dataobj).copy()
    data[:, :, 6:] = 0
    with pytest.raises(InputError, match="holds no cord"):
        morphometry(nib.Nifti1Image(data, img.affine), slices="7:9")
    with pytest.raises(InputError, match="needs a levels image"):
        morphometry(img, vert="2:3")
    frac = nib.Nifti1Image(np.full((40, 40, 10), 2.5, np.float32), img.affine)
    with pytest.raises(InputError, match="whole numbers"):
        morphometry(img, levels=frac)
    lev = levels_image(img, {2: (0, 9)})
    with pytest.raises(InputError, match="no cord slice has a vertebral level"):
        morphometry(img, levels=lev, vert="5:6")
    with pytest.raises(InputError, match="file not found"):
        morphometry(tmp_path / "missing.nii.gz")
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4))
    with pytest.raises(CordsegError):
        morphometry(four_d)
    assert parse_range("3") == (3, 3) and parse_range((2, 5)) == (2, 5)


# --------------------------------------------------------------------------- tables and the command


def test_csv_round_trip_and_atomic_write(tmp_path):
    img, true = tube((40, 40, 12), (0.5, 0.5, 1.0), semi_axes=(3.0, 2.5))
    table = morphometry(img, perslice=True)
    path = table.to_csv(tmp_path / "csa.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == list(COLUMNS)
    assert [r["Slice (I->S)"] for r in rows] == [str(z) for z in range(12)]
    assert float(rows[3]["MEAN(area)"]) == pytest.approx(table.slices[3].area, abs=1e-5)
    assert rows[3]["STD(area)"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csa.csv"]  # no temporary file left
    with pytest.raises(OutputError):
        table.to_csv(tmp_path / "no" / "such" / "folder.csv")
    assert mean_csa(img) == pytest.approx(morphometry(img).mean_area)
    assert abs(mean_csa(img) / (math.pi * 3.0 * 2.5) - 1) < 0.03
    assert csv_path_beside(tmp_path / "sub-01_T2w_seg.nii.gz").name == "sub-01_T2w_seg_csa.csv"


def test_cli(tmp_path):
    img, true = tube((60, 60, 20), (0.5, 0.5, 1.0), tilt_deg=20.0)
    seg = tmp_path / "t2_seg.nii.gz"
    nib.save(img, seg)
    runner = CliRunner()
    res = runner.invoke(morphometry_cmd, [str(seg), "-o", str(tmp_path / "csa.csv")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "csa.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["Slice (I->S)"] == "0:19"
    assert abs(float(rows[0]["MEAN(area)"]) / true - 1) < 0.02

    res = runner.invoke(morphometry_cmd, [str(seg), "--perslice", "--slices", "2:6", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "t2_seg_csa.csv", newline="") as fh:
        assert [r["Slice (I->S)"] for r in csv.DictReader(fh)] == ["2", "3", "4", "5", "6"]

    lev = tmp_path / "levels.nii.gz"
    nib.save(levels_image(img, {3: (0, 9), 2: (10, 19)}), lev)
    res = runner.invoke(morphometry_cmd, [str(seg), "--levels", str(lev), "--vert", "2:2"])
    assert res.exit_code == 0, res.output
    assert "10:19" in res.output

    for args, needle in (([str(seg), "--slices", "9:3"], "reversed"),
                         ([str(tmp_path / "nope.nii.gz")], "file not found"),
                         ([str(seg), "--vert", "2:3"], "levels image"),
                         ([str(seg), "-o", str(tmp_path / "x" / "y.csv")], "does not exist")):
        res = runner.invoke(morphometry_cmd, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("cordseg: error: ") and needle in lines[0], res.output

    other = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), other)
    res = runner.invoke(morphometry_cmd, [str(seg), "--image", str(other), "-q"])
    assert res.exit_code == 0 and "cordseg: warning:" in res.output and "not on the grid" in res.output


# --------------------------------------------------------------------------- real scans


@pytest.mark.realdata
def test_real_mask_in_stored_and_rpi_order(shared_data, tmp_path):
    from cordseg.io import load_image
    from cordseg.orientation import to_rpi

    seg = load_image(shared_data / "sct_testing/t2/t2_seg-manual.nii.gz")  # stored P, S, R
    rpi = to_rpi(seg)
    as_rpi = nib.Nifti1Image(rpi.data, rpi.affine)
    a, b = morphometry(seg, perslice=True), morphometry(as_rpi, perslice=True)
    assert [m.slice for m in a.slices] == [m.slice for m in b.slices]
    assert np.allclose([m.area for m in a.slices], [m.area for m in b.slices])
    mean = morphometry(seg).mean_area
    assert 40.0 < mean < 110.0  # adult cervical cord CSA


def test_package_attribute_is_callable_like_the_function():
    import importlib

    import cordseg

    module = importlib.import_module("cordseg.morphometry")
    img, true = tube((40, 40, 10), (0.5, 0.5, 1.0), semi_axes=(3.0, 2.5))
    assert cordseg.morphometry is module  # what importing a submodule leaves on the package
    assert module(img).mean_area == morphometry(img).mean_area


def test_sc_csa_writes_the_per_slice_table_beside_the_mask(tmp_path):
    """cordseg sc --csa: the per-slice table beside the mask, and the mean printed, as cordseg morphometry
    gives them for the mask written."""
    import csv

    import nibabel as nib
    from click.testing import CliRunner

    from cordseg.cli import main
    from cordseg.phantom import make_phantom

    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(make_phantom().image, path)
    res = CliRunner().invoke(main, ["sc", str(path), "-o", str(tmp_path), "--csa"])
    assert res.exit_code == 0, res.output
    mask = tmp_path / "sub-01_T2w_seg.nii.gz"
    table = tmp_path / "sub-01_T2w_seg_csa.csv"
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = morphometry(str(mask), perslice=True)
    assert [r["Slice (I->S)"] for r in rows] == [str(r["Slice (I->S)"]) for r in expected.rows]
    mean = morphometry(str(mask)).mean_area
    assert f"mean CSA {mean:.1f} mm2" in res.output


def test_mean_area_is_the_same_from_every_kind_of_table():
    """`cordseg sc --csa` writes the per-slice table and prints the mean from it (one pass, not two)."""
    img, _ = tube(tilt_deg=15)
    summary, perslice = morphometry(img), morphometry(img, perslice=True)
    assert len(perslice.rows) > 1
    assert perslice.mean_area == pytest.approx(summary.mean_area, rel=1e-9)
    assert summary.mean_area == pytest.approx(ok_areas(summary).mean(), rel=1e-9)

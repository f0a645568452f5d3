"""The Python API on synthetic phantoms through the real shipped models, plus the pieces around it.

Bars were set from measurement (values in the comments, shipped models of commit 2e2a83e and the
working tree on 2026-11-26) with a margin; raise them when the models improve, never lower them without a
reason written here.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

import cordseg
from cordseg import metrics, segmentation
from cordseg.api import guess_contrast, lesion_table
from cordseg.centerline import Centerline
from cordseg.errors import CordsegError, InputError
from cordseg.inference import Model
from cordseg.io import load_image
from cordseg.orientation import to_rpi
from cordseg.phantom import make_phantom

# id, native axis codes, RPI shape, zooms (mm), contrast, cord Dice bar (measured)
CASES = [
    ("LAS-1mm-t2", ("L", "A", "S"), (48, 48, 32), (1.0, 1.0, 1.0), "t2", 0.90),  # measured 0.933-0.940
    ("PSR-1mm-t2", ("P", "S", "R"), (48, 48, 32), (1.0, 1.0, 1.0), "t2", 0.90),  # measured 0.933-0.940
    ("RAS-thick-t2", ("R", "A", "S"), (80, 80, 12), (0.5, 0.5, 3.0), "t2", 0.92),  # measured 0.956-0.960
    ("RPI-thick-t1", ("R", "P", "I"), (80, 80, 12), (0.5, 0.5, 3.0), "t1", 0.94),  # measured 0.968-0.984
]
# Centerline against the phantom's known curve, every case (measured over seeds: all slices found,
# MSE 0.02-0.05 mm², worst slice 0.20-0.41 mm).
FOUND_FRACTION_BAR = 0.9
CENTERLINE_MSE_BAR = 0.15  # mm²
CENTERLINE_MAX_BAR = 1.0  # mm


def with_codes(img, qcode, scode):
    """The same image with distinct qform/sform codes, so that a test can see they survive."""
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.copy())
    out.set_qform(img.affine, code=qcode)
    out.set_sform(img.affine, code=scode)
    return out


def assert_on_grid(out, ref):
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert int(out.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(out.header["sform_code"]) == int(ref.header["sform_code"])
    np.testing.assert_allclose(out.get_qform(), ref.get_qform(), atol=1e-6)
    np.testing.assert_allclose(out.get_sform(), ref.get_sform(), atol=1e-6)


_RUNS = {}


def run_case(name):
    """Phantom, centerline and cord mask of one case, computed once per test session."""
    if name in _RUNS:
        return _RUNS[name]
    _, axcodes, shape, zooms, contrast, dice_bar = next(c for c in CASES if c[0] == name)
    ph = make_phantom(shape, zooms, axcodes=axcodes, contrast=contrast, seed=3)
    image = with_codes(ph.image, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cordseg.CordsegWarning)  # a clean phantom raises no warning
        mask, cl = cordseg.detect_centerline(image, contrast)
        seg = cordseg.segment_cord(image, contrast)
    _RUNS[name] = dict(ph=ph, image=image, contrast=contrast, mask=mask, cl=cl, seg=seg, dice_bar=dice_bar)
    return _RUNS[name]


@pytest.fixture(params=[c[0] for c in CASES])
def case(request):
    return run_case(request.param)


@pytest.mark.slow
def test_centerline_follows_the_phantom(case):
    ph, cl, image = case["ph"], case["cl"], case["image"]
    truth = {int(round(r[2])): row for r, row in zip(ph.centerline_rpi, ph.centerline)}  # RPI z -> native voxel
    found = [z for z in cl.z if int(z) in truth]
    assert len(found) >= FOUND_FRACTION_BAR * len(truth), f"cord found on {len(found)}/{len(truth)} slices"
    assert len(cl.z) - len(found) <= 1, "at most one slice outside the cord"
    native = cl.native_points()
    mm = native @ image.affine[:3, :3].T + image.affine[:3, 3]
    np.testing.assert_allclose(cl.scanner_mm(), mm, atol=1e-4)  # both routes to scanner space agree
    err = []
    for z, p_mm in zip(cl.z, mm):
        if int(z) in truth:
            t = truth[int(z)]
            err.append(np.linalg.norm(p_mm - (image.affine[:3, :3] @ t + image.affine[:3, 3])))
    err = np.array(err)
    assert float(np.mean(err**2)) <= CENTERLINE_MSE_BAR, f"MSE {np.mean(err**2):.3f} mm²"
    assert float(err.max()) <= CENTERLINE_MAX_BAR, f"worst slice {err.max():.2f} mm"


@pytest.mark.slow
def test_centerline_mask_is_one_voxel_per_slice(case):
    mask, cl, image = case["mask"], case["cl"], case["image"]
    assert_on_grid(mask, image)
    assert mask.get_data_dtype() == np.uint8
    data = np.asarray(mask.dataobj)
    assert int(data.sum()) == len(cl.z)
    voxels = np.argwhere(data > 0)
    expected = np.rint(cl.native_points()).astype(int)
    assert sorted(map(tuple, voxels)) == sorted(map(tuple, expected))


def test_cord_segmentation_dice(case):
    seg, ph = case["seg"], case["ph"]
    d = metrics.dice(np.asarray(seg.dataobj), np.asarray(ph.cord.dataobj))
    assert d >= case["dice_bar"], f"cord Dice {d:.3f} < {case['dice_bar']}"


def test_cord_segmentation_is_on_the_input_grid(case):
    seg = case["seg"]
    assert_on_grid(seg, case["image"])
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_same_answer_in_every_orientation():
    """The pipeline runs in RPI: the same phantom stored LAS or PSR gives the same mask voxel for voxel."""
    a, b = run_case("LAS-1mm-t2"), run_case("PSR-1mm-t2")  # same phantom (same seed), stored two ways
    np.testing.assert_array_equal(to_rpi(a["ph"].image).data, to_rpi(b["ph"].image).data)
    seg_a, seg_b = to_rpi(a["seg"]).data, to_rpi(b["seg"]).data
    assert seg_a.sum() > 0
    np.testing.assert_array_equal(seg_a, seg_b)
    np.testing.assert_allclose(a["cl"].rpi_points, b["cl"].rpi_points, atol=1e-9)


def test_soft_map_is_a_probability_and_contains_the_mask():
    run = run_case("RAS-thick-t2")
    image = with_codes(run["image"], 2, 0)
    soft = cordseg.segment_cord(image, "t2", soft=True)
    hard = run["seg"]
    assert_on_grid(soft, image)
    assert soft.get_data_dtype() == np.float32
    p = np.asarray(soft.dataobj)
    assert p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0 and p.max() > 0.9
    h = np.asarray(hard.dataobj) > 0
    assert h.any() and np.all(p[h] >= 0.5)  # the mask is the thresholded map (largest component of it)


@pytest.mark.slow
def test_lesions_on_a_lesion_free_phantom():
    ph = make_phantom((48, 48, 24), axcodes=("R", "P", "I"), seed=0)
    les = cordseg.segment_lesions(ph.image, "t2")
    assert_on_grid(les, ph.image)
    assert les.get_data_dtype() == np.uint8
    # stage 5's network alone marked a 4 mm3 speck in the phantom's one-voxel-thin bright CSF ring (peak p
    # 0.54), outside the cord, which screening dropped; stage 7's marks nothing here (peak p 0.40)
    assert lesion_table(les) == []
    raw = cordseg.segment_lesions(ph.image, "t2", min_contrast=0)
    assert sum(row.volume_mm3 for row in lesion_table(raw)) <= 8


@pytest.mark.slow
def test_screened_lesions_on_lesion_free_phantoms():
    """Small specks of noise on toy phantoms (the cord's signal-to-noise ratio about 8, noisier than the real
    scans, where no lesion-free scan of the evaluation sets gets a false lesion).

    Measured on seeds 0-7 with stage 7, the scan's own bar and growth to the local edge: 8, 9 and 5 mm3 on seeds
    1, 3 and 4, none on the others (with the fixed bar and no growth: 5, 8 and 3 mm3, 1.14-1.17 times the same
    places of the cord above and below; the growth takes in each speck's rim); stage 5: one voxel on seed 2."""
    sizes = []
    for seed in range(4):
        ph = make_phantom((48, 48, 24), axcodes=("R", "P", "I"), seed=seed)
        sizes += [row.volume_mm3 for row in lesion_table(cordseg.segment_lesions(ph.image, "t2"))]
    assert len(sizes) <= 2 and sum(sizes) <= 20 and all(v <= 12 for v in sizes)


def test_path_input_reads_contrast_from_the_name(tmp_path):
    ph = make_phantom((40, 40, 16), seed=2)
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(ph.image, path)
    seg = cordseg.segment_cord(path)  # contrast t2 from the BIDS suffix
    assert_on_grid(seg, nib.load(path))
    assert metrics.dice(np.asarray(seg.dataobj), np.asarray(ph.cord.dataobj)) >= 0.85
    # a nibabel image loaded from a named file carries its name too
    mask, cl = cordseg.detect_centerline(nib.load(path))
    assert len(cl.z) >= 14


# --------------------------------------------------------------------------- contrast


@pytest.mark.parametrize("name, contrast", [
    ("sub-01_T2w.nii.gz", "t2"),
    ("sub-01_T1w.nii.gz", "t1"),
    ("sub-01_T2star.nii.gz", "t2s"),
    ("sub-01_dwi.nii.gz", "dwi"),
    ("sub-01_ses-02_run-1_T2w.nii", "t2"),
    ("/data/subject/anat/sub-01_T1w.nii.gz", "t1"),
    ("t2.nii.gz", "t2"),
    ("T2.nii.gz", "t2"),
    ("t1w.nii.gz", "t1"),
    ("t1.nii", "t1"),
    ("t2s.nii.gz", "t2s"),
    ("t2_seg-manual.nii.gz", "t2"),
    ("dwi_mean.nii.gz", "dwi"),
    ("mt0.nii.gz", "t2s"),
    # Decided: magnetisation-transfer scans (MTS, MTon/MToff) are gradient echoes, T2*-like, so t2s.
    ("sub-01_acq-MTon_MTS.nii.gz", "t2s"),
    ("sub-03_acq-MToff_MTS.nii.gz", "t2s"),
    ("anat.nii.gz", None),
    ("sub-01_FLAIR.nii.gz", None),
    ("scan_t2x.nii.gz", None),  # t2 must be a whole word of the name
    ("/data/t2/image.nii.gz", None),  # only the file name counts, not its folders
    ("", None),
])
def test_guess_contrast(name, contrast):
    assert guess_contrast(name) == contrast


def test_unnamed_image_needs_a_contrast():
    ph = make_phantom((32, 32, 8), seed=0)
    with pytest.raises(InputError, match="contrast"):
        cordseg.segment_cord(ph.image)
    with pytest.raises(InputError, match="contrast"):
        cordseg.detect_centerline(ph.image)
    with pytest.raises(InputError, match="unknown contrast"):
        cordseg.segment_cord(ph.image, contrast="flair")
    assert issubclass(InputError, CordsegError)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "4"])
def test_threads_must_be_a_positive_whole_number(threads):
    ph = make_phantom((32, 32, 8), seed=0)
    for call in (cordseg.segment_cord, cordseg.segment_lesions, cordseg.detect_centerline):
        with pytest.raises(InputError, match="threads"):
            call(ph.image, "t2", threads=threads)


# --------------------------------------------------------------------------- lesion table


def test_lesion_table_on_a_hand_made_mask():
    data = np.zeros((20, 20, 10), np.uint8)
    data[2:4, 2:4, 1:3] = 1  # 8 voxels, slices 1..2
    data[10:13, 10, 6] = 1  # 3 voxels, slice 6
    data[15, 15, 8] = 1
    data[16, 16, 9] = 1  # touches the voxel above at a corner only: same lesion (26-connectivity)
    affine = np.diag([-0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    rows = lesion_table(nib.Nifti1Image(data, affine))
    assert len(rows) == 3
    voxel = 0.5 * 0.5 * 2.0
    by_size = sorted(rows, key=lambda r: -r.volume_mm3)
    assert [r.volume_mm3 for r in by_size] == pytest.approx([8 * voxel, 3 * voxel, 2 * voxel])
    big, small, diagonal = by_size
    assert (big.first_slice, big.last_slice) == (1, 2)
    assert (small.first_slice, small.last_slice) == (6, 6)
    assert (diagonal.first_slice, diagonal.last_slice) == (8, 9)
    # centroid in scanner mm: voxel centroid (2.5, 2.5, 1.5) through the affine
    assert big.centroid_mm == pytest.approx((10.0 - 1.25, -5.0 + 1.25, 3.0 + 3.0))
    assert sorted(r.id for r in rows) == [1, 2, 3]
    assert lesion_table(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), affine)) == []


def test_lesion_table_slices_follow_the_axial_axis():
    """In a PSR image the inferior-superior axis is voxel axis 1; slices are counted along it."""
    affine = np.array([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # P, S, R
    data = np.zeros((10, 12, 8), np.uint8)
    data[4:6, 3:7, 2] = 1
    (row,) = lesion_table(nib.Nifti1Image(data, affine))
    assert (row.first_slice, row.last_slice) == (3, 6)
    assert row.volume_mm3 == pytest.approx(8.0)


# --------------------------------------------------------------------------- patch geometry


@pytest.fixture
def identity_sc_model(tmp_path, tiny_onnx, monkeypatch):
    """A cord 'model' that returns its input, with normalisation switched off: what goes in comes back,
    so any loss is the pipeline's own resampling / patching / stitching geometry."""
    monkeypatch.setattr(segmentation, "network_input", lambda name, data, params=None, **channels: data)
    path = tiny_onnx(tmp_path / "identity_sc.onnx", task="sc", input_shape=("N", 64, 64, 48, 1))
    return Model.open(path)


def mask_round_trip(mask_img, model):
    """Feed a mask through soft_segmentation along its own per-slice centre; return (output, reference)."""
    rpi = to_rpi(mask_img)
    ref = rpi.data > 0.5
    zs = np.array([z for z in range(ref.shape[2]) if ref[:, :, z].any()])
    xs = np.array([np.nonzero(ref[:, :, z])[0].mean() for z in zs])
    ys = np.array([np.nonzero(ref[:, :, z])[1].mean() for z in zs])
    soft = segmentation.soft_segmentation(Centerline(zs, xs, ys, rpi), model)
    assert soft.shape == rpi.shape
    return rpi.to_native(soft >= 0.5), np.asarray(mask_img.dataobj) > 0.5


@pytest.mark.parametrize("axcodes, shape, zooms", [
    (("L", "A", "S"), (48, 48, 40), (1.0, 1.0, 1.0)),
    (("P", "S", "R"), (80, 80, 14), (0.5, 0.5, 3.0)),
    (("R", "P", "I"), (56, 56, 40), (0.8, 0.8, 0.8)),  # a grid that does not divide 0.5 mm
])
def test_pipeline_geometry_round_trip_phantom(identity_sc_model, axcodes, shape, zooms):
    out, ref = mask_round_trip(make_phantom(shape, zooms, axcodes=axcodes, seed=4).cord, identity_sc_model)
    # measured: Dice 1.000 (0 voxels differ) on 1 mm and 0.5x0.5x3 mm, 0.9996 (2 voxels) on 0.8 mm
    assert metrics.dice(out, ref) >= 0.999
    assert (out != ref).sum() <= max(2, 0.002 * ref.sum())


def test_pipeline_geometry_round_trip_real_mask(identity_sc_model, shared_data):
    mask = load_image(shared_data / "sct_testing" / "t2" / "t2_seg-manual.nii.gz")
    out, ref = mask_round_trip(mask, identity_sc_model)
    assert metrics.dice(out, ref) >= 0.999  # measured 1.000, 0 of 4275 voxels differ
    assert (out != ref).sum() <= 4

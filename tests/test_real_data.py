"""Real scans from ../shared/data (none seen in training) through the CLI and the shipped models.

Every image of the data README (bad inputs aside) goes through the CLI once; outputs must lie on the input
grid. Accuracy bars were set from measurement (`python bench/accuracy.py`, models of commit 7c9a022, values
in the comments) a little below the measured value. Raise them as the models improve; never lower one
without writing down why. Skipped with a reason when ../shared/data is absent.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

import cordseg
from cordseg import metrics
from cordseg.api import guess_contrast
from cordseg.cli import main
from cordseg.io import load_image
from cordseg.orientation import to_rpi

# image -> (contrast, CLI command run on it)
IMAGES = {
    "sct_testing/t2/t2.nii.gz": ("t2", "sc"),
    "sct_testing/t2/t2_fake_lesion.nii.gz": ("t2", "sc"),
    "sct_testing/t1/t1w.nii.gz": ("t1", "sc"),
    "sct_testing/mt/mt0.nii.gz": ("t2s", "sc"),
    "sct_testing/dmri/dwi_mean.nii.gz": ("dwi", "sc"),
    "unf01/sub-unf01_T1w.nii.gz": ("t1", "sc"),
    "unf01/sub-unf01_T2w.nii.gz": ("t2", "sc"),
    # full field of view, large: the centerline command keeps the file's run time down (bench/ times sc)
    "unlabeled/t2_ms_axial.nii.gz": ("t2", "centerline"),
    "unlabeled/t2_lumbar.nii.gz": ("t2", "centerline"),
    "unlabeled/sub-01_acq-MTon_MTS.nii.gz": ("t2s", "centerline"),
    "unlabeled/sub-03_acq-MToff_MTS.nii.gz": ("t2s", "centerline"),
}
SUFFIX = {"sc": "_seg", "centerline": "_centerline", "lesion": "_lesionseg"}

# image, reference cord mask, cord Dice bar, centerline MSE bar (mm²), localization bar
CORD_CASES = [
    ("sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_seg-manual.nii.gz", 0.95, 0.15, 1.0),
    # measured: Dice 0.975, MSE 0.069 mm², localization 1.000 (55/55 slices)
    ("sct_testing/t2/t2_fake_lesion.nii.gz", "sct_testing/t2/t2_fake_lesion_sc_seg.nii.gz", 0.88, 0.70, 0.95),
    # measured: Dice 0.909, MSE 0.520, localization 1.000
    ("sct_testing/t1/t1w.nii.gz", "sct_testing/t1/t1w_seg-manual.nii.gz", 0.92, 0.50, 0.95),
    # measured: Dice 0.941, MSE 0.355, localization 1.000
    ("sct_testing/mt/mt0.nii.gz", "sct_testing/mt/mt0_seg.nii.gz", 0.92, 0.45, 1.0),
    # measured: Dice 0.942, MSE 0.299, localization 1.000 (5/5 slices)
    ("unf01/sub-unf01_T1w.nii.gz", "unf01/sub-unf01_T1w_seg-manual.nii.gz", 0.90, 0.55, 0.8),
    # measured: Dice 0.933 (was 0.61 before commit f72544d), MSE 0.393, localization 0.875 (14/16) -- the
    # weakest centerline of the set
    ("unf01/sub-unf01_T2w.nii.gz", "unf01/sub-unf01_T2w_seg-manual.nii.gz", 0.89, 0.35, 1.0),
    # measured: Dice 0.915 (was 0.73 before commit f72544d), MSE 0.210, localization 1.000
]
LESION_FREE = ["sct_testing/t2/t2.nii.gz", "unf01/sub-unf01_T2w.nii.gz", "sct_testing/mt/mt0.nii.gz"]


pytestmark = [pytest.mark.realdata, pytest.mark.slow]  # the shipped models on every real scan


@pytest.fixture(scope="module")
def data(shared_data):
    return shared_data


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("real_outputs")


_RUNS: dict = {}


def cli(data: Path, out_root: Path, image: str, command: str, *extra):
    """Run `cordseg COMMAND data/image -c CONTRAST -o DIR -q` once per session; returns (result, output path)."""
    key = (image, command, extra)
    if key not in _RUNS:
        out_dir = out_root / f"{command}_{len(_RUNS)}"
        out_dir.mkdir()
        contrast = IMAGES[image][0]
        args = [command, str(data / image), "-c", contrast, "-o", str(out_dir), "-q", *map(str, extra)]
        runner = cli_runner()
        result = runner.invoke(main, args)
        stem = Path(image).name[: -len(".nii.gz")]
        _RUNS[key] = (result, out_dir / f"{stem}{SUFFIX[command]}.nii.gz")
    return _RUNS[key]


def test_every_readme_image_is_covered(data):
    """The data README's table lists the images; every one that is not a mask/label is run here."""
    listed = re.findall(r"^\| (\S+\.nii\.gz) \|", (data / "README.md").read_text(), flags=re.M)
    assert listed, "the README table could not be read"
    images = set()
    for rel in listed:
        stem = Path(rel).name[: -len(".nii.gz")]
        if rel.startswith(("bad_input/", "labelmaps/")):
            continue
        if re.search(r"(_seg|_seg-[\w-]+|-manual|-optic)$", stem):
            continue  # masks and references
        images.add(rel)
    assert images == set(IMAGES)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_contrast_is_read_from_the_real_names(image):
    assert guess_contrast(image) == IMAGES[image][0]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_cli_runs_and_writes_on_the_input_grid(data, out_root, image):
    command = IMAGES[image][1]
    result, out = cli(data, out_root, image, command)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    ref, img = nib.load(data / image), nib.load(out)
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    for key in ("qform_code", "sform_code"):
        assert int(img.header[key]) == int(ref.header[key])
    assert img.get_data_dtype() == np.uint8
    assert np.asarray(img.dataobj).sum() > 0, "the cord was found"


@pytest.mark.parametrize("image, ref, dice_bar, mse_bar, loc_bar", CORD_CASES,
                         ids=[Path(c[0]).name for c in CORD_CASES])
def test_cord_dice(data, out_root, image, ref, dice_bar, mse_bar, loc_bar):
    result, out = cli(data, out_root, image, "sc")
    assert result.exit_code == 0, result.stderr
    d = metrics.dice(np.asarray(nib.load(out).dataobj), np.asarray(load_image(data / ref).dataobj) > 0.5)
    assert d >= dice_bar, f"{image}: cord Dice {d:.3f} < {dice_bar}"


@pytest.mark.parametrize("image, ref, dice_bar, mse_bar, loc_bar", CORD_CASES,
                         ids=[Path(c[0]).name for c in CORD_CASES])
def test_centerline_accuracy(data, image, ref, dice_bar, mse_bar, loc_bar):
    """Sub-voxel centerline vs the reference mask's per-slice centre of mass, in RPI (as bench/accuracy.py)."""
    _, cl = cordseg.detect_centerline(data / image, IMAGES[image][0])
    rpi_ref = to_rpi(load_image(data / ref))
    err = metrics.centerline_errors(cl.rpi_points, rpi_ref.data > 0.5, affine=rpi_ref.affine)
    assert err.mse_mm2 <= mse_bar, f"{image}: centerline MSE {err.mse_mm2:.3f} mm² > {mse_bar}"
    assert err.localization_rate >= loc_bar, f"{image}: localization {err.localization_rate:.3f} < {loc_bar}"
    assert err.n_slices_compared >= loc_bar * err.n_slices_ref


def test_dwi_centerline_csv_against_the_published_optic(data, out_root):
    image = "sct_testing/dmri/dwi_mean.nii.gz"
    result, out = cli(data, out_root, image, "centerline")
    assert result.exit_code == 0, result.stderr
    with open(out.with_name(out.name.replace(".nii.gz", ".csv")), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 4  # measured 4 of the 5 thick slices (the lowest, slice 0, is left out)
    ijk = np.array([[float(r["i"]), float(r["j"]), float(r["k"])] for r in rows])
    ref_img = load_image(data / "sct_testing/dmri/dwi_mean_centerline-optic.nii.gz")
    err = metrics.centerline_errors(ijk, np.asarray(ref_img.dataobj) > 0.5, affine=ref_img.affine,
                                    ref_is_mask=False)
    assert err.n_slices_compared >= 4
    assert err.mse_mm2 <= 0.2, f"MSE {err.mse_mm2:.3f} mm²"  # measured 0.085 (published CNN1 + CoM: 0.163)


# mt0 (5 axial slices of 17 mm, bright grey matter): the lesion network before its real-background stages
# marked ~220 mm3 of grey matter on the lowest slice (1.01x the cord's median), which screening dropped; the
# shipped network marks nothing there.
@pytest.mark.parametrize("image", LESION_FREE)
def test_no_lesion_on_lesion_free_scans(data, out_root, image):
    """unf01's *_lesion-manual files are placeholders with the cord's own intensity: nothing is there."""
    table = out_root / f"{Path(image).name}.lesions.csv"
    result, out = cli(data, out_root, image, "lesion", "--csv", table)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("lesions: 0, total volume 0.0 mm3")
    assert np.asarray(nib.load(out).dataobj).sum() == 0
    lines = table.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("id,volume_mm3,x_mm,y_mm,z_mm,first_slice,last_slice")


def test_grey_matter_is_no_lesion_and_screening_keeps_the_real_ones(data):
    """mt0's bright grey matter is no lesion; on the real MS scan screening removes nothing the network marks.

    Measured with stage 7: its network alone marks one 85 mm3 patch on mt0's third 17 mm slice (peak p 0.61),
    1.10 times the same places of the cord on the other slices (1.12 times its own slice's cord median), which
    screening (local, 1.12) drops; stage 5's network marked nothing there."""
    mt0 = data / "sct_testing/mt/mt0.nii.gz"
    assert cordseg.lesion_table(cordseg.segment_lesions(mt0, "t2s")) == []
    assert len(cordseg.lesion_table(cordseg.segment_lesions(mt0, "t2s", min_contrast=0))) <= 1
    ms = data / "unlabeled/t2_ms_axial.nii.gz"
    raw, screened = (cordseg.lesion_table(cordseg.segment_lesions(ms, "t2", min_contrast=m)) for m in (0, None))
    assert len(screened) == len(raw) and 3 <= len(raw) <= 8  # measured: 4 and 4 (741 mm3; stage 5: 542)


# RPI slices with a centerline point on the unlabelled scans (CLI mask: one voxel per slice)
UNLABELED_SLICES = {
    "unlabeled/t2_ms_axial.nii.gz": (17, 19),  # measured 19/19
    # the cord ends in the field of view: on axial reformats its round section ends at native slice 95-102
    # (by eye), i.e. about 100-106 slices. Measured 111 of 201 (down to slice 90) with the conus model
    # (cordseg.conus); 143 (down to slice 58, along the nerve roots) with CNN1 alone since its stage 5.
    "unlabeled/t2_lumbar.nii.gz": (100, 117),
    # full-field gradient echo of other sites (23 cm field of view, strong coil shading): the cord runs
    # through all 22 slices (checked by eye), and the issue asks for a point on >= 99% of them. Measured
    # 22/22 on both since the windowed second look (centerline.SECOND_LOOK_MM); 21 and 15 without it.
    "unlabeled/sub-01_acq-MTon_MTS.nii.gz": (22, 22),
    "unlabeled/sub-03_acq-MToff_MTS.nii.gz": (22, 22),
}


@pytest.mark.parametrize("image", sorted(UNLABELED_SLICES))
def test_unlabeled_centerline_extent(data, out_root, image):
    lo, hi = UNLABELED_SLICES[image]
    result, out = cli(data, out_root, image, "centerline")
    assert result.exit_code == 0, result.stderr
    n = int(np.asarray(nib.load(out).dataobj).sum())
    assert lo <= n <= hi, f"{image}: centerline on {n} slices, expected {lo}..{hi}"

"""cordseg.qc: the PNG writer, the mosaic's layout and orientation, and the CLI's --qc pictures."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
from pngread import read_png
from click.testing import CliRunner

from cordseg import qc
from cordseg.cli import main
from cordseg.errors import InputError
from cordseg.io import image_like
from cordseg.phantom import make_phantom


def read_rgb(data: bytes) -> np.ndarray:
    """What png_bytes writes: 8-bit RGB, no filter."""
    pixels, palette, _ = read_png(data)
    assert palette is None and pixels.ndim == 3 and pixels.shape[2] == 3
    return pixels


def test_png_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    assert np.array_equal(read_rgb(qc.png_bytes(rgb)), rgb)
    with pytest.raises(ValueError):
        qc.png_bytes(np.zeros((4, 4), np.uint8))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((48, 48, 12), seed=1, curvature=0.0)


def view(picture, k):
    """Axial view k (below the straightened strip, which is one view high)."""
    n = int(round(qc.VIEW_MM / qc.PIXEL_MM))
    r, c = divmod(k, qc.COLUMNS)
    top = (r + 1) * (n + qc.GAP)
    return picture[top:top + n, c * (n + qc.GAP):c * (n + qc.GAP) + n]


def test_one_view_per_cord_slice_with_the_outline_at_the_centre(phantom):
    picture = qc.mosaic(phantom.image, {"cord": phantom.cord})
    n = int(round(qc.VIEW_MM / qc.PIXEL_MM))
    assert picture.shape == (3 * n + 2 * qc.GAP, 10 * n + 9 * qc.GAP, 3)  # the strip, then 12 views: 10 + 2
    for k in range(12):
        v = view(picture, k)
        red = np.argwhere((v == qc.COLOURS["cord"]).all(axis=2))
        assert len(red) > 20
        centre = red.mean(axis=0)
        assert np.allclose(centre, (n - 1) / 2, atol=3)  # the cord's outline around the view's centre
    assert (view(picture, 12) == 40).all()  # the unused cell stays background


def test_views_are_radiological_and_most_superior_first(phantom):
    """A bright marker on the patient's right appears on the left of the view, an anterior one at the top;
    a marker on the top slice only appears in the first view."""
    data = np.asarray(phantom.image.dataobj, np.float32).copy()  # axcodes L,A,S: the RPI grid itself
    cx, cy = [int(round(v)) for v in phantom.centerline[0, :2]]
    data[cx - 12, cy, :] = 50.0  # x grows to the patient's left: cx - 12 is on the right
    data[cx, cy + 12, -1] = 50.0  # y grows anterior; only on the top slice
    img = image_like(data, phantom.image)
    picture = qc.mosaic(img, {"cord": phantom.cord})
    n = int(round(qc.VIEW_MM / qc.PIXEL_MM))
    first, last = view(picture, 0).mean(axis=2), view(picture, 11).mean(axis=2)
    bright = np.argwhere(first >= 250)
    assert (bright[:, 1] < n / 2 - 20).any()  # the right-side marker: left of the view
    assert (bright[:, 0] < n / 2 - 20).any()  # the anterior marker: top of the first (superior) view
    assert not (np.argwhere(last >= 250)[:, 0] < n / 2 - 20).any()
    assert (np.argwhere(last >= 250)[:, 1] < n / 2 - 20).any()


def test_straightened_strip_runs_superior_to_inferior(phantom):
    """The strip on top: one column per PIXEL_MM along the cord, the most superior slice on the left, anterior
    at the top, the cord's outline along its length."""
    data = np.asarray(phantom.image.dataobj, np.float32).copy()
    cx, cy = [int(round(v)) for v in phantom.centerline[-1, :2]]
    data[cx, cy + 12, -1] = 50.0  # anterior to the cord, top slice only
    picture = qc.mosaic(image_like(data, phantom.image), {"cord": phantom.cord})
    plain = qc.mosaic(phantom.image, {"cord": phantom.cord})
    n = int(round(qc.VIEW_MM / qc.PIXEL_MM))
    width = int(round(12 * 1.0 / qc.PIXEL_MM))  # 12 slices of 1 mm
    strip = picture[:n, :width]
    assert (picture[:n, width:] == 40).all()  # nothing beside it
    marker = np.argwhere((strip.mean(axis=2) >= 250) & (plain[:n, :width].mean(axis=2) < 150))
    assert len(marker) and marker[:, 1].max() < width / 12 + 1 and marker[:, 0].max() < n / 2 - 20
    red = (strip == qc.COLOURS["cord"]).all(axis=2)
    assert red.any(axis=0).sum() >= width - 2  # outlined along the whole length
    rows = np.flatnonzero(red.any(axis=1))
    assert abs(rows.mean() - (n - 1) / 2) < 4  # straightened: centred


def test_long_scans_keep_lesion_slices_and_a_cap():
    z_all = np.arange(200)
    chosen = qc._pick_slices(z_all, [7, 150, 151], 60)
    assert len(chosen) == 60 and {7, 150, 151} <= set(chosen)
    assert chosen == sorted(chosen)
    assert qc._pick_slices(np.arange(10), [], 60) == list(range(10))


def test_masks_must_be_on_the_image_grid(phantom, tmp_path):
    other = nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4))
    with pytest.raises(InputError, match="grid"):
        qc.mosaic(phantom.image, {"cord": other})
    empty = image_like(np.zeros(phantom.image.shape, np.uint8), phantom.image)
    with pytest.raises(InputError, match="nothing to show"):
        qc.mosaic(phantom.image, {"cord": empty})
    with pytest.raises(InputError, match="unknown"):
        qc.mosaic(phantom.image, {"grey matter": phantom.cord})


def test_qc_path():
    assert qc.qc_path("out/t2_seg.nii.gz").as_posix() == "out/t2_seg_qc.png"
    assert qc.qc_path("t2_seg.nii").name == "t2_seg_qc.png"


@pytest.mark.slow
def test_cli_qc_pictures(tmp_path):
    ph = make_phantom((48, 48, 24), axcodes=("P", "S", "R"), seed=5, n_lesions=2)  # the model finds both
    src = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(ph.image, src)
    runner = CliRunner()
    for command, out in (("sc", "seg.nii.gz"), ("lesion", "les.nii.gz"), ("centerline", "cl.nii.gz")):
        result = runner.invoke(main, [command, str(src), "-o", str(tmp_path / out), "--qc", "-q"],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        picture = read_rgb((tmp_path / out.replace(".nii.gz", "_qc.png")).read_bytes())
        assert picture.shape[0] > 0 and picture.shape[1] > 0
        colour = {"sc": "cord", "lesion": "lesion", "centerline": "centerline"}[command]
        assert (picture == qc.COLOURS[colour]).all(axis=2).sum() > 0, command
        if command == "lesion":  # the lesions are shown inside the cord's outline
            assert (picture == qc.COLOURS["cord"]).all(axis=2).sum() > 0
    result = runner.invoke(main, ["sc", str(src), "-o", str(tmp_path / "plain.nii.gz"), "-q"])
    assert result.exit_code == 0 and not (tmp_path / "plain_qc.png").exists()


@pytest.mark.slow
def test_cli_lesion_qc_along_a_given_centerline(tmp_path):
    import cordseg

    ph = make_phantom((48, 48, 24), seed=5, n_lesions=2)
    src = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(ph.image, src)
    mask, cl = cordseg.detect_centerline(ph.image, "t2")
    nib.save(mask, tmp_path / "cl.nii.gz")
    again, cl2 = cordseg.centerline_from_mask(src, tmp_path / "cl.nii.gz")
    assert np.array_equal(cl2.z, cl.z) and np.abs(cl2.x - cl.x).max() <= 0.5 and np.abs(cl2.y - cl.y).max() <= 0.5
    assert np.array_equal(np.asarray(again.dataobj), np.asarray(mask.dataobj))
    result = CliRunner().invoke(main, ["lesion", str(src), "-o", str(tmp_path / "les.nii.gz"), "--qc", "-q",
                                       "--centerline", str(tmp_path / "cl.nii.gz")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    picture = read_rgb((tmp_path / "les_qc.png").read_bytes())
    assert (picture == qc.COLOURS["lesion"]).all(axis=2).sum() > 0

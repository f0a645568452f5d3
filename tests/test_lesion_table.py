"""Per-lesion confidence in the lesion table: probability and brightness over the cord, from the Segmenter and
the CLI's --csv."""
import csv

import nibabel as nib
import numpy as np
from click.testing import CliRunner

import pytest

import cordseg
from cordseg.cli import main
from cordseg.lesions import LESION_CSV_HEADER, lesion_table
from cordseg.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


def _bright_model(tmp_path, tiny_onnx, thr="0.8"):
    """A stand-in lesion model (sigmoid of the z-scored patch: everything bright is a 'lesion')."""
    return tiny_onnx(tmp_path / "bright.onnx", op="sigmoid", task="lesion", input_shape=("N", 48, 48, 48, 1),
                     extra={"cordseg_threshold": thr})


def test_rows_carry_probability_and_contrast(tmp_path, phantom, tiny_onnx):
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(phantom.image, path)
    seg = cordseg.Segmenter("t2", lesion_model=_bright_model(tmp_path, tiny_onnx))
    mask, rows = seg.lesion_table(path, min_contrast=0)
    plain = lesion_table(mask)
    assert len(rows) == len(plain) >= 1
    soft = np.asarray(seg.lesions(path, soft=True).dataobj)
    labels = cordseg.metrics.label_lesions(np.asarray(mask.dataobj) > 0)[0]
    for r, p in zip(rows, plain):
        assert (r.id, r.volume_mm3, r.first_slice, r.last_slice) == (p.id, p.volume_mm3, p.first_slice, p.last_slice)
        assert 0.8 - 1e-6 <= r.mean_probability <= r.max_probability <= 1.0
        inside = soft[labels == r.id]
        assert r.max_probability == np.float32(inside.max())
        assert abs(r.mean_probability - float(inside.mean())) < 1e-5
        assert r.contrast is None or r.contrast > 0
    assert any(r.contrast is not None for r in rows)


def test_csv_has_the_confidence_columns(tmp_path, phantom, tiny_onnx):
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(phantom.image, path)
    table = tmp_path / "t.csv"
    res = CliRunner().invoke(main, ["lesion", str(path), "-o", str(tmp_path / "les.nii.gz"), "--csv", str(table),
                                    "--model", str(_bright_model(tmp_path, tiny_onnx)), "--min-contrast", "0", "-q"])
    assert res.exit_code == 0, res.output
    with open(table, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == LESION_CSV_HEADER
    assert rows[0][-4:] == ["mean_probability", "max_probability", "contrast", "local_contrast"]
    body = rows[1:]
    assert body and all(0.8 <= float(r[7]) <= float(r[8]) <= 1.0 for r in body)
    assert all(float(r[9]) > 0 and (r[10] == "" or float(r[10]) > 0) for r in body)


@pytest.mark.parametrize("axial, offset", [(2, 0.0), (0, 0.0), (2, -300.0)])
def test_table_in_the_lesions_and_cords_box_reads_as_the_whole_volume(monkeypatch, axial, offset):
    """lesion_table works in the box of the lesions and the cord, widened by the cord's extent (cheaper than
    whole-volume arrays): the same rows as on the whole volume, for a curved cord, a lesion away from it,
    an image stored with its axial axis first, and an offset image (negative values: the whole volume)."""
    from cordseg import lesions

    rng = np.random.default_rng(3)
    shape = (90, 80, 60)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = 40 + 8 * np.sin(z / 15.0), 35 + 0.15 * z  # the cord's centre drifts from slice to slice
    cord = (x - cx) ** 2 + (y - cy) ** 2 <= 16
    image = 100 + 5 * rng.normal(size=shape) + 60 * cord
    mask = np.zeros(shape, bool)
    mask[cord & (z >= 20) & (z <= 24) & (x > cx)] = True  # in the cord
    mask[70:73, 10:12, 40:43] = True  # away from it
    image[mask] *= 1.3
    image = image + offset
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    if axial == 0:  # the same scan stored S, R, A
        mask, cord, image = (np.moveaxis(a, 2, 0) for a in (mask, cord, image))
        aff = np.array([[0, 0.8, 0, 0], [0, 0, 0.8, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(mask.astype(np.uint8), aff)
    prob = rng.uniform(size=mask.shape).astype(np.float32)
    box = lesions._table_box(mask, cord, axial, image)
    assert (box == tuple(slice(0, n) for n in mask.shape)) == (offset < 0)
    cropped = lesion_table(img, prob=prob, image=image, cord=cord)
    monkeypatch.setattr(lesions, "_table_box", lambda m, c, a, i: tuple(slice(0, n) for n in m.shape))
    whole = lesion_table(img, prob=prob, image=image, cord=cord)
    assert len(cropped) == len(whole) == 2
    assert any(r.local_contrast is not None for r in whole)
    for a, b in zip(cropped, whole):
        assert (a.id, a.volume_mm3, a.first_slice, a.last_slice, a.mean_probability, a.max_probability) == \
            (b.id, b.volume_mm3, b.first_slice, b.last_slice, b.mean_probability, b.max_probability)
        assert np.allclose(a.centroid_mm, b.centroid_mm, atol=1e-9)
        for u, v in ((a.contrast, b.contrast), (a.local_contrast, b.local_contrast)):
            assert (u is None) == (v is None) and (u is None or abs(u - v) < 1e-9)

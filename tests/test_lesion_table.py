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

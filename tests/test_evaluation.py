"""cordseg.evaluation and `cordseg evaluate` on real shared data and on small synthetic images."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cordseg.datasets import shared_data
from cordseg.cli_evaluate import evaluate
from cordseg.errors import InputError
from cordseg.evaluation import (
    RESAMPLED_NOTE,
    discover_pairs,
    evaluate_pair,
    evaluate_pairs,
    format_table,
    read_centerline_csv,
)

DATA = shared_data()
T2 = DATA / "sct_testing" / "t2"


@pytest.fixture(scope="module")
def t2():
    if not (T2 / "t2_seg-manual.nii.gz").exists():
        pytest.skip(f"shared test data not found at {DATA} (it sits beside the repository)")
    return T2


def img(data, affine=None):
    return nib.Nifti1Image(np.asarray(data, np.uint8), np.eye(4) if affine is None else affine)


def strict_json(obj):
    return json.loads(json.dumps(obj, allow_nan=False))


# --------------------------------------------------------------------------- real data


def test_real_cord_dice_matches_published_value(t2):
    row = evaluate_pair(T2 / "t2_seg-deepseg_sc-3d.nii.gz", T2 / "t2_seg-manual.nii.gz", "sc")
    assert round(row["dice"], 3) == 0.981
    assert row["volume_ref_mm3"] == 4275.0 and row["volume_pred_mm3"] == 4285.0
    assert row["rvd"] == pytest.approx(10 / 4275)
    assert row["notes"] == []
    assert all(k == k.lower() for k in row)
    assert strict_json(row) == row


def _world_mse(center_path, mask_path):
    """Independent check in scanner coordinates (t2 is axis-aligned PSR: slices on axis 1)."""
    c, r = nib.load(str(center_path)), nib.load(str(mask_path))
    cd, rd = np.asanyarray(c.dataobj) > 0, np.asanyarray(r.dataobj) > 0

    def world(img, mask, s):
        i0, i2 = np.argwhere(mask[:, s, :]).mean(axis=0)
        return nib.affines.apply_affine(img.affine, [i0, s, i2])

    d2 = [np.sum((world(r, rd, s) - world(c, cd, s)) ** 2)
          for s in range(rd.shape[1]) if rd[:, s].any() and cd[:, s].any()]
    return float(np.mean(d2)), len(d2)


def test_real_centerline_against_cord_mask(t2):
    ref = T2 / "t2_seg-manual.nii.gz"
    row = evaluate_pair(T2 / "t2_centerline-optic.nii.gz", ref, "centerline")
    expected, n = _world_mse(T2 / "t2_centerline-optic.nii.gz", ref)
    assert n == 55
    assert row["centerline_mse_mm2"] == pytest.approx(expected)
    assert row["centerline_mse_mm2"] == pytest.approx(0.2149, abs=1e-4)
    assert row["localization_rate"] == 1.0
    assert (row["n_slices_ref"], row["n_slices_compared"], row["n_slices_missing"], row["n_slices_extra"]) == (
        55, 55, 0, 0)
    # The OptiC CSV (x,y,z voxels in RPI working space) says the same thing as the mask.
    row_csv = evaluate_pair(T2 / "t2_centerline-optic.csv", ref, "centerline")
    assert row_csv["centerline_mse_mm2"] == pytest.approx(row["centerline_mse_mm2"])
    assert row_csv["localization_rate"] == 1.0
    # A centerline reference: distances only, no localization.
    row_c = evaluate_pair(T2 / "t2_centerline-optic.csv", T2 / "t2_centerline-manual.nii.gz", "centerline")
    assert row_c["centerline_mse_mm2"] == 0.0 and row_c["localization_rate"] is None
    assert strict_json(row_c) == row_c


def test_real_fake_lesion_against_itself(t2):
    f = T2 / "t2_fake_lesion_lesion_seg.nii.gz"
    row = evaluate_pair(f, f, "lesion")
    assert row["dice"] == 1.0
    assert (row["n_lesions_pred"], row["n_lesions_ref"]) == (1, 1)
    assert row["lesion_sensitivity"] == 1.0 and row["lesion_precision"] == 1.0
    assert row["volume_ref_mm3"] == pytest.approx(163 * 0.8 ** 3, rel=1e-5)
    assert row["lesion_volumes_ref_mm3"] == pytest.approx([163 * 0.8 ** 3], rel=1e-5)
    assert strict_json(row) == row


def test_real_upsampled_prediction_is_resampled(t2):
    ref_img = nib.load(str(T2 / "t2_seg-manual.nii.gz"))
    data = np.asanyarray(ref_img.dataobj)
    fine = data.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # the same mask on a 0.5 mm grid
    half = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    row = evaluate_pair(img(fine, ref_img.affine @ half), ref_img, "sc")
    assert row["dice"] == 1.0
    assert RESAMPLED_NOTE in row["notes"]


# --------------------------------------------------------------------------- synthetic grids


def block(shape=(12, 12, 12)):
    a = np.zeros(shape, np.uint8)
    a[3:9, 3:9, 2:10] = 1  # 288 voxels
    return a


def test_different_shape_same_lattice_is_resampled_and_cropping_counted():
    ref = block()
    # Prediction: the same mask on a larger grid that starts 2 voxels earlier along x ...
    pred = np.zeros((16, 12, 12), np.uint8)
    pred[2:14] = ref
    pred[0:2, 3:9, 2:10] = 1  # ... plus 96 voxels outside the reference's field of view
    shift = np.eye(4)
    shift[0, 3] = -2.0
    row = evaluate_pair(img(pred, shift), img(ref), "sc")
    assert row["dice"] == 1.0
    assert RESAMPLED_NOTE in row["notes"]
    assert any("96 predicted voxels lie outside" in n for n in row["notes"])
    # Different shapes, identical affines: also just resampled (cropped/padded).
    row = evaluate_pair(img(ref[:, :, :6]), img(ref), "sc")
    assert row["dice"] == pytest.approx(2 * 144 / (144 + 288))
    assert RESAMPLED_NOTE in row["notes"]


def test_non_overlapping_fields_of_view_are_refused():
    far = np.eye(4)
    far[2, 3] = 500.0
    with pytest.raises(InputError, match="fields of view do not overlap"):
        evaluate_pair(img(block(), far), img(block()), "sc")
    # Touching at the boundary without shared volume is no overlap either.
    edge = np.eye(4)
    edge[0, 3] = 12.0
    with pytest.raises(InputError, match="do not overlap"):
        evaluate_pair(img(block(), edge), img(block()), "lesion")


def test_centerline_on_another_grid_is_mapped_and_interpolated():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[9:12, 9:12, :] = 1  # straight cord centred on (10, 10), every 1 mm slice
    pred = np.zeros((20, 20, 10), np.uint8)
    pred[11, 10, :] = 1  # centerline 1 mm off, on 2 mm slices
    row = evaluate_pair(img(pred, np.diag([1.0, 1.0, 2.0, 1.0])), img(ref), "centerline")
    # pred slices land on reference slices 0, 2, ..., 18; the odd ones between are interpolated
    assert (row["n_slices_pred"], row["n_slices_compared"], row["n_slices_missing"]) == (19, 19, 1)
    assert row["centerline_mse_mm2"] == pytest.approx(1.0)
    assert row["localization_rate"] == pytest.approx(19 / 20)
    assert "mapped prediction centerline points onto reference grid" in row["notes"]


def test_centerline_csv_formats(tmp_path):
    ref = np.zeros((20, 20, 6), np.uint8)
    ref[9:12, 9:12, :] = 1
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: working space = native voxels
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(img(ref, aff), str(ref_path))
    (tmp_path / "hdr.csv").write_text("slice,x,y,z\n" + "".join(f"{z},10.5,10,{z}\n" for z in range(6)))
    row = evaluate_pair(tmp_path / "hdr.csv", ref_path, "centerline")
    assert row["centerline_mse_mm2"] == pytest.approx(0.25) and row["localization_rate"] == 1.0
    assert read_centerline_csv(tmp_path / "hdr.csv").shape == (6, 3)
    (tmp_path / "bad.csv").write_text("1,2,3,4\n")
    with pytest.raises(InputError, match="3 columns"):
        evaluate_pair(tmp_path / "bad.csv", ref_path, "centerline")
    (tmp_path / "nohdr.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="x, y and z"):
        read_centerline_csv(tmp_path / "nohdr.csv")
    with pytest.raises(InputError, match="two CSVs"):
        evaluate_pair(tmp_path / "hdr.csv", tmp_path / "hdr.csv", "centerline")
    with pytest.raises(InputError, match="centerline"):
        evaluate_pair(tmp_path / "hdr.csv", ref_path, "sc")
    with pytest.raises(InputError, match="unknown evaluation kind"):
        evaluate_pair(ref_path, ref_path, "cord")


def test_evaluate_pairs_summary_and_volume_specificity():
    empty = np.zeros((8, 8, 8), np.uint8)
    lesion = empty.copy()
    lesion[2:4, 2:4, 2:4] = 1
    pairs = [(img(empty), img(empty)), (img(lesion), img(empty)), (img(empty), img(empty)), (img(empty), img(empty))]
    rows, summary = evaluate_pairs(pairs, "lesion")
    assert [r["n_lesions_pred"] for r in rows] == [0, 1, 0, 0]
    assert summary["n_lesion_free"] == 4 and summary["volume_specificity"] == 0.75
    assert summary["metrics"]["dice"] == {"median": 1.0, "q25": 0.75, "q75": 1.0, "n": 4}
    assert summary["metrics"]["lesion_sensitivity"]["n"] == 0  # undefined everywhere
    assert rows[0]["lesion_sensitivity"] is None
    strict_json({"pairs": rows, "summary": summary})
    text = format_table(rows, summary)
    assert "median" in text and "q75" in text and "volume-wise specificity: 0.7500" in text


def test_median_and_iqr_of_dice():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:, :, :4] = 1
    pairs = []
    for k in (1, 2, 3, 4):  # predictions covering k of the 4 reference slices
        p = np.zeros_like(ref)
        p[:, :, :k] = 1
        pairs.append((img(p), img(ref)))
    rows, summary = evaluate_pairs(pairs, "sc")
    dices = [2 * k / (k + 4) for k in (1, 2, 3, 4)]
    assert [r["dice"] for r in rows] == pytest.approx(dices)
    s = summary["metrics"]["dice"]
    assert s["median"] == pytest.approx(np.median(dices))
    assert (s["q25"], s["q75"]) == pytest.approx(tuple(np.percentile(dices, [25, 75])))


# --------------------------------------------------------------------------- folders


def _write(path, data):
    nib.save(img(data), str(path))
    return path


def test_discover_pairs_two_folders_and_one_folder(tmp_path):
    a, b = tmp_path / "pred", tmp_path / "ref"
    a.mkdir()
    b.mkdir()
    for name in ("s1.nii.gz", "s2.nii.gz", "lonely.nii.gz"):
        _write(a / name, block())
    _write(b / "s1.nii.gz", block())
    _write(b / "s2-manual.nii.gz", block())
    pairs, unmatched = discover_pairs(a, b)
    assert [(p.name, r.name) for p, r in pairs] == [("s1.nii.gz", "s1.nii.gz"), ("s2.nii.gz", "s2-manual.nii.gz")]
    assert [u.name for u in unmatched] == ["lonely.nii.gz"]

    one = tmp_path / "one"
    one.mkdir()
    _write(one / "t2_seg.nii.gz", block())
    _write(one / "t2_seg-manual.nii.gz", block())
    _write(one / "t2.nii.gz", block())
    _write(one / "t1_seg-manual.nii.gz", block())
    pairs, unmatched = discover_pairs(one)
    assert [(p.name, r.name) for p, r in pairs] == [("t2_seg.nii.gz", "t2_seg-manual.nii.gz")]
    assert [u.name for u in unmatched] == ["t1_seg-manual.nii.gz"]

    with pytest.raises(InputError, match="not a folder"):
        discover_pairs(b, a / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no prediction/reference pair found"):
        discover_pairs(empty, b)


# --------------------------------------------------------------------------- CLI


def run(args):
    return CliRunner().invoke(evaluate, [str(a) for a in args])


def test_cli_table_and_json_on_real_pair(t2):
    pred, ref = T2 / "t2_seg-deepseg_sc-3d.nii.gz", T2 / "t2_seg-manual.nii.gz"
    res = run([pred, ref])
    assert res.exit_code == 0, res.output
    assert "dice" in res.stdout and "0.9808" in res.stdout
    res = run([pred, ref, "--json"])
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert round(out["dice"], 3) == 0.981 and out["kind"] == "sc"
    res = run(["--pair", pred, ref, "--pair", T2 / "t2_seg-deepseg_sc-2d.nii.gz", ref, "--json"])
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert [round(r["dice"], 3) for r in out["pairs"]] == [0.981, 1.0]
    assert out["summary"]["metrics"]["dice"]["median"] == pytest.approx((0.98084 + 1) / 2, abs=1e-4)
    res = run(["--pair", pred, ref, "--pair", T2 / "t2_seg-deepseg_sc-2d.nii.gz", ref])
    assert res.exit_code == 0 and "median" in res.stdout and "q25" in res.stdout
    res = run([T2 / "t2_centerline-optic.csv", ref, "--kind", "centerline", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["localization_rate"] == 1.0


def test_cli_folder_mode(tmp_path):
    _write(tmp_path / "a_seg.nii.gz", block())
    _write(tmp_path / "a_seg-manual.nii.gz", block())
    half = block()
    half[:, :, 6:] = 0
    _write(tmp_path / "b_seg.nii.gz", half)
    _write(tmp_path / "b_seg-manual.nii.gz", block())
    res = run([tmp_path, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [Path(r["pred"]).name for r in out["pairs"]] == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert out["summary"]["n_pairs"] == 2


def test_cli_errors_are_one_line_exit_2(tmp_path):
    ref = _write(tmp_path / "ref.nii.gz", block())
    far = np.eye(4)
    far[1, 3] = -300.0
    pred = tmp_path / "far.nii.gz"
    nib.save(img(block(), far), str(pred))
    for args in ([pred, ref], [tmp_path / "missing.nii.gz", ref]):
        res = run(args)
        assert res.exit_code == 2
        assert res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1
        assert res.stderr.startswith("cordseg: error:")
        assert "Traceback" not in res.stderr
    assert "do not overlap" in run([pred, ref]).stderr
    res = run([ref])  # REF missing: usage error, also exit 2
    assert res.exit_code == 2 and "missing REF" in res.stderr

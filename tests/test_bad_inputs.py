"""Every bad input of the runtime issue, through the CLI: one readable line on stderr starting with
"cordseg: error:", a non-zero exit, no traceback, and nothing left in the output folder.
"""
from __future__ import annotations

import io
import os
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

import cordseg
from cordseg.cli import main
from cordseg.errors import CordsegWarning
from cordseg.phantom import make_phantom

COMMANDS = ("sc", "centerline", "lesion")


def invoke(*args):
    runner = cli_runner()
    return runner.invoke(main, [str(a) for a in args])


PROGRESS = re.compile(r"\S+ +\[[#.]+\] +\d+\.\d%")  # a finished stage's bar (stderr is not a tty here)


def assert_clean_error(result, out_dir=None, *fragments):
    """Non-zero exit through sys.exit (not an exception), one error line, no traceback, no output file.

    The error line is the last line of stderr; the only other lines allowed are the progress bars of the
    stages that ran before the problem showed (e.g. "no spinal cord found" comes after CNN1).
    """
    assert result.exit_code != 0, result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.splitlines()
    assert err.endswith("\n") and lines and lines[-1].startswith("cordseg: error:"), err
    # warnings raised before the error (e.g. a repaired header) are shown too, each on its own line
    assert all(PROGRESS.fullmatch(ln) or ln.startswith("cordseg: warning:") for ln in lines[:-1]), err
    for text in fragments:
        assert text in lines[-1], err
    if out_dir is not None:
        assert sorted(p.name for p in out_dir.iterdir()) == [], "a failed run left files behind"


def assert_ok(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((40, 40, 16), seed=1)


def save(path, data, affine=None, header=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine, header), path)
    return path


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_file(tmp_path, out_dir, command):
    assert_clean_error(invoke(command, tmp_path / "nope_T2w.nii.gz", "-o", out_dir), out_dir, "file not found")


def test_not_a_nifti(tmp_path, out_dir):
    fake = tmp_path / "fake_T2w.nii.gz"
    fake.write_text("this is a text file, not an image\n")
    assert_clean_error(invoke("sc", fake, "-o", out_dir), out_dir, "fake_T2w.nii.gz", "NIfTI")
    other = tmp_path / "notes_T2w.txt"
    other.write_text("hello")
    assert_clean_error(invoke("sc", other, "-o", out_dir), out_dir, "not a NIfTI")


def test_truncated_nifti(tmp_path, out_dir, phantom):
    good = tmp_path / "good_T2w.nii"
    nib.save(phantom.image, good)
    cut = tmp_path / "cut_T2w.nii"
    cut.write_bytes(good.read_bytes()[: 352 + 1000])  # header intact, data cut short
    assert_clean_error(invoke("sc", cut, "-o", out_dir), out_dir, "cut_T2w.nii")


def test_empty_file(tmp_path, out_dir):
    empty = tmp_path / "empty_T2w.nii.gz"
    empty.touch()
    assert_clean_error(invoke("sc", empty, "-o", out_dir), out_dir, "empty")


def test_folder_as_input(tmp_path, out_dir):
    folder = tmp_path / "scan_T2w.nii.gz"
    folder.mkdir()
    assert_clean_error(invoke("sc", folder, "-o", out_dir), out_dir, "folder")


def test_zero_length_dimension(tmp_path, out_dir):
    path = save(tmp_path / "flat_T2w.nii.gz", np.zeros((10, 0, 5), np.float32))
    assert_clean_error(invoke("sc", path, "-o", out_dir), out_dir, "zero-length")


# --------------------------------------------------------------------------- 4D, voxel types, headers


def test_4d_several_volumes(tmp_path, out_dir, phantom):
    vol = np.asarray(phantom.image.dataobj)
    path = save(tmp_path / "series_T2w.nii.gz", np.stack([vol, vol * 0.9, vol * 1.1], axis=-1),
                phantom.image.affine)
    assert_clean_error(invoke("sc", path, "-o", out_dir), out_dir, "3 volumes")
    assert_clean_error(invoke("sc", path, "-o", out_dir, "--volume", "3"), out_dir, "3 volumes")
    assert_clean_error(invoke("sc", path, "-o", out_dir, "--volume", "-1"), out_dir)
    result = invoke("centerline", path, "-o", out_dir, "--volume", "0", "-q")
    assert_ok(result)
    out = nib.load(out_dir / "series_T2w_centerline.nii.gz")
    assert out.shape == vol.shape  # the 3D grid of the volume taken
    np.testing.assert_array_equal(out.affine, phantom.image.affine)
    assert np.asarray(out.dataobj).sum() >= 14  # cord on (nearly) every one of the 16 slices


def test_4d_mean_volume(tmp_path, out_dir, phantom):
    vol = np.asarray(phantom.image.dataobj)
    path = save(tmp_path / "series_T2w.nii.gz", np.stack([vol * 3, vol * 0.9, vol * 1.1], axis=-1),
                phantom.image.affine)
    assert_ok(invoke("sc", path, "-o", out_dir, "--volume", "mean", "-q"))
    out = nib.load(out_dir / "series_T2w_seg.nii.gz")
    assert out.shape == vol.shape and np.asarray(out.dataobj).any()
    np.testing.assert_array_equal(out.affine, phantom.image.affine)
    (out_dir / "series_T2w_seg.nii.gz").unlink()
    assert_clean_error(invoke("sc", path, "-o", out_dir, "--volume", "middle"), out_dir, "neither a volume")


def test_4d_single_volume_is_taken_as_3d(tmp_path, out_dir, phantom):
    path = save(tmp_path / "one_T2w.nii.gz", np.asarray(phantom.image.dataobj)[..., None], phantom.image.affine)
    assert_ok(invoke("centerline", path, "-o", out_dir, "-q"))
    assert (out_dir / "one_T2w_centerline.nii.gz").exists()


def test_volume_option_on_a_3d_image(tmp_path, out_dir, phantom):
    path = tmp_path / "plain_T2w.nii.gz"
    nib.save(phantom.image, path)
    assert_clean_error(invoke("sc", path, "-o", out_dir, "--volume", "2"), out_dir, "volume 2")


def test_rgb_shared(shared_data, out_dir):
    assert_clean_error(invoke("sc", shared_data / "bad_input" / "rgb.nii.gz", "-c", "t2", "-o", out_dir),
                       out_dir, "RGB")


def test_rgb_and_complex_made_here(tmp_path, out_dir, phantom):
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = save(tmp_path / "colour_T2w.nii.gz", rgb)
    assert_clean_error(invoke("sc", path, "-o", out_dir), out_dir, "RGB")
    cplx = np.asarray(phantom.image.dataobj).astype(np.complex64)
    path = save(tmp_path / "cplx_T2w.nii.gz", cplx, phantom.image.affine)
    assert_clean_error(invoke("sc", path, "-o", out_dir), out_dir, "complex")


def test_bad_quaternion(shared_data, out_dir):
    path = shared_data / "bad_input" / "bad_quaternion.nii.gz"  # 2x3x4x5, broken qform, valid sform
    assert_clean_error(invoke("sc", path, "-c", "t2", "-o", out_dir), out_dir, "5 volumes")
    # One volume: a 2x3x4 image is far too small to hold a cord; either a result on its grid or one clean
    # error (currently "no spinal cord found" after the header is repaired from the sform).
    result = invoke("sc", path, "-c", "t2", "-o", out_dir, "--volume", "0")
    if result.exit_code == 0:
        out = nib.load(out_dir / "bad_quaternion_seg.nii.gz")
        assert out.shape == (2, 3, 4)
    else:
        assert_clean_error(result, out_dir)


def test_broken_orientation_header_without_fallback(tmp_path, out_dir, phantom):
    img = nib.Nifti1Image(np.asarray(phantom.image.dataobj), phantom.image.affine)
    img.set_sform(None, code=0)
    img.set_qform(phantom.image.affine, code=1)
    path = tmp_path / "broken_T2w.nii"
    nib.save(img, path)
    # nibabel will not write an invalid quaternion itself: patch it into the file (b²+c²+d² > 1)
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = 0.9, 0.9, 0.9
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    assert_clean_error(invoke("sc", path, "-o", out_dir), out_dir, "orientation")


# --------------------------------------------------------------------------- voxel values


def test_nan_and_inf_voxels_warn_and_work(tmp_path, out_dir, phantom):
    data = np.asarray(phantom.image.dataobj).copy()
    data[0, 0, 0], data[1, 2, 3], data[5, 5, 5] = np.nan, np.inf, -np.inf
    path = save(tmp_path / "holes_T2w.nii.gz", data, phantom.image.affine)
    result = invoke("sc", path, "-o", out_dir, "-q")
    assert_ok(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cordseg: warning:") and "3 voxel(s)" in lines[0]
    assert (out_dir / "holes_T2w_seg.nii.gz").exists()
    with pytest.warns(CordsegWarning, match="NaN or infinite"):
        _, cl = cordseg.detect_centerline(path)
    assert len(cl.z) >= 14


@pytest.mark.parametrize("command", COMMANDS)
def test_all_zero_image(tmp_path, out_dir, phantom, command):
    path = save(tmp_path / "blank_T2w.nii.gz", np.zeros(phantom.image.shape, np.float32), phantom.image.affine)
    assert_clean_error(invoke(command, path, "-o", out_dir), out_dir, "no spinal cord found")


def test_pure_noise_image(tmp_path, out_dir, phantom):
    noise = np.random.default_rng(0).normal(100, 1, phantom.image.shape).astype(np.float32)
    path = save(tmp_path / "noise_T2w.nii.gz", noise, phantom.image.affine)
    result = invoke("centerline", path, "-o", out_dir)
    if result.exit_code != 0:
        assert_clean_error(result, out_dir, "no spinal cord found")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_two_thick_slices(shared_data, out_dir, command):
    path = shared_data / "bad_input" / "two_slices_5mm_T2star.nii.gz"  # 45x45x2, 4.98x4.98x37.5 mm
    result = invoke(command, path, "-o", out_dir, "-q")
    if result.exit_code != 0:  # a clean error is acceptable ...
        assert_clean_error(result, out_dir)
        return
    assert_ok(result)  # ... or a result on the input grid (measured: all three commands run)
    suffix = {"sc": "_seg", "centerline": "_centerline", "lesion": "_lesionseg"}[command]
    out = nib.load(out_dir / f"two_slices_5mm_T2star{suffix}.nii.gz")
    ref = nib.load(path)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)


def test_single_slice_image(tmp_path, out_dir, phantom):
    one = np.asarray(phantom.image.dataobj)[:, :, 8:9]
    path = save(tmp_path / "slice_T2w.nii.gz", one, phantom.image.affine)
    result = invoke("sc", path, "-o", out_dir, "-q")
    if result.exit_code != 0:
        assert_clean_error(result, out_dir)
    else:
        assert nib.load(out_dir / "slice_T2w_seg.nii.gz").shape == one.shape


# --------------------------------------------------------------------------- outputs


@pytest.fixture
def good(tmp_path, phantom):
    path = tmp_path / "good_T2w.nii.gz"
    nib.save(phantom.image, path)
    return path


def test_output_folder_does_not_exist(tmp_path, good):
    missing = tmp_path / "no" / "such" / "dir"
    assert_clean_error(invoke("centerline", good, "-o", missing / "x.nii.gz", "-q"), None, "does not exist")
    assert not (tmp_path / "no").exists()


def test_file_used_as_output_folder(tmp_path, good):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert_clean_error(invoke("centerline", good, "-o", blocker / "x.nii.gz", "-q"), None)
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write in read-only folders")
def test_read_only_output_folder(tmp_path, good):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_clean_error(invoke("sc", good, "-o", ro, "-q"), ro, "permission")
    finally:
        ro.chmod(0o700)


def test_output_path_equal_to_the_input(good):
    before = good.read_bytes()
    assert_clean_error(invoke("sc", good, "-o", good, "-q"), None, "overwrite the input")
    assert good.read_bytes() == before


def test_output_name_that_is_not_nifti(tmp_path, good, out_dir):
    assert_clean_error(invoke("centerline", good, "-o", out_dir / "mask.txt", "-q"), out_dir, ".nii")


def test_lesion_csv_in_a_missing_folder_leaves_nothing(tmp_path, good, out_dir):
    result = invoke("lesion", good, "-o", out_dir, "--csv", tmp_path / "nowhere" / "l.csv", "-q")
    assert result.exit_code != 0
    assert sorted(p.name for p in out_dir.iterdir()) == []


# --------------------------------------------------------------------------- options and models


def test_bad_smoothness(good, out_dir):
    for value in ("-1", "nan", "inf"):
        assert_clean_error(invoke("centerline", good, "-o", out_dir, f"--smoothness={value}"), out_dir,
                           "--smoothness")


def test_bad_model_files(tmp_path, good, out_dir, tiny_onnx):
    assert_clean_error(invoke("sc", good, "-o", out_dir, "--model", tmp_path / "none.onnx"), out_dir, "not found")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    assert_clean_error(invoke("sc", good, "-o", out_dir, "--model", junk), out_dir, "junk.onnx")
    plain = tiny_onnx(tmp_path / "plain.onnx", metadata={})
    assert_clean_error(invoke("sc", good, "-o", out_dir, "--model", plain), out_dir, "not a cordseg model")
    ctr = tiny_onnx(tmp_path / "ctr.onnx", task="centerline")
    assert_clean_error(invoke("sc", good, "-o", out_dir, "--model", ctr), out_dir, "not a 'sc' model")


def test_contrast_without_a_model(good, out_dir):
    # the shipped lesion model serves t2 and t2s: lesions on a dwi image have no model
    assert_clean_error(invoke("lesion", good, "-c", "dwi", "-o", out_dir), out_dir, "no 'lesion' model")


def test_model_whose_input_disagrees_with_its_metadata(tmp_path, good, out_dir, tiny_onnx):
    wrong = tiny_onnx(tmp_path / "wrong.onnx", task="sc", input_shape=("N", 1, 64, 64, 48))  # says NXYZC
    assert_clean_error(invoke("sc", good, "-o", out_dir, "--model", wrong), out_dir, "wrong.onnx")


def test_no_warning_on_a_clean_image(good):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CordsegWarning)
        cordseg.detect_centerline(good)


def test_threshold_out_of_range_is_refused_before_any_work(tmp_path, good, out_dir):
    for value in ("2", "0", "nan"):
        assert_clean_error(invoke("sc", good, "-o", out_dir, "--threshold", value, "-q"), out_dir, "threshold")


def test_output_folder_missing_is_refused_before_any_work(tmp_path, good):
    result = invoke("sc", good, "-o", tmp_path / "nowhere" / "x_seg.nii.gz", "-q")
    assert_clean_error(result, None, "does not exist")
    assert "[" not in result.stderr  # no stage ran


def test_bids_suffix_wins_over_other_name_parts():
    from cordseg.api import guess_contrast

    assert guess_contrast("sub-01_acq-t1_T2w.nii.gz") == "t2"
    assert guess_contrast("sub-01_acq-gre_T1w.nii.gz") == "t1"


def test_api_rejects_bad_smoothness_and_threshold(good):
    import cordseg

    with pytest.raises(cordseg.InputError):
        cordseg.detect_centerline(good, smoothness=-1)
    with pytest.raises(cordseg.InputError):
        cordseg.segment_cord(good, threshold=1.5)

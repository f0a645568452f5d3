"""cordseg.io: every bad input becomes an InputError naming the file; outputs sit on the input grid."""
import gzip
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cordseg.datasets import shared_data
from cordseg import io as cio
from cordseg.errors import CordsegWarning, InputError, OutputError
from cordseg.io import default_output_path, load_image, save_like

SHARED = shared_data()
BAD = SHARED / "bad_input"


def shared_file(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data file {path} is not available (the tests expect ../shared/data beside the repo)")
    return path


def oblique_affine():
    """A rotated (oblique) affine with anisotropic voxels."""
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.8, 0.9, 3.0])
    aff[:3, 3] = [-30.5, 12.25, 40.0]
    return aff


def write(path, data, affine=None, *, qcode=1, scode=1, dtype=None, cls=nib.Nifti1Image):
    affine = np.eye(4) if affine is None else affine
    img = cls(data, affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def raw_header(path):
    """The header as stored in the file (nibabel's loaded header has scaling consumed)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return nib.Nifti1Header.from_fileobj(fh)


FORM_KEYS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
             "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")


# --------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: file not found"):
        load_image(tmp_path / "nothere.nii.gz")


def test_not_a_nifti_name(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: not a NIfTI file"):
        load_image(path)


def test_not_a_nifti_content(tmp_path):
    path = tmp_path / "fake.nii"
    path.write_bytes(b"this is not an image" * 40)
    with pytest.raises(InputError, match=r"fake\.nii: not a readable NIfTI file"):
        load_image(path)
    gz = tmp_path / "fake.nii.gz"
    gz.write_bytes(b"plain bytes, not gzip" * 40)
    with pytest.raises(InputError, match=r"fake\.nii\.gz: not a readable NIfTI file"):
        load_image(gz)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(InputError, match=r"empty\.nii\.gz: the file is empty"):
        load_image(path)


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "scan.nii"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        load_image(folder)


def test_truncated_data(tmp_path):
    full = write(tmp_path / "full.nii", np.ones((20, 20, 10), np.float32))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"cut\.nii: .*(truncated|not a readable)"):
        load_image(cut)


def test_zero_length_dimension(tmp_path):
    path = write(tmp_path / "flat.nii", np.zeros((4, 0, 3), np.float32))
    with pytest.raises(InputError, match=r"flat\.nii: has a zero-length dimension \(shape 4x0x3\)"):
        load_image(path)


def test_4d_several_volumes_refused_with_count(tmp_path):
    path = write(tmp_path / "dwi.nii.gz", np.zeros((5, 6, 7, 3), np.float32))
    with pytest.raises(InputError, match=r"dwi\.nii\.gz: is a 4D image with 3 volumes.*0 to 2"):
        load_image(path)


def test_4d_volume_is_zero_based(tmp_path):
    data = np.stack([np.full((5, 6, 7), v, np.int16) for v in (10, 20, 30)], axis=-1)
    path = write(tmp_path / "dwi.nii.gz", data)
    for index, value in enumerate((10, 20, 30)):
        img = load_image(path, volume=index)
        assert img.shape == (5, 6, 7)
        assert np.all(img.get_fdata() == value)
    with pytest.raises(InputError, match=r"volume 3 does not exist; the image has 3 volumes"):
        load_image(path, volume=3)
    with pytest.raises(InputError, match="volume -1 does not exist"):
        load_image(path, volume=-1)


def test_4d_mean_leaves_out_bright_b0_volumes_without_bvals(tmp_path):
    data = np.stack([np.full((5, 6, 7), v, np.float32) for v in (100, 40, 44, 42, 95)], axis=-1)
    img = load_image(write(tmp_path / "dwi.nii.gz", data), volume="mean")
    assert img.shape == (5, 6, 7) and np.allclose(img.get_fdata(), 42.0)
    assert "mean of 3 of 5 volumes" in img.extra["cordseg_volumes"]
    alike = np.stack([np.full((5, 6, 7), v, np.float32) for v in (10, 11, 12)], axis=-1)  # e.g. fMRI
    assert np.allclose(load_image(write(tmp_path / "bold.nii.gz", alike), volume="mean").get_fdata(), 11.0)


def test_4d_mean_follows_the_bval_file(tmp_path):
    data = np.stack([np.full((5, 6, 7), v, np.float32) for v in (10, 20, 30, 40)], axis=-1)
    path = write(tmp_path / "sub-01_dwi.nii.gz", data)
    (tmp_path / "sub-01_dwi.bval").write_text("0 1000 1000 0\n")
    img = load_image(path, volume="mean")
    assert np.allclose(img.get_fdata(), 25.0) and "2 of 4 volumes with b > 50" in img.extra["cordseg_volumes"]
    (tmp_path / "sub-01_dwi.bval").write_text("0 1000\n")  # not one value per volume: brightness decides
    assert np.allclose(load_image(path, volume="mean").get_fdata(), 20.0)  # 40 > 1.5 x the median 25
    assert load_image(write(tmp_path / "t2.nii.gz", data[..., 0]), volume="mean").shape == (5, 6, 7)
    with pytest.raises(InputError, match="an integer or 'mean'"):
        load_image(path, volume="median")


def test_4d_single_volume_squeezed(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7, 1)
    img = load_image(write(tmp_path / "one.nii.gz", data))
    assert img.shape == (5, 6, 7)
    assert np.array_equal(img.get_fdata(), data[..., 0])


def test_volume_on_3d_image(tmp_path):
    path = write(tmp_path / "t2.nii.gz", np.ones((4, 4, 4), np.float32))
    assert load_image(path, volume=0).shape == (4, 4, 4)
    with pytest.raises(InputError, match="the image is 3D"):
        load_image(path, volume=1)


def test_rgb_real_file():
    path = shared_file("bad_input/rgb.nii.gz")
    with pytest.raises(InputError, match=r"rgb\.nii\.gz: colour \(RGB\) voxels are not supported"):
        load_image(path)


def test_rgb_built(tmp_path):
    rgb = np.zeros((4, 4, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "colour.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(InputError, match="colour"):
        load_image(path)


def test_complex_voxels(tmp_path):
    data = (np.ones((4, 4, 3)) * (1 + 2j)).astype(np.complex64)
    path = write(tmp_path / "phase.nii.gz", data)
    with pytest.raises(InputError, match=r"phase\.nii\.gz: complex voxels are not supported"):
        load_image(path)
    with pytest.raises(InputError, match="complex"):
        load_image(nib.Nifti1Image(data, np.eye(4)))


def test_bad_quaternion_real_file():
    path = shared_file("bad_input/bad_quaternion.nii.gz")
    # It is also 4D (5 volumes): without a volume it is refused for that.
    with pytest.raises(InputError, match=r"bad_quaternion\.nii\.gz: is a 4D image with 5 volumes"):
        load_image(path)
    raw = nib.load(str(path))
    with pytest.raises(ValueError):
        raw.header.get_qform()  # the stored quaternion really is invalid
    with pytest.warns(CordsegWarning, match="qform header is invalid.*using the sform"):
        img = load_image(path, volume=2)
    sform = raw.header.get_sform()
    assert img.shape == (2, 3, 4)
    assert np.allclose(img.affine, sform)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert np.allclose(img.header.get_qform(), sform)  # repaired, now readable
    assert np.allclose(img.get_fdata(), raw.dataobj[..., 2])


def test_broken_quaternion_without_sform_refused(tmp_path):
    path = write(tmp_path / "q.nii.gz", np.ones((3, 3, 3), np.float32), qcode=1, scode=0)
    img = nib.load(str(path))
    hdr = img.header.copy()
    hdr["quatern_b"], hdr["quatern_d"] = 1.0, 0.5  # b²+c²+d² > 1
    broken = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), None, hdr)
    with pytest.raises(InputError, match="orientation header is broken"):
        load_image(broken)


def test_singular_affine_refused(tmp_path):
    singular = np.diag([1.0, 0.0, 1.0, 1.0])
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
    img.header.set_sform(singular, code=2)
    img.header.set_qform(np.eye(4), code=0)
    with pytest.raises(InputError, match="orientation header is broken"):
        load_image(img)


def test_singular_sform_falls_back_on_qform():
    qform = oblique_affine()
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), qform)
    img.header.set_qform(qform, code=1)
    img.header.set_sform(np.zeros((4, 4)), code=2)
    with pytest.warns(CordsegWarning, match="sform header is invalid"):
        out = load_image(img)
    assert np.allclose(out.affine, qform, atol=1e-5)


def test_nan_and_inf_set_to_zero_with_warning(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0], data[1, 2, 3], data[3, 3, 3] = np.nan, np.inf, -np.inf
    path = write(tmp_path / "nan.nii.gz", data)
    with pytest.warns(CordsegWarning, match=r"nan\.nii\.gz: 3 voxel\(s\) were NaN or infinite"):
        img = load_image(path)
    out = img.get_fdata()
    assert out[0, 0, 0] == 0 and out[1, 2, 3] == 0 and out[3, 3, 3] == 0
    assert out.sum() == 64 - 3


def test_all_zero_image_loads(tmp_path):
    path = write(tmp_path / "zeros.nii.gz", np.zeros((6, 6, 4), np.int16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(path)
    assert img.shape == (6, 6, 4) and not np.any(img.get_fdata())


def test_two_slices_real_file():
    path = shared_file("bad_input/two_slices_5mm_T2star.nii.gz")
    raw = nib.load(str(path))
    img = load_image(path)
    assert img.shape == (45, 45, 2)
    assert img.get_data_dtype() == np.float32 and np.asanyarray(img.dataobj).dtype == np.float32
    assert np.array_equal(np.asanyarray(img.dataobj), raw.get_fdata().astype(np.float32))
    assert np.array_equal(img.affine, raw.affine)
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 2


def test_scaling_applied_and_header_codes_kept(tmp_path):
    aff = oblique_affine()
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=2)
    img.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    out = load_image(path)
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.float32
    assert np.array_equal(data, np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 2 + 10)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert np.allclose(out.affine, aff, atol=1e-6)


def test_in_memory_image_and_nifti2(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    img = nib.Nifti2Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = load_image(img)
    assert isinstance(out, nib.Nifti2Image)
    assert np.array_equal(np.asanyarray(out.dataobj), data)
    path = tmp_path / "n2.nii"
    nib.save(img, str(path))
    assert isinstance(load_image(path), nib.Nifti2Image)


def test_input_image_not_modified():
    data = np.full((3, 3, 3), np.nan, np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    with pytest.warns(CordsegWarning):
        load_image(img)
    assert np.all(np.isnan(data))


def test_2d_image_becomes_single_slice(tmp_path):
    path = write(tmp_path / "slice.nii.gz", np.ones((7, 5), np.float32))
    assert load_image(path).shape == (7, 5, 1)


# --------------------------------------------------------------------------- save_like


def make_reference(tmp_path, affine_q, affine_s, qcode, scode, shape=(6, 5, 4)):
    img = nib.Nifti1Image(np.zeros(shape, np.int16), affine_s)
    img.header.set_qform(affine_q, code=qcode)
    img.header.set_sform(affine_s, code=scode)
    path = tmp_path / "ref.nii.gz"
    nib.save(img, str(path))
    return path


def test_save_like_keeps_grid_and_both_codes(tmp_path):
    aff_q = oblique_affine()
    aff_s = aff_q.copy()
    aff_s[:3, 3] += [1.5, -2.0, 0.25]  # sform deliberately differs from qform
    ref_path = make_reference(tmp_path, aff_q, aff_s, qcode=1, scode=2)
    ref = load_image(ref_path)
    mask = np.zeros(ref.shape, bool)
    mask[1:3, 2:4, 1] = True
    out = save_like(mask, ref, tmp_path / "mask.nii.gz")
    assert out == tmp_path / "mask.nii.gz"

    stored, written = raw_header(ref_path), raw_header(out)
    for key in FORM_KEYS:
        assert np.array_equal(stored[key], written[key]), key
    assert np.array_equal(stored["pixdim"][:4], written["pixdim"][:4])
    back = nib.load(str(out))
    assert back.shape == ref.shape
    assert np.array_equal(back.affine, nib.load(str(ref_path)).affine)
    assert np.allclose(back.header.get_qform(), aff_q, atol=1e-5)
    assert np.allclose(back.header.get_sform(), aff_s, atol=1e-5)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(back.dataobj), mask.astype(np.uint8))


def test_save_like_qform_only_reference(tmp_path):
    aff = oblique_affine()
    ref_path = make_reference(tmp_path, aff, aff, qcode=1, scode=0)
    ref = load_image(ref_path)
    out = save_like(np.ones(ref.shape), ref, tmp_path / "m.nii")
    written = raw_header(out)
    assert int(written["qform_code"]) == 1 and int(written["sform_code"]) == 0
    assert np.allclose(nib.load(str(out)).affine, aff, atol=1e-5)


def test_save_like_soft_map_float32_exact(tmp_path):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    ref.header.set_slope_inter(3.0, 1.0)  # a stale scaling must not leak into the output
    soft = np.random.default_rng(1).uniform(0, 1, ref.shape).astype(np.float32)
    out = save_like(soft, ref, tmp_path / "soft.nii.gz", dtype=np.float32)
    hdr = raw_header(out)
    assert hdr.get_data_dtype() == np.float32
    assert hdr["scl_slope"] in (0.0, 1.0) or np.isnan(hdr["scl_slope"])
    assert not hdr["scl_inter"] or np.isnan(hdr["scl_inter"])
    assert np.array_equal(np.asanyarray(nib.load(str(out)).dataobj), soft)


def test_save_like_round_trip_through_load(tmp_path):
    ref = load_image(make_reference(tmp_path, oblique_affine(), oblique_affine(), 1, 1))
    labels = np.random.default_rng(2).integers(0, 3, ref.shape)
    out = save_like(labels, ref, tmp_path / "labels.nii.gz")
    assert np.array_equal(load_image(out).get_fdata(), labels)


def test_save_like_replaces_existing_output(tmp_path):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    target = tmp_path / "seg.nii.gz"
    save_like(np.zeros(ref.shape), ref, target)
    save_like(np.ones(ref.shape), ref, target)
    assert np.all(nib.load(str(target)).get_fdata() == 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz", "seg.nii.gz"]


def test_save_like_refuses_wrong_shape_values_and_names(tmp_path):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    with pytest.raises(OutputError, match="shape"):
        save_like(np.zeros((2, 2, 2)), ref, tmp_path / "a.nii.gz")
    with pytest.raises(OutputError, match="do not fit the output type uint8"):
        save_like(np.full(ref.shape, 300), ref, tmp_path / "b.nii.gz")
    with pytest.raises(OutputError, match=r"must end in \.nii or \.nii\.gz"):
        save_like(np.zeros(ref.shape), ref, tmp_path / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz"]


def test_save_like_missing_folder(tmp_path):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    with pytest.raises(OutputError, match="does not exist"):
        save_like(np.zeros(ref.shape), ref, tmp_path / "no" / "such" / "out.nii.gz")


def test_save_like_unwritable_folder(tmp_path, monkeypatch):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    folder = tmp_path / "locked"
    folder.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Root ignores folder permissions, so simulate the refusal where the file is created.
    monkeypatch.setattr(cio.os, "open", denied)
    with pytest.raises(OutputError, match="permission denied"):
        save_like(np.zeros(ref.shape), ref, folder / "out.nii.gz")
    monkeypatch.undo()
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into read-only folders")
def test_save_like_read_only_folder(tmp_path):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            save_like(np.zeros(ref.shape), ref, folder / "out.nii.gz")
    finally:
        folder.chmod(0o700)


def test_save_like_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    ref = load_image(make_reference(tmp_path, np.eye(4), np.eye(4), 1, 1))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def half_write(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cio.nib, "save", half_write)
    with pytest.raises(OutputError, match="No space left on device"):
        save_like(np.zeros(ref.shape), ref, out_dir / "seg.nii.gz")
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- default_output_path


def test_default_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = Path("/data/sub-01_T2w.nii.gz")
    assert default_output_path(src, None, "_seg") == tmp_path / "sub-01_T2w_seg.nii.gz"
    folder = tmp_path / "results"
    folder.mkdir()
    assert default_output_path(src, folder, "_seg") == folder / "sub-01_T2w_seg.nii.gz"
    assert default_output_path(str(src), str(folder), "_lesionseg") == folder / "sub-01_T2w_lesionseg.nii.gz"
    assert default_output_path(src, "mine.nii", "_seg") == Path("mine.nii")
    assert default_output_path("scan.NII", None, "_seg") == tmp_path / "scan_seg.nii.gz"
    assert default_output_path("a.b.nii", None, "") == tmp_path / "a.b.nii.gz"


def test_default_output_path_refuses_input(tmp_path, monkeypatch):
    src = write(tmp_path / "t2.nii.gz", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        default_output_path(src, src, "_seg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        default_output_path(src, "./t2.nii.gz", "_seg")
    # Empty suffix into the input's own folder would also overwrite it.
    with pytest.raises(OutputError):
        default_output_path(src, tmp_path, "")

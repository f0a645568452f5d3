"""The `cordseg` command line on small phantoms: outputs, names, options, messages.

Most runs go through click's CliRunner (in-process, fast); one goes through the installed `cordseg` entry
point in a subprocess, as a user runs it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

from cordseg import metrics
from cordseg.api import lesion_table
from cordseg.cli import main

CSV_HEADER = ["slice", "x", "y", "z", "i", "j", "k", "x_mm", "y_mm", "z_mm"]
LESION_HEADER = ["id", "volume_mm3", "x_mm", "y_mm", "z_mm", "first_slice", "last_slice"]  # then optional columns


def invoke(*args, env=None):
    result = cli_runner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result, result.stdout, result.stderr


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def phantom(psr_phantom):
    return psr_phantom


@pytest.fixture
def t2w(tmp_path, phantom):
    """The phantom saved under a BIDS name in its own folder (contrast t2 read from the name)."""
    d = tmp_path / "in"
    d.mkdir()
    path = d / "sub-01_T2w.nii.gz"
    nib.save(phantom.image, path)
    return path


def assert_on_grid(out_path, ref_path):
    out, ref = nib.load(out_path), nib.load(ref_path)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    for key in ("qform_code", "sform_code"):
        assert int(out.header[key]) == int(ref.header[key])
    return out


# --------------------------------------------------------------------------- sc


@pytest.mark.slow
def test_sc_output_folder(tmp_path, t2w, phantom):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = digest(t2w)
    result, stdout, stderr = invoke("sc", t2w, "-o", out_dir)
    assert result.exit_code == 0, stderr
    target = out_dir / "sub-01_T2w_seg.nii.gz"
    seg = assert_on_grid(target, t2w)
    assert seg.get_data_dtype() == np.uint8
    assert metrics.dice(np.asarray(seg.dataobj), np.asarray(phantom.cord.dataobj)) >= 0.85  # measured 0.93
    assert re.fullmatch(r"cord: \d+ mm3 -> .*sub-01_T2w_seg\.nii\.gz\n", stdout)
    # progress (not a tty: one line per finished stage) goes to stderr, not stdout
    assert "centerline" in stderr and "100.0%" in stderr and "error" not in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [target.name]  # no temporary file left behind
    assert digest(t2w) == before  # the input is never touched


def test_sc_output_file_and_soft(tmp_path, t2w):
    out = tmp_path / "prob.nii"  # plain .nii works too
    result, stdout, stderr = invoke("sc", t2w, "-o", out, "--soft", "-q")
    assert result.exit_code == 0, stderr
    soft = assert_on_grid(out, t2w)
    assert soft.get_data_dtype() == np.float32
    p = np.asarray(soft.dataobj)
    assert p.min() >= 0.0 and p.max() <= 1.0 and 0 < p.max()
    assert len(np.unique(p)) > 2  # a probability map, not a mask
    # -q: no progress bar, no summary line
    assert stdout == "" and stderr == ""


def test_default_output_in_the_current_folder_and_verbose(tmp_path, t2w, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result, stdout, stderr = invoke("sc", t2w, "-q", "-v")
    assert result.exit_code == 0, stderr
    assert sorted(p.name for p in work.iterdir()) == ["sub-01_T2w_seg.nii.gz"]
    assert_on_grid(work / "sub-01_T2w_seg.nii.gz", t2w)
    # -v: each stage's time on stderr; -q still hides the bar and the summary
    lines = stderr.splitlines()
    for stage in ("centerline", "cord", "total"):
        assert any(re.fullmatch(rf"{stage}: \d+\.\d\d s", ln) for ln in lines), stderr
    assert "[" not in stderr and stdout == ""


def test_never_overwrites_the_input(tmp_path, t2w, monkeypatch):
    before = digest(t2w)
    monkeypatch.chdir(t2w.parent)
    for target in (t2w, t2w.name, f"./{t2w.name}", t2w.parent / ".." / "in" / t2w.name):
        result, stdout, stderr = invoke("sc", t2w.name, "-o", target, "-q")
        assert result.exit_code != 0
        assert stderr.startswith("cordseg: error:") and "overwrite the input" in stderr
        assert stderr.count("\n") == 1
    assert digest(t2w) == before
    assert sorted(p.name for p in t2w.parent.iterdir()) == [t2w.name]


def test_contrast_from_name_and_clear_error_when_unknown(tmp_path, phantom):
    plain = tmp_path / "image.nii.gz"
    nib.save(phantom.image, plain)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result, stdout, stderr = invoke("sc", plain, "-o", out_dir)
    assert result.exit_code != 0
    assert stderr.startswith("cordseg: error: cannot tell the contrast of image.nii.gz")
    assert "-c" in stderr and stderr.count("\n") == 1
    assert list(out_dir.iterdir()) == []
    result, _, stderr = invoke("sc", plain, "-o", out_dir, "-c", "T2", "-q")  # case-insensitive choice
    assert result.exit_code == 0, stderr
    assert (out_dir / "image_seg.nii.gz").exists()


# --------------------------------------------------------------------------- centerline


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_centerline_mask_and_csv(tmp_path, t2w, phantom):
    result, stdout, stderr = invoke("centerline", t2w, "-o", tmp_path)
    assert result.exit_code == 0, stderr
    mask_path = tmp_path / "sub-01_T2w_centerline.nii.gz"
    csv_path = tmp_path / "sub-01_T2w_centerline.csv"
    mask = assert_on_grid(mask_path, t2w)
    assert f"{mask_path}" in stdout and f"{csv_path}" in stdout
    header, rows = read_csv(csv_path)
    assert header == CSV_HEADER
    data = np.asarray(mask.dataobj)
    assert len(rows) == int(data.sum()) >= 18  # one voxel per cord slice (measured 20/20)
    values = np.array([[float(v) for v in r] for r in rows])
    assert np.all(np.diff(values[:, 0]) == 1)  # consecutive RPI slices
    np.testing.assert_array_equal(values[:, 0], values[:, 3])  # slice = RPI z
    ijk = values[:, 4:7]
    assert sorted(map(tuple, np.argwhere(data > 0))) == sorted(map(tuple, np.rint(ijk).astype(int)))
    mm = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    np.testing.assert_allclose(values[:, 7:10], mm, atol=2e-3)  # 3 decimals in the file
    # against the phantom's own curve (native voxels), slice by slice
    truth = {int(round(r[2])): n for r, n in zip(phantom.centerline_rpi, phantom.centerline)}
    err = [np.linalg.norm(p - truth[int(z)]) for z, p in zip(values[:, 0], ijk) if int(z) in truth]
    assert np.mean(np.square(err)) <= 0.15  # 1 mm voxels; measured ~0.04


def test_centerline_csv_beside_a_named_output(tmp_path, t2w):
    out = tmp_path / "ctr.nii"
    result, stdout, stderr = invoke("centerline", t2w, "-o", out, "-q", "--smoothness", "2")
    assert result.exit_code == 0, stderr
    assert out.exists() and (tmp_path / "ctr.csv").exists()
    assert stdout == ""


# --------------------------------------------------------------------------- lesion


@pytest.mark.slow
def test_lesion_csv_with_the_shipped_model(tmp_path, t2w):
    table = tmp_path / "lesions.csv"
    result, stdout, stderr = invoke("lesion", t2w, "-o", tmp_path, "--csv", table, "-q")
    assert result.exit_code == 0, stderr
    seg = assert_on_grid(tmp_path / "sub-01_T2w_lesionseg.nii.gz", t2w)
    assert seg.get_data_dtype() == np.uint8
    # lesion-free phantom; measured (stage 7): two specks, 6 mm3 in all with growth to the local edge (4 without),
    # at the cord's edge by the phantom's one-voxel bright CSF ring (stage 5: one, 2 mm3)
    match = re.match(r"lesions: (\d+), total volume ([\d.]+) mm3 -> ", stdout)
    assert match and int(match[1]) <= 2 and float(match[2]) <= 8
    header, rows = read_csv(table)
    assert header[:7] == LESION_HEADER and len(rows) == int(match[1])
    assert sum(float(r[1]) for r in rows) == pytest.approx(float(match[2]), abs=0.1)


@pytest.mark.slow
def test_lesion_min_contrast_option(tmp_path, t2w):
    result, stdout, stderr = invoke("lesion", t2w, "-o", tmp_path, "--min-contrast", "0", "-q")
    assert result.exit_code == 0, stderr
    n = int(re.match(r"lesions: (\d+)", stdout)[1])
    assert 1 <= n <= 2  # measured: the network's two specks (stage 5: one), unscreened
    result, stdout, stderr = invoke("lesion", t2w, "-o", tmp_path, "-q")
    assert result.exit_code == 0 and int(re.match(r"lesions: (\d+)", stdout)[1]) <= n  # screening only removes
    result, stdout, stderr = invoke("lesion", t2w, "-o", tmp_path, "--min-contrast", "-1", "-q")
    assert result.exit_code != 0 and "min_contrast" in stderr and "Traceback" not in stderr


def test_lesion_csv_rows_match_the_mask(tmp_path, t2w, tiny_onnx):
    """A stand-in lesion model (sigmoid of the z-scored patch: everything bright) gives several 'lesions',
    so the table's rows can be checked against the mask the command wrote."""
    model = tiny_onnx(tmp_path / "bright.onnx", op="sigmoid", task="lesion", input_shape=("N", 48, 48, 48, 1),
                      extra={"cordseg_threshold": "0.8"})
    table = tmp_path / "t.csv"
    out = tmp_path / "les.nii.gz"
    result, stdout, stderr = invoke("lesion", t2w, "-o", out, "--csv", table, "--model", model, "-q")
    assert result.exit_code == 0, stderr
    header, rows = read_csv(table)
    assert header[:7] == LESION_HEADER
    expected = lesion_table(nib.load(out))
    assert len(rows) == len(expected) >= 1
    n, total = re.match(r"lesions: (\d+), total volume ([\d.]+) mm3", stdout).groups()
    assert int(n) == len(rows)
    assert float(total) == pytest.approx(sum(float(r[1]) for r in rows), abs=0.05 * len(rows) + 0.05)
    for row, les in zip(rows, expected):
        assert int(row[0]) == les.id
        assert float(row[1]) == pytest.approx(les.volume_mm3, abs=0.01)
        assert [float(v) for v in row[2:5]] == pytest.approx(list(les.centroid_mm), abs=0.01)
        assert (int(row[5]), int(row[6])) == (les.first_slice, les.last_slice)


# --------------------------------------------------------------------------- models, evaluate, version


def test_models_lists_shipped_and_user_models(tmp_path, tiny_onnx):
    result, stdout, stderr = invoke("models")
    assert result.exit_code == 0, stderr
    for name in ("cordseg_centerline.onnx", "cordseg_sc.onnx", "cordseg_lesion.onnx"):
        assert name in stdout
    for task in ("task centerline", "task sc", "task lesion"):
        assert task in stdout
    user = tmp_path / "mine"
    tiny_onnx(user / "my_ctr.onnx", task="centerline", extra={"cordseg_training": "made in a test"})
    result, stdout, _ = invoke("models", env={"CORDSEG_MODEL_DIR": str(user)})
    assert result.exit_code == 0
    first = stdout.splitlines()[0]
    assert first.startswith("my_ctr.onnx: task centerline") and "made in a test" in first


def test_evaluate_a_cord_mask(tmp_path, phantom):
    pred, ref = tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz"
    data = np.asarray(phantom.cord.dataobj).copy()
    n_ref = int(data.sum())
    data[tuple(np.argwhere(data > 0)[:10].T)] = 0  # drop 10 voxels: Dice = 2(n-10) / (2n-10)
    nib.save(nib.Nifti1Image(data, phantom.cord.affine, phantom.cord.header), pred)
    nib.save(phantom.cord, ref)
    result, stdout, stderr = invoke("evaluate", pred, ref, "--json")
    assert result.exit_code == 0, stderr
    row = json.loads(stdout)
    assert row["dice"] == pytest.approx(2 * (n_ref - 10) / (2 * n_ref - 10))
    result, stdout, _ = invoke("evaluate", pred, ref)
    assert result.exit_code == 0 and "dice" in stdout.lower()


def test_version_and_help():
    result, stdout, _ = invoke("--version")
    assert result.exit_code == 0 and stdout.startswith("cordseg ")
    result, stdout, _ = invoke("-h")
    assert result.exit_code == 0
    for cmd in ("centerline", "sc", "lesion", "models", "evaluate"):
        assert cmd in stdout


# --------------------------------------------------------------------------- the installed entry point


def entry_point() -> str:
    beside = Path(sys.executable).parent / ("cordseg.exe" if os.name == "nt" else "cordseg")
    found = str(beside) if beside.exists() else shutil.which("cordseg")
    if not found:
        pytest.skip("the `cordseg` console script is not installed (pip install -e .)")
    return found


@pytest.mark.slow
def test_entry_point_subprocess(tmp_path, t2w):
    exe = entry_point()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([exe, "sc", str(t2w), "-o", str(out_dir), "-v"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_on_grid(out_dir / "sub-01_T2w_seg.nii.gz", t2w)
    assert "cord: " in proc.stdout and "total: " in proc.stderr
    # and a bad input through the real process: one line, no traceback
    proc = subprocess.run([exe, "sc", str(tmp_path / "missing_T2w.nii.gz"), "-o", str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.startswith("cordseg: error:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_threads_option_and_environment_variable(tmp_path, t2w):
    """--threads / CORDSEG_THREADS bound ONNX Runtime's threads (a cluster job's cores); the mask is the same."""
    one, two = tmp_path / "one.nii.gz", tmp_path / "two.nii.gz"
    result, _, stderr = invoke("sc", t2w, "-o", one, "-q", "--threads", 1)
    assert result.exit_code == 0, stderr
    result, _, stderr = invoke("sc", t2w, "-o", two, "-q", env={"CORDSEG_THREADS": "2"})
    assert result.exit_code == 0, stderr
    assert np.array_equal(np.asarray(nib.load(one).dataobj), np.asarray(nib.load(two).dataobj))
    for args, env in ((("--threads", 0), None), ((), {"CORDSEG_THREADS": "many"})):
        result, _, stderr = invoke("lesion", t2w, "-o", tmp_path / "bad.nii.gz", *args, env=env)
        assert result.exit_code == 2 and "threads" in stderr.lower()
        assert not (tmp_path / "bad.nii.gz").exists()


@pytest.mark.slow
def test_several_images_in_one_command(tmp_path, phantom):
    """Several inputs: -o names a folder; each failure is one line naming its image, the others go on, the
    exit status says something failed; lesion tables merge with an image column."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    a, b = inputs / "sub-01_T2w.nii.gz", inputs / "sub-02_T2w.nii.gz"
    nib.save(phantom.image, a)
    nib.save(phantom.image, b)
    bad = inputs / "sub-03_T2w.nii.gz"
    bad.write_bytes(b"not a nifti")
    out = tmp_path / "out"
    out.mkdir()
    result, stdout, stderr = invoke("sc", a, bad, b, "-o", out, "-q")
    assert result.exit_code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("cordseg: error:")]
    assert len(errors) == 2 and str(bad) in errors[0] and "1 of 3 images failed" in errors[1], stderr
    assert sorted(p.name for p in out.iterdir()) == ["sub-01_T2w_seg.nii.gz", "sub-02_T2w_seg.nii.gz"]
    assert_on_grid(out / "sub-02_T2w_seg.nii.gz", b)

    table = tmp_path / "lesions.csv"
    result, stdout, stderr = invoke("lesion", a, b, "-o", out, "--csv", table)
    assert result.exit_code == 0, stderr
    assert stdout.count("lesions:") == 2
    rows = list(csv.reader(table.open()))
    assert rows[0][:8] == ["image"] + LESION_HEADER
    assert {r[0] for r in rows[1:]} <= {str(a), str(b)}


def test_several_images_refusals(tmp_path, phantom):
    a = tmp_path / "x" / "sub-01_T2w.nii.gz"
    b = tmp_path / "y" / "sub-01_T2w.nii.gz"  # the same name in another folder
    for p in (a, b):
        p.parent.mkdir()
        nib.save(phantom.image, p)
    out = tmp_path / "out"
    out.mkdir()
    for args, words in (((a, b, "-o", out), "would both write"),
                        ((a, b, "-o", out / "seg.nii.gz"), "must be an existing folder"),
                        ((a, b, "-o", out, "--centerline", a), "one image")):
        result, _, stderr = invoke("sc", *args)
        assert result.exit_code == 2 and words in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_cli_import_leaves_the_heavy_commands_unloaded():
    """`cordseg sc --help` needs neither evaluate's nor the training extra's modules, nor the runtime's."""
    code = ("import sys; from click.testing import CliRunner; import cordseg.cli as c; "
            "r = CliRunner().invoke(c.main, ['sc', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.startswith(('cordseg.', 'onnxruntime', 'tensorflow', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout
    for heavy in ("cordseg.cli_evaluate", "cordseg.evaluation", "cordseg.training", "onnxruntime", "tensorflow",
                  "cordseg.segmenter", "scipy"):
        assert f"'{heavy}" not in loaded, loaded
    assert "'cordseg.cli'" in loaded


def test_a_missing_lazy_command_is_left_out(monkeypatch):
    from cordseg import cli

    monkeypatch.setitem(cli._Main.lazy, "ghost", cli._LazyCommand("ghost", "cordseg.no_such_module", "ghost", "?"))
    result, stdout, _ = invoke("-h")
    assert result.exit_code == 0 and "ghost" not in stdout and "evaluate" in stdout
    result, _, stderr = invoke("ghost")
    assert result.exit_code == 2 and "No such command" in stderr


def test_a_lazy_command_that_fails_to_load_is_one_error_line(monkeypatch):
    from cordseg import cli

    monkeypatch.setitem(cli._Main.lazy, "broken", cli._LazyCommand("broken", "cordseg.errors", "no_such", "?"))
    result, _, stderr = invoke("broken")
    assert result.exit_code == 2 and stderr.startswith("cordseg: error: broken is not available")
    assert stderr.count("\n") == 1

"""A hostile user's tries, one test per promise: no input is ever overwritten, an image's outputs appear all
together or not at all, signals clean up, results do not depend on the intensity unit, stderr carries
cordseg's own lines only, the API raises CordsegError subclasses, outputs keep the input's shape, and
"zero lesions" means a cord was found.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

import cordseg
from cordseg.cli import main
from cordseg.phantom import make_phantom


def invoke(*args):
    runner = cli_runner()
    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder) -> list:
    """Hidden temporary files left in `folder`."""
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def phantom(psr_phantom):
    return psr_phantom


@pytest.fixture
def scan(tmp_path, phantom):
    path = tmp_path / "a_T2w.nii.gz"
    nib.save(phantom.image, path)
    return path


def run_cli(args, cwd, timeout=300, env=None):
    """The real `cordseg` program in a subprocess."""
    return subprocess.run([sys.executable, "-c", "import sys; from cordseg.cli import main; sys.exit(main())",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------- 1-3: inputs are never outputs


def test_csv_never_overwrites_the_input(tmp_path, scan):
    before = digest(scan)
    code, _, stderr = invoke("lesion", scan, "-o", tmp_path / "out.nii.gz", "--csv", scan)
    assert code == 2 and "would overwrite the input image" in stderr and len(stderr.splitlines()) == 1
    assert digest(scan) == before
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_batch_output_never_overwrites_a_later_input(tmp_path, scan, monkeypatch):
    """a_T2w.nii.gz and a_T2w_seg.nii.gz (last run's result) given together: the first one's output is the
    second input; refused before any work, as is the glob `*T2w*` run twice."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = invoke("sc", scan, "-o", ".", "-q")
    seg = tmp_path / "a_T2w_seg.nii.gz"
    assert code == 0 and seg.exists(), stderr
    before = {p: digest(p) for p in (scan, seg)}
    for args in ((scan, seg, "-c", "t2", "-o", "."), (scan, seg, "-c", "t2")):
        code, _, stderr = invoke("sc", *args)
        assert code == 2 and "would overwrite the input image" in stderr, stderr
        assert {p: digest(p) for p in (scan, seg)} == before
    # the same file twice under two names (a symbolic link) counts as one input
    link = tmp_path / "b_T2w.nii.gz"
    link.symlink_to(scan)
    code, _, stderr = invoke("centerline", link, tmp_path / "a_T2w_centerline.nii.gz", "-c", "t2", "-o", ".")
    assert code == 2


def test_outputs_never_land_on_the_given_centerline_nor_on_each_other(tmp_path, scan):
    code, _, stderr = invoke("centerline", scan, "-o", tmp_path / "cl.nii.gz", "-q")
    assert code == 0, stderr
    cl = tmp_path / "cl.nii.gz"
    before = digest(cl)
    for command, args, words in (
        ("sc", ("-o", cl, "--centerline", cl), "--centerline mask"),
        ("lesion", ("-o", tmp_path / "l.nii.gz", "--csv", tmp_path / "l.nii.gz"), "same file"),
        ("lesion", ("-o", tmp_path / "l.nii.gz", "--csv", tmp_path / "l_qc.png", "--qc"), "same file"),
        ("centerline", ("-o", tmp_path / "c.nii.gz", "--model", tmp_path / "c.csv"), "--model file"),
    ):
        code, _, stderr = invoke(command, scan, *args)
        assert code == 2 and words in stderr, (command, args, stderr)
    assert digest(cl) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_T2w.nii.gz", "cl.csv", "cl.nii.gz"]


def test_morphometry_output_never_overwrites_its_inputs(tmp_path, scan, phantom):
    seg = tmp_path / "a_T2w_seg.nii.gz"
    nib.save(phantom.cord, seg)
    before = {p: digest(p) for p in (scan, seg)}
    for args in ((seg, "--image", scan, "-o", scan), (seg, "-o", seg)):
        code, _, stderr = invoke("morphometry", *args)
        assert code == 2 and "refusing to overwrite" in stderr, stderr
    assert {p: digest(p) for p in (scan, seg)} == before


# --------------------------------------------------------------------------- 4: signals


SCRIPT = """
import os, signal, sys, time
import cordseg.io as io

real = io._write_file if {target!r} == "csv" else None
import nibabel as nib
real_save = nib.save

def half_then_signal(tmp, *rest):
    with open(tmp, "wb") as fh:
        fh.write(b"partial" * 1000)
    os.kill(os.getpid(), signal.{sig})
    time.sleep(5)

if {target!r} == "csv":
    io._write_file = half_then_signal
else:
    nib.save = lambda img, tmp: half_then_signal(tmp)
from cordseg.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
@pytest.mark.parametrize("target", ["mask", "csv"])
def test_a_signal_during_the_write_leaves_nothing(tmp_path, scan, sig, code, target):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(sig=sig, target=target), "centerline", str(scan),
                           "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("cordseg: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert list(out.iterdir()) == []  # no temporary file, and no mask without its CSV


def test_sigterm_stops_a_batch(tmp_path, scan):
    second = tmp_path / "b_T2w.nii.gz"
    second.write_bytes(scan.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(sig="SIGTERM", target="mask"), "sc", str(scan),
                           str(second), "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143 and proc.stderr.count("\n") == 1, proc.stderr
    assert list(out.iterdir()) == []


def test_ctrl_c_before_the_command_starts_prints_one_line(tmp_path):
    """Run as the `cordseg` program, an interruption right after the imports (before main) is one line."""
    script = tmp_path / "cordseg"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        from cordseg.cli import main
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        sys.exit(main())
    """))
    proc = subprocess.run([sys.executable, str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr == "cordseg: error: interrupted\n", proc.stderr


# --------------------------------------------------------------------------- 6: intensity units


def test_the_same_mask_whatever_the_intensity_unit(phantom):
    data = np.asarray(phantom.image.dataobj, np.float32)
    masks = []
    for factor in (1.0, 1e-9, 1e6):
        img = nib.Nifti1Image(data * np.float32(factor), phantom.image.affine, phantom.image.header)
        masks.append(np.asarray(cordseg.segment_cord(img, contrast="t2").dataobj))
    assert masks[0].sum() > 100
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])


# --------------------------------------------------------------------------- 7: all outputs or none


@pytest.mark.parametrize("command, extra, failing", [
    ("centerline", (), ".csv"),
    ("sc", ("--qc",), ".png"),
    ("lesion", ("--csv", "TABLE"), ".csv"),
    ("lesion", ("--qc",), ".png"),
])
def test_disk_full_on_a_secondary_output_leaves_no_mask(tmp_path, scan, monkeypatch, command, extra, failing):
    import cordseg.io as io

    real = io._write_file

    def full(tmp, data):
        with open(tmp, "wb") as fh:
            fh.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    out.mkdir()
    # PNG and CSV bytes are both written by _write_file: fail the kind asked for
    monkeypatch.setattr(io, "_write_file", lambda tmp, data: (
        full if (data[:4] == b"\x89PNG") == (failing == ".png") else real)(tmp, data))
    args = [a if a != "TABLE" else out / "table.csv" for a in extra]
    code, _, stderr = invoke(command, scan, "-o", out, "-q", *args)
    assert code == 2 and "No space left" in stderr, stderr
    assert list(out.iterdir()) == []


def test_a_commit_that_fails_halfway_removes_what_it_put_in_place(tmp_path, monkeypatch):
    import cordseg.io as io

    real = os.replace
    calls = []

    def second_fails(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(cordseg.OutputError):
        with io.staged_outputs() as stage:
            stage.bytes(b"one", tmp_path / "one.txt")
            stage.bytes(b"two", tmp_path / "two.txt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 8: links, long names


def test_symlink_loops_and_long_names_are_one_line(tmp_path, scan):
    loop_a, loop_b = tmp_path / "loop_T2w.nii.gz", tmp_path / "other_T2w.nii.gz"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    long_in = tmp_path / ("x" * 300 + "_T2w.nii.gz")
    for command, args in (("sc", (loop_a, "-o", tmp_path / "o.nii.gz")), ("sc", (scan, "-o", loop_a)),
                          ("sc", (long_in, "-o", tmp_path)), ("sc", (scan, "-o", tmp_path / ("y" * 300 + ".nii.gz"))),
                          ("lesion", (scan, "-o", tmp_path, "--csv", loop_a)),
                          ("lesion", (scan, "-o", tmp_path, "--csv", tmp_path / ("z" * 300 + ".csv"))),
                          ("sc", (scan, "-o", tmp_path, "--centerline", loop_a))):
        code, stdout, stderr = invoke(command, *args)
        assert code == 2 and stderr.startswith("cordseg: error:") and len(stderr.splitlines()) == 1, stderr
    assert leftovers(tmp_path) == []


def test_a_240_character_output_name_is_writable(tmp_path, scan):
    name = "s" * 233 + ".nii.gz"
    assert len(name) == 240
    code, _, stderr = invoke("centerline", scan, "-o", tmp_path / name, "-q")
    assert code == 0, stderr
    assert (tmp_path / name).exists() and (tmp_path / ("s" * 233 + ".csv")).exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 9: quiet stderr


def broken_header_file(path, phantom, *, sizeof_hdr=None, zooms=None, qcode=1, scode=1):
    img = nib.Nifti1Image(np.asarray(phantom.image.dataobj, np.float32), phantom.image.affine)
    img.header.set_qform(phantom.image.affine, code=qcode)
    img.header.set_sform(phantom.image.affine, code=scode)
    nib.save(img, path)
    raw = bytearray(Path(path).read_bytes())
    if sizeof_hdr is not None:
        raw[0:4] = np.int32(sizeof_hdr).tobytes()
    if zooms is not None:
        raw[80:92] = np.asarray(zooms, np.float32).tobytes()  # pixdim[1:4]
    Path(path).write_bytes(bytes(raw))
    return path


def test_nibabel_repairs_are_not_printed(tmp_path, phantom):
    path = broken_header_file(tmp_path / "a_T2w.nii", phantom, sizeof_hdr=350)
    proc = run_cli(["sc", path, "-o", tmp_path / "o.nii.gz", "-q"], tmp_path)
    assert proc.returncode in (0, 2)
    assert all(line.startswith("cordseg: ") for line in proc.stderr.splitlines()), proc.stderr
    api = subprocess.run([sys.executable, "-c", f"import cordseg; cordseg.segment_cord({str(path)!r})"],
                         capture_output=True, text=True, timeout=300)
    assert api.returncode == 0 and api.stderr == "" and api.stdout == "", api.stderr


def test_a_voxel_size_of_zero_is_refused_not_taken_as_one(tmp_path, phantom):
    path = broken_header_file(tmp_path / "a_T2w.nii", phantom, zooms=(0.0, 1.0, 1.0), scode=0)
    with pytest.raises(cordseg.InputError, match="voxel sizes"):
        cordseg.segment_cord(path)
    proc = run_cli(["sc", path, "-o", tmp_path / "o.nii.gz"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "voxel sizes" in proc.stderr, proc.stderr
    # an sform gives the grid on its own: accepted
    path = broken_header_file(tmp_path / "b_T2w.nii", phantom, zooms=(0.0, 1.0, 1.0), scode=1)
    assert cordseg.segment_cord(path).shape == phantom.image.shape


# --------------------------------------------------------------------------- 10: typed API errors


@pytest.mark.parametrize("call", [
    lambda p: cordseg.segment_cord(None),
    lambda p: cordseg.segment_cord(p, threshold="abc"),
    lambda p: cordseg.segment_cord(p, threshold=float("nan")),
    lambda p: cordseg.segment_cord(p, contrast=5),
    lambda p: cordseg.segment_cord(p, volume="x"),
    lambda p: cordseg.segment_cord(p, model=123),
    lambda p: cordseg.segment_cord(p, centerline=123),
    lambda p: cordseg.segment_cord(p, threads="2"),
    lambda p: cordseg.segment_cord(p, progress="not a function"),
    lambda p: cordseg.segment_cord(np.zeros((10, 10, 10)), contrast="t2"),
    lambda p: cordseg.segment_cord(str(p).encode()),
    lambda p: cordseg.detect_centerline(p, smoothness="a"),
    lambda p: cordseg.detect_centerline(p, smoothness=None),
    lambda p: cordseg.segment_lesions(p, min_contrast="x"),
    lambda p: cordseg.Segmenter(3),
    lambda p: cordseg.Segmenter("t2", cord_model=1.5),
    lambda p: cordseg.Segmenter("t2").cord(None),
    lambda p: cordseg.lesion_table(None),
    lambda p: cordseg.lesion_table(Path(p).with_name("missing.nii.gz")),
    lambda p: cordseg.centerline_from_mask(p, None),
], ids=lambda c: "")
def test_bad_api_arguments_raise_cordseg_errors(scan, call):
    with pytest.raises(cordseg.CordsegError):
        call(scan)


def test_out_of_memory_names_the_scan_on_the_command_line(tmp_path, scan, monkeypatch):
    import cordseg.segmenter as segmenter

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(segmenter._centerline, "detect", no_memory)
    code, _, stderr = invoke("sc", scan, "-o", tmp_path / "o.nii.gz")
    assert code == 2 and stderr.count("\n") == 1 and str(scan) in stderr and "out of memory" in stderr, stderr


def test_out_of_memory_is_a_cordseg_error(scan, monkeypatch):
    import cordseg.segmenter as segmenter

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(segmenter._centerline, "detect", no_memory)
    with pytest.raises(cordseg.CordsegError, match="out of memory"):
        cordseg.segment_cord(scan)


# --------------------------------------------------------------------------- 11: click's errors


@pytest.mark.parametrize("args", [("sc", "--bogus"), ("sc",), ("sc", "x", "--threads", "0"), ("bogus",),
                                  ("lesion", "x", "--threshold", "high"), ("evaluate", "--bogus")])
def test_usage_errors_are_one_line(args):
    code, stdout, stderr = invoke(*args)
    assert code == 2 and stdout == ""
    assert stderr.startswith("cordseg: error: ") and stderr.count("\n") == 1, stderr


def test_cordseg_alone_prints_its_help():
    code, stdout, stderr = invoke()
    assert code == 0 and "Commands:" in stdout and stderr == ""


def test_evaluate_errors_use_cordseg_prefix(tmp_path, scan):
    code, _, stderr = invoke("evaluate", scan, tmp_path / "missing.nii.gz")
    assert code == 2 and stderr.startswith("cordseg: error: ") and stderr.count("\n") == 1, stderr


# --------------------------------------------------------------------------- 12: shapes kept


@pytest.mark.slow
def test_2d_and_one_volume_4d_inputs_keep_their_shape(tmp_path):
    axial = make_phantom((40, 40, 20), axcodes=("L", "A", "S"), seed=5)  # slices along the third axis
    data = np.asarray(axial.image.dataobj, np.float32)
    affine = axial.image.affine
    cases = {"flat_T2w.nii.gz": data[:, :, 10], "vol_T2w.nii.gz": data[..., None]}
    for name, array in cases.items():
        img = nib.Nifti1Image(array, affine)
        img.header.set_qform(affine, 1)
        img.header.set_sform(affine, 1)
        nib.save(img, tmp_path / name)
        for command, extra in (("centerline", ()), ("sc", ()), ("lesion", ("--csv", tmp_path / "t.csv"))):
            out = tmp_path / f"{command}_{name}"
            code, _, stderr = invoke(command, tmp_path / name, "-o", out, "-q", "--qc", *extra)
            assert code == 0, stderr
            assert nib.load(out).shape == array.shape, (name, command)
        api = cordseg.segment_cord(tmp_path / name)
        assert api.shape == array.shape


# --------------------------------------------------------------------------- 13: no cord in noise


def test_noise_has_no_cord_for_every_command(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "noise_T2w.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(0, 1000, (128, 128, 30)).astype(np.float32), np.eye(4)), path)
    for command in ("centerline", "sc", "lesion"):
        code, stdout, stderr = invoke(command, path, "-o", tmp_path / f"{command}.nii.gz", "-q")
        assert code == 2 and "no spinal cord found" in stderr and stdout == "", (command, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise_T2w.nii.gz"]


def test_zero_lesions_need_a_cord(phantom, monkeypatch):
    """A lesion run with no lesion asks the cord model: no cord there, no "0 lesions"."""
    import cordseg.segmenter as segmenter

    seg = cordseg.Segmenter("t2")
    img = phantom.image
    real = segmenter._segmentation.soft_segmentation

    def nothing(cl, model, *a, **k):
        return np.zeros_like(real(cl, model, *a, **k))

    monkeypatch.setattr(segmenter._segmentation, "soft_segmentation", nothing)
    with pytest.raises(cordseg.NoCordError):
        seg.lesions(img)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_signal_words():
    from cordseg.cli import _interrupted, Interrupted

    assert _interrupted(Interrupted(signal.SIGTERM))[1] == 143
    assert _interrupted(Interrupted(signal.SIGHUP))[1] == 129
    assert _interrupted(KeyboardInterrupt())[1] == 130

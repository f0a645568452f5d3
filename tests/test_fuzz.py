"""A fuzz battery of generated hostile files: truncated and inflating gzip, broken headers, odd dtypes and
dimensions, huge claimed sizes, odd orientations, and signals in the middle of a run.

Every file must either load or be refused with an InputError (never another exception), the command line
must answer with exit 0 or one `cordseg:` line and exit 2, no input may change and no temporary file may
stay. Size bombs run in a subprocess whose address space is capped (RLIMIT_AS), so a regression fails the
test instead of taking the machine down, and their peak memory is checked.
"""
from __future__ import annotations

import gzip
import hashlib
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

from cordseg.cli import main
from cordseg.errors import InputError
from cordseg.io import MAX_VOXELS, load_image
from cordseg.phantom import make_phantom

ADDRESS_SPACE = 3 << 30  # bytes a size-bomb run may map at most
REFUSAL_PEAK_MB = 500  # a refused bomb is refused before its data is read


def nifti_bytes(data, affine=None, *, dtype=None, qcode=1, scode=1, edit=None) -> bytes:
    """An uncompressed .nii file's bytes; `edit(header)` changes header fields after the data is set."""
    affine = np.eye(4) if affine is None else affine
    data = np.asarray(data)
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    img.header["vox_offset"] = 352
    if edit is not None:
        edit(img.header)
    return img.header.binaryblock + b"\0" * 4 + np.asarray(data, img.header.get_data_dtype()).tobytes("F")


def header_only(shape, dtype=np.float32, zooms=(1.0, 1.0, 1.0)) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms(tuple(zooms) + (1.0,) * (len(shape) - 3))
    hdr.set_qform(np.diag(list(zooms) + [1.0]), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def small(dtype=np.float32, shape=(12, 12, 6), seed=0):
    return (np.random.default_rng(seed).random(shape) * 100).astype(dtype)


def set_field(name, value):
    def edit(h):
        h[name] = value
    return edit


def broken(raw: bytes, offset: int, payload: bytes) -> bytes:
    b = bytearray(raw)
    b[offset:offset + len(payload)] = payload
    return bytes(b)


def gz(raw: bytes, level=1) -> bytes:
    return gzip.compress(raw, compresslevel=level)


def hostile_files() -> dict:
    """name -> file bytes (name ends in .nii or .nii.gz)."""
    ok = nifti_bytes(small())
    f = {}
    # truncations
    for cut in (10, 200, 347, 352, 353, len(ok) // 2, len(ok) - 1):
        f[f"trunc_{cut}_T2w.nii"] = ok[:cut]
    zipped = gz(ok)
    for cut in (5, 30, len(zipped) // 2, len(zipped) - 4):
        f[f"gztrunc_{cut}_T2w.nii.gz"] = zipped[:cut]
    f["gz_garbage_tail_T2w.nii.gz"] = zipped + b"garbage" * 10
    f["gz_two_members_T2w.nii.gz"] = gz(ok[:200]) + gz(ok[200:])
    f["gz_inflates_far_beyond_T2w.nii.gz"] = gz(ok + b"\0" * (16 << 20))  # 16 MB of zeros after the image
    f["gz_not_gzip_T2w.nii.gz"] = ok
    f["gz_corrupt_T2w.nii.gz"] = broken(zipped, len(zipped) // 2, b"\xff" * 16)
    # broken headers (bytes edited after a valid header was written)
    f["sizeof_hdr_T2w.nii"] = broken(ok, 0, np.int32(350).tobytes())
    f["magic_T2w.nii"] = broken(ok, 344, b"xx1\0")
    f["dim0_zero_T2w.nii"] = broken(ok, 40, np.int16(0).tobytes())
    f["dim0_nine_T2w.nii"] = broken(ok, 40, np.int16(9).tobytes())
    f["dim_negative_T2w.nii"] = broken(ok, 42, np.int16(-12).tobytes())
    f["dim_zero_T2w.nii"] = broken(ok, 44, np.int16(0).tobytes())
    f["datatype_unknown_T2w.nii"] = broken(ok, 70, np.int16(3333).tobytes())
    f["bitpix_wrong_T2w.nii"] = broken(ok, 72, np.int16(7).tobytes())
    f["vox_offset_huge_T2w.nii"] = broken(ok, 108, np.float32(1e12).tobytes())
    f["vox_offset_negative_T2w.nii"] = broken(ok, 108, np.float32(-400).tobytes())
    f["pixdim_zero_qform_T2w.nii"] = broken(nifti_bytes(small(), scode=0), 80, np.float32(0).tobytes())
    f["pixdim_nan_T2w.nii"] = broken(nifti_bytes(small(), scode=0), 84, np.float32(np.nan).tobytes())
    f["pixdim_inf_T2w.nii"] = broken(nifti_bytes(small(), scode=0), 84, np.float32(np.inf).tobytes())
    f["pixdim_negative_T2w.nii"] = broken(nifti_bytes(small(), scode=0), 84, np.float32(-2).tobytes())
    f["quaternion_bad_T2w.nii"] = broken(nifti_bytes(small(), scode=0), 256, np.float32(3.0).tobytes())
    f["sform_nan_T2w.nii"] = broken(nifti_bytes(small(), qcode=0), 280, np.float32(np.nan).tobytes())
    f["sform_singular_T2w.nii"] = broken(nifti_bytes(small(), qcode=0), 280, np.zeros(12, np.float32).tobytes())
    f["no_codes_T2w.nii"] = nifti_bytes(small(), qcode=0, scode=0)
    f["slope_zero_T2w.nii"] = nifti_bytes(small(), edit=set_field("scl_slope", 0.0))
    f["slope_nan_T2w.nii"] = nifti_bytes(small(), edit=set_field("scl_slope", np.nan))
    f["slope_huge_T2w.nii"] = nifti_bytes(small(np.int16), edit=set_field("scl_slope", 1e38))
    f["all_nan_T2w.nii"] = nifti_bytes(np.full((12, 12, 6), np.nan, np.float32))
    f["some_inf_T2w.nii"] = nifti_bytes(np.where(small() > 50, np.inf, small()).astype(np.float32))
    f["constant_T2w.nii"] = nifti_bytes(np.full((12, 12, 6), 7.0, np.float32))
    # odd voxel types
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float64):
        f[f"dtype_{np.dtype(dtype).name}_T2w.nii"] = nifti_bytes(small(dtype))
    f["dtype_complex64_T2w.nii"] = nifti_bytes(small().astype(np.complex64))
    rgb = np.zeros((12, 12, 6), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    f["dtype_rgb24_T2w.nii"] = nifti_bytes(rgb)
    f["dtype_extremes_T2w.nii"] = nifti_bytes(np.array([np.finfo(np.float32).max, np.finfo(np.float32).min,
                                                        0, 1e-45] * 216, np.float32).reshape(12, 12, 6))
    # odd dimensions
    for shape in ((1, 1, 1), (12, 12), (12, 12, 6, 1), (12, 12, 6, 3), (12, 12, 6, 1, 1), (12, 12, 6, 1, 2),
                  (1, 40, 1), (12,), (2, 2, 2, 1, 1, 1, 1)):
        f[f"dims_{'x'.join(map(str, shape))}_T2w.nii"] = nifti_bytes(small(shape=shape))
    # huge claims, small files
    f["claims_32767sq_T2w.nii"] = header_only((32767, 32767, 1))
    f["claims_32767cube_T2w.nii.gz"] = gz(header_only((32767, 32767, 32767), np.int16))
    f["claims_limit_plus_one_T2w.nii"] = header_only((MAX_VOXELS // 16384 + 1, 16384, 1), np.uint8)
    f["claims_fov_4m_T2w.nii"] = nifti_bytes(small(shape=(100, 10, 4)), np.diag([40.0, 1, 1, 1]))
    # orientations
    rng = np.random.default_rng(3)
    for i in range(4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # oblique, sometimes left-handed
        affine = np.eye(4)
        affine[:3, :3] = q @ np.diag([0.5, 0.7, 3.0])
        affine[:3, 3] = rng.normal(size=3) * 50
        f[f"oblique_{i}_T2w.nii"] = nifti_bytes(small(), affine)
    return f


def test_every_hostile_file_loads_or_is_refused_with_an_input_error(tmp_path):
    files = hostile_files()
    assert len(files) > 60
    outcomes = {}
    t0 = time.perf_counter()
    for name, raw in files.items():
        path = tmp_path / name
        path.write_bytes(raw)
        try:
            img = load_image(path)
        except InputError as exc:
            message = str(exc)
            assert message.startswith(str(path)) and "\n" not in message, message
            outcomes[name] = "refused"
        else:
            assert img.get_fdata().dtype == np.float64 and np.all(np.isfinite(img.get_fdata())), name
            outcomes[name] = "loaded"
    assert time.perf_counter() - t0 < 30
    # what must be refused is refused (a truncated file, a claim beyond the limits, a zero voxel size)...
    for name in ("trunc_352_T2w.nii", "trunc_353_T2w.nii", "claims_32767sq_T2w.nii", "claims_32767cube_T2w.nii.gz",
                 "claims_limit_plus_one_T2w.nii", "claims_fov_4m_T2w.nii", "pixdim_zero_qform_T2w.nii",
                 "dtype_complex64_T2w.nii", "dtype_rgb24_T2w.nii", "dims_12x12x6x1x2_T2w.nii",
                 f"gztrunc_{len(gz(nifti_bytes(small()))) // 2}_T2w.nii.gz"):
        assert outcomes[name] == "refused", name
    # ...and what is merely unusual loads
    for name in ("gz_two_members_T2w.nii.gz", "gz_inflates_far_beyond_T2w.nii.gz", "dims_12x12_T2w.nii",
                 "dims_12x12x6x1_T2w.nii", "dtype_uint64_T2w.nii", "oblique_0_T2w.nii", "no_codes_T2w.nii"):
        assert outcomes[name] == "loaded", name


def test_the_command_line_answers_every_hostile_file_with_one_line(tmp_path):
    """Every file that fails to load, and a handful that load, through `cordseg sc`."""
    files = hostile_files()
    out = tmp_path / "out"
    out.mkdir()
    ins = tmp_path / "in"
    ins.mkdir()
    runner = cli_runner()
    for name, raw in files.items():
        path = ins / name
        path.write_bytes(raw)
        try:
            load_image(path)
            if not name.startswith(("oblique_0", "dims_1x1x1", "constant")):
                continue  # the whole pipeline on every loadable file would take minutes
        except InputError:
            pass
        digest = hashlib.sha256(raw).hexdigest()
        result = runner.invoke(main, ["sc", str(path), "-o", str(out), "-q"], catch_exceptions=False)
        assert result.exit_code in (0, 2), (name, result.stderr)
        lines = result.stderr.splitlines()
        assert all(line.startswith("cordseg: ") for line in lines), (name, result.stderr)
        if result.exit_code == 2:
            assert lines and lines[-1].startswith("cordseg: error: ")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert [p for p in out.iterdir() if ".tmp" in p.name] == []


# --------------------------------------------------------------------------- size bombs, memory capped


# Forked from a fresh small process, not from the test process: a forked child's peak RSS starts from its
# parent's, and pytest's own (with the training framework loaded) would hide the command's.
_LAUNCHER = """
import os, resource, sys
limit, cwd, *args = sys.argv[1:]
pid = os.fork()
if pid == 0:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.chdir(cwd)
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
        os.execv(sys.executable, [sys.executable, "-c",
                                  "import sys; from cordseg.cli import main; sys.exit(main())", *args])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_of(args, cwd, timeout=120):
    """(returncode, stderr, peak RSS in MB) of one run capped at ADDRESS_SPACE, measured with wait4 on that
    process alone."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(ADDRESS_SPACE), str(cwd), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    code, peak_kb = proc.stdout.split()
    return int(code), proc.stderr, int(peak_kb) / 1024


def bomb_files(folder: Path) -> dict:
    folder.mkdir(exist_ok=True)
    files = {}

    def put(name, raw):
        (folder / name).write_bytes(raw)
        files[name] = folder / name

    put("claims_32767sq_T2w.nii", header_only((32767, 32767, 1)))
    # 1 GiB once inflated, about 1 MB on disk; the header claims exactly that
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (64 << 20)
    body = [comp.compress(header_only((1024, 1024, 256)))] + [comp.compress(zeros) for _ in range(16)]
    put("inflates_1GiB_T2w.nii.gz", b"".join(body) + comp.flush())
    # within the voxel limit (256 MB claimed), but the stream stops after 8 MB
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    cut = comp.compress(header_only((512, 512, 256))) + comp.compress(b"\1" * (8 << 20)) + comp.flush()
    put("claims_256MB_holds_8MB_T2w.nii.gz", cut)
    put("voxels_40mm_T2w.nii.gz", gz(nifti_bytes(small(shape=(64, 64, 30)), np.diag([40.0, 40.0, 40.0, 1]))))
    put("flat_2000sq_T2w.nii.gz", gz(nifti_bytes(np.zeros((2000, 2000, 1), np.uint8))))
    # a plausible field of view (1200 mm) whose grid at CNN1's 1 mm is too large to hold
    put("wide_grid_T2w.nii.gz", gz(nifti_bytes(np.zeros((600, 600, 100), np.uint8), np.diag([2.0, 2.0, 1.0, 1]))))
    return files


@pytest.mark.slow
def test_size_bombs_are_refused_before_allocating(tmp_path):
    files = bomb_files(tmp_path / "bombs")
    out = tmp_path / "out"
    out.mkdir()
    words = {"claims_32767sq_T2w.nii": "at most", "inflates_1GiB_T2w.nii.gz": "at most",
             "claims_256MB_holds_8MB_T2w.nii.gz": "truncated", "voxels_40mm_T2w.nii.gz": "field of view",
             "flat_2000sq_T2w.nii.gz": "field of view", "wide_grid_T2w.nii.gz": "crop it"}
    for name, path in files.items():
        t0 = time.perf_counter()
        code, stderr, peak_mb = peak_of(["sc", path, "-o", out, "-q"], tmp_path)
        elapsed = time.perf_counter() - t0
        assert code == 2, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("cordseg: error: "), stderr
        assert str(path) in stderr or name == "wide_grid_T2w.nii.gz", stderr  # (that one is found after loading)
        assert words[name] in stderr, (name, stderr)
        assert peak_mb < (REFUSAL_PEAK_MB if name != "wide_grid_T2w.nii.gz" else 1200), (name, peak_mb)
        assert elapsed < 60, (name, elapsed)
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- signals in the middle of a run


@pytest.mark.slow
def test_sigterm_at_random_moments_leaves_no_partial_file(tmp_path):
    """A real run (no patching) stopped at several moments: exit 143 and nothing left, or exit 0 and a whole
    output; never a temporary file."""
    phantom = make_phantom((64, 64, 48), axcodes=("P", "S", "R"), seed=2)
    scan = tmp_path / "s_T2w.nii.gz"
    nib.save(phantom.image, scan)
    command = [sys.executable, "-c", "import sys; from cordseg.cli import main; sys.exit(main())",
               "centerline", str(scan), "-q", "--qc"]

    def started(out):
        return subprocess.Popen(command + ["-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # the moments are spread over this machine's own run, after the signal handlers are in place (the import)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cordseg.cli"], check=True)
    t_import = time.perf_counter() - t0
    (tmp_path / "whole").mkdir()
    t0 = time.perf_counter()
    assert started(tmp_path / "whole").wait(timeout=120) == 0
    t_run = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    codes = set()
    for i, share in enumerate(sorted(rng.uniform(0.05, 0.9, 4))):
        out = tmp_path / f"out{i}"
        out.mkdir()
        proc = started(out)
        time.sleep(t_import + share * max(t_run - t_import, 0.1))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        codes.add(proc.returncode)
        names = sorted(p.name for p in out.iterdir())
        assert proc.returncode in (0, 143), err
        if proc.returncode == 143:
            assert names == [] and err.decode().count("\n") == 1, (names, err)
        else:
            assert names == ["s_T2w_centerline.csv", "s_T2w_centerline.nii.gz", "s_T2w_centerline_qc.png"]
            nib.load(out / "s_T2w_centerline.nii.gz").get_fdata()
    assert 143 in codes

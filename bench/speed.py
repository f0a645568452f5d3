"""Speed and memory of `cordseg sc` (and `cordseg lesion`) on a 384 x 384 x 52, 1 mm T2-like volume.

python bench/speed.py [--source phantom|real] [--layout sagittal|axial] [--repeats 3] [--no-lesion]
python bench/speed.py --vs-published [--rounds 3]     (needs the train extra; see below)
python bench/speed.py --many [--n 10]                 scans per minute, one command vs one command per scan
python bench/speed.py --memory-512                    peak RSS of `cordseg sc` on a 512 x 512 x 52 axial scan

The volume (written to a temporary folder, never into the repository):
- phantom (default): cordseg.phantom.make_phantom, T2 contrast, a 384 x 384 full field of view with
  distractor blobs and noise. --layout sagittal (default) stores it like the paper's (and sct_testing's)
  sagittal T2: native axes P, S, R, shape 384 x 384 x 52, i.e. 52 sagittal slices, 384 axial slices,
  with cord on the lower 330 mm and tissue only above (brain); --layout axial: native L, A, S, 384 x 384
  in-plane and 52 axial slices, cord on every slice.
- real: ../shared/data/sct_testing/t2/t2.nii.gz (sagittal, P S R, 60 x 55 x 52 at 1 mm) padded to
  384 x 384 x 52: mirrored along the cord's axis (S: one continuous cord, 384 mm long) and, along P,
  filled with smooth noise at the intensity of the image's anterior/posterior edges (mirroring along P
  would put 7 cords side by side). Its real voxels keep their scanner positions.

Per-stage seconds come from in-process runs of the CLI (`cordseg.cli.main`, exactly the command's code
path) through the runtime's own stage events (cordseg.stages, handed to the CLI as obj={"on_stage": ...});
medians over the repeats. The whole command is timed as a child
process (`cordseg sc IMAGE -c t2 -q -o DIR`): wall time median of the repeats, peak RSS from that
child's own rusage (os.wait4). Targets (issue 2): <= 20 s whole command on the 2-core machine, peak RSS
<= 1.5 GB.

--vs-published: the axial phantom (384 x 384 in-plane, 52 slices of 1 mm: the field-of-view case of issue 16)
through `cordseg sc`, `cordseg lesion` and the published pipeline, each a whole child process, in alternating
rounds (cordseg sc, cordseg lesion, published, cordseg sc, ...), so that a machine whose speed drifts slows all
alike; prints each one's median wall time and peak RSS, and the ratios cordseg / published (median of the
per-round ratios). The published pipeline is the paper's t2 CNN1 (t2_ctr) and CNN2-lesion (t2_ax_lesion) from
../shared/anchors, imported on the fly by bench.lesion_eval.import_published (the training extra's Keras
importer) into work_tmp/ (ignored by git), run by `published_pipeline` below with ONNX Runtime sessions created
once: RPI, 0.5 mm in-plane, the whole volume's 2-98th percentiles to 0-255 and the training z-score, CNN1 on
the 80 x 80 blocks tiling every slice, per slice the centre of mass of heat >= 0.5 (slices without one
interpolated), a 48 x 48 crop at 0.5 mm around it, histogram standardisation, 0.5 mm slices, non-overlapping
48-slice patches, threshold 0.1, back to the input grid. Targets (issue 16): ratio <= 0.25, peak RSS <= 400 MB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cordseg.cli  # noqa: E402
from cordseg.datasets import shared_data  # noqa: E402
from cordseg.phantom import make_phantom  # noqa: E402

SHAPE = (384, 384, 52)
TARGET_SECONDS = 20.0
TARGET_RSS_GB = 1.5
TARGET_RATIO = 0.25  # issue 16: whole process, against the published pipeline in the same run
TARGET_RSS_MB = 400.0
TARGET_RSS_512_MB = 500.0
REPO = Path(__file__).resolve().parents[1]
PUBLISHED_CACHE = REPO / "work_tmp" / "speed" / "published"  # converted models: ignored by git


def default_data() -> Path:
    return shared_data()


# ----------------------------------------------------------------------------------------------------
# the volume

def phantom_volume(layout: str, seed: int = 0):
    """(image, true cord mask array, number of inserted lesions)."""
    if layout == "sagittal":
        # RPI grid (x = 52 left-right, y = 384 antero-posterior, z = 384 infero-superior); stored P, S, R
        ph = make_phantom((SHAPE[2], SHAPE[0], SHAPE[1]), (1.0, 1.0, 1.0), axcodes=("P", "S", "R"),
                          curvature=8.0, noise=0.05, n_lesions=4, cord_slices=(0, 330), contrast="t2",
                          blobs=12, seed=seed)
    else:
        ph = make_phantom(SHAPE, (1.0, 1.0, 1.0), axcodes=("L", "A", "S"), curvature=8.0, noise=0.05,
                          n_lesions=2, contrast="t2", blobs=12, seed=seed)
    assert ph.image.shape == SHAPE, ph.image.shape
    # scanner-like intensities (the models normalise, but a uint16-like range is what they meet)
    data = np.asarray(ph.image.dataobj, np.float32) * 1000.0
    img = nib.Nifti1Image(data, ph.image.affine, ph.image.header)
    return img, np.asarray(ph.cord.dataobj) > 0, ph.n_lesions


def real_volume(data_dir: Path, seed: int = 0):
    """(image, the manual cord mask padded the same way, None)."""
    src = nib.load(str(data_dir / "sct_testing" / "t2" / "t2.nii.gz"))
    seg = np.asarray(nib.load(str(data_dir / "sct_testing" / "t2" / "t2_seg-manual.nii.gz")).dataobj) > 0.5
    axcodes = nib.aff2axcodes(src.affine)
    if axcodes != ("P", "S", "R") or src.shape != (60, 55, 52):
        raise SystemExit(f"unexpected t2.nii.gz layout {axcodes} {src.shape}")
    a = np.asarray(src.dataobj, np.float32)
    rng = np.random.default_rng(seed)
    # along S (axis 1): mirror-tile, which continues the cord
    before_s = (SHAPE[1] - a.shape[1]) // 2
    pad_s = ((0, 0), (before_s, SHAPE[1] - a.shape[1] - before_s), (0, 0))
    a = np.pad(a, pad_s, mode="symmetric")
    seg = np.pad(seg, pad_s, mode="symmetric")
    # along P (axis 0): smooth noise with the statistics of the outer 5 columns on each side
    from scipy.ndimage import gaussian_filter

    before_p = (SHAPE[0] - a.shape[0]) // 2
    out = np.empty(SHAPE, np.float32)
    out[before_p:before_p + a.shape[0]] = a
    for sl, edge in ((slice(0, before_p), a[:5]), (slice(before_p + a.shape[0], None), a[-5:])):
        n = out[sl].shape[0]
        field = gaussian_filter(rng.normal(0.0, 1.0, (n,) + SHAPE[1:]).astype(np.float32), 3.0)
        field /= field.std() + 1e-6
        out[sl] = np.maximum(0.0, edge.mean() + edge.std() * field)
    shift = np.eye(4)
    shift[:3, 3] = [-before_p, -before_s, 0]
    affine = src.affine @ shift
    hdr = src.header.copy()
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(out, affine, hdr)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    truth = np.zeros(SHAPE, bool)
    truth[before_p:before_p + seg.shape[0]] = seg
    return img, truth, None


# ----------------------------------------------------------------------------------------------------
# stage timing from the runtime's own stage events (cordseg.stages), passed to the CLI as obj={"on_stage": ...}

class StageTimer:
    """Sums the stage events of one run: wall and CPU seconds per stage name."""

    def __init__(self):
        self.run = defaultdict(float)  # wall seconds per stage
        self.cpu = defaultdict(float)  # process CPU seconds (all threads) per stage

    def __call__(self, event):
        self.run[event.stage] += event.seconds
        self.cpu[event.stage] += event.cpu_seconds


# (label, stage event): names with a dot are parts of the stage before them (indented, not summed)
STAGES = [
    ("load (io.load_image; with --qc once, in the CLI)", "load"),
    ("reorient to RPI (orientation.to_rpi)", "reorient"),
    ("find models, open their ONNX Runtime sessions", "models"),
    ("centerline: CNN1 both passes, OptiC", "centerline"),
    ("resample to CNN1 grid, once for both passes", "centerline.resample"),
    ("CNN1 on whole slices (normalise, onnx predict)", "centerline.cnn1"),
    ("CNN1 second look", "centerline.second_look"),
    ("reward, OptiC, refine; both passes", "centerline.optic"),
    ("cord CNN2 soft map", "cord"),
    ("resample crop to CNN2 grid", "cord.resample"),
    ("normalise patches", "cord.normalise"),
    ("onnx predict, CNN2 cord", "cord.cnn2"),
    ("soft map back to RPI grid", "cord.back"),
    ("lesion CNN2 soft map", "lesions"),
    ("resample crop to CNN2 grid", "lesions.resample"),
    ("normalise patches", "lesions.normalise"),
    ("onnx predict, CNN2 lesion", "lesions.cnn2"),
    ("soft map back to RPI grid", "lesions.back"),
    ("lesion screening (cord CNN2 where lesions are)", "screening"),
    ("resample crops to CNN2 grid", "screening.cord.resample"),
    ("normalise patches", "screening.cord.normalise"),
    ("onnx predict, CNN2 cord", "screening.cord.cnn2"),
    ("soft maps back to RPI grid", "screening.cord.back"),
    ("largest component", "mask"),
    ("back to the input grid, output image", "output"),
    ("lesion table", "table"),
    ("save (io.save_like)", "save"),
    ("QC picture, with --qc (qc.write_qc)", "qc"),
]


def stage_rows(runs):
    """(label, stage, indent) for every stage the runs reported: the known ones in order, then any other
    (a stage the runtime renamed or added shows under its own name instead of vanishing)."""
    seen = {k for r in runs for k in r if isinstance(k, str) and k != "total"}
    rows = [(lab, st, int("." in st)) for lab, st in STAGES if st in seen]
    known = {st for _, st in STAGES}
    rows += [(st, st, int("." in st)) for st in sorted(seen - known)]
    return rows


def in_process_runs(command: str, image: Path, out_dir: Path, repeats: int, extra=()):
    """Per-stage seconds of `cordseg COMMAND` run in this process; list of per-run dicts (+ 'total')."""
    runs = []
    for _ in range(repeats):
        timer = StageTimer()
        with warnings.catch_warnings(), open(os.devnull, "w") as null, redirect_stdout(null):
            warnings.simplefilter("ignore")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                cordseg.cli.main.main(args=[command, str(image), "-c", "t2", "-q", "-o", str(out_dir), *extra],
                                      prog_name="cordseg", standalone_mode=False, obj={"on_stage": timer})
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(f"cordseg {command} failed in-process (exit {exc.code})") from None
            total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        run = dict(timer.run)
        run["total"] = total
        run.update({("cpu", k): v for k, v in timer.cpu.items()})
        run[("cpu", "total")] = total_cpu
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------------
# the whole command in a child process

def cordseg_command() -> list[str]:
    exe = shutil.which("cordseg")
    return [exe] if exe else [sys.executable, "-m", "cordseg.cli"]


def child_run(args: list[str]) -> tuple[float, float, int, str, float]:
    """(wall seconds, peak RSS in GB of that child alone, exit code, stderr tail, CPU seconds user+sys).

    The peak comes from GNU time (/usr/bin/time -f %M) where it exists: Linux carries a process's peak RSS
    across exec, and a child started by vfork (as subprocess does) starts from this process's own peak, so
    os.wait4's ru_maxrss can never be below what this benchmark itself once held (the phantom volumes, an
    in-process run). Without GNU time, that lower bound is what is reported."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        prefix = [str(gnu_time), "-f", "%M", "-o", rss.name] if gnu_time.is_file() else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(prefix + args, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-500:]
        lines = rss.read().split()
        kib = int(lines[-1]) if prefix and lines and lines[-1].isdigit() else usage.ru_maxrss
    cpu = usage.ru_utime + usage.ru_stime
    return wall, kib / 1024.0 ** 2, proc.returncode, tail, cpu  # KiB on Linux


def whole_command(command: str, image: Path, out_dir: Path, repeats: int, extra=()):
    walls, rss, cpus = [], [], []
    for _ in range(repeats):
        wall, peak, rc, tail, cpu = child_run(cordseg_command() + [command, str(image), "-c", "t2", "-q", "-o",
                                                                   str(out_dir), *extra])
        if rc != 0:
            raise RuntimeError(f"cordseg {command} exited {rc}: {tail.strip()}")
        walls.append(wall)
        rss.append(peak)
        cpus.append(cpu)
    return walls, rss, cpus


def startup_seconds(repeats: int) -> float:
    """`cordseg --help` wall time: interpreter + imports, the fixed cost of every command."""
    return statistics.median(child_run(cordseg_command() + ["--help"])[0] for _ in range(repeats))


# ----------------------------------------------------------------------------------------------------
# the published pipeline (Gros et al. 2019 as the toolbox runs it), ONNX Runtime sessions created once

PUB_CROP = 48  # in-plane crop around the centerline, voxels at 0.5 mm
PUB_BLOCK = 80  # CNN1's input size
PUB_PATCH = 48


def published_pipeline(image_path: Path, ctr_onnx: Path, lesion_onnx: Path, out_path: Path):
    """The published t2 lesion pipeline on one image; writes the lesion mask on the input grid."""
    import onnxruntime as ort

    from cordseg.inference import Model
    from cordseg.io import load_image, save_like
    from cordseg.normalization import published_ctr, published_lesion
    from cordseg.orientation import to_rpi
    from cordseg.resampling import resample, resample_to_shape

    ctr, les = Model.open(ctr_onnx), Model.open(lesion_onnx)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s_ctr = ort.InferenceSession(str(ctr_onnx), opts, providers=["CPUExecutionProvider"])
    s_les = ort.InferenceSession(str(lesion_onnx), opts, providers=["CPUExecutionProvider"])
    img = load_image(image_path)
    rpi = to_rpi(img)
    zooms = rpi.zooms
    fine = (0.5, 0.5, zooms[2])
    vol = resample(rpi.data, zooms, fine, order=1)
    # CNN1 on the 80 x 80 blocks that tile each slice (the published tool's detection blocks), 16 per call
    x = published_ctr(vol, ctr.normalisation_params)
    nx, ny, nz = x.shape
    b = PUB_BLOCK
    xs = np.pad(x, ((0, (-nx) % b), (0, (-ny) % b), (0, 0)), mode="edge")
    corners = [(i, j) for i in range(0, xs.shape[0], b) for j in range(0, xs.shape[1], b)]
    heat_full = np.empty(xs.shape, np.float32)
    name = s_ctr.get_inputs()[0].name
    for z in range(nz):
        for k in range(0, len(corners), 16):
            part = corners[k:k + 16]
            blocks = np.stack([xs[i:i + b, j:j + b, z] for i, j in part])[..., None]
            pred = s_ctr.run(None, {name: blocks})[0][..., 0]
            for (i, j), p in zip(part, pred):
                heat_full[i:i + b, j:j + b, z] = p
    heat = np.moveaxis(heat_full[:nx, :ny], 2, 0)
    del xs, heat_full
    # centerline: centre of mass of the heat >= 0.5 per slice, gaps interpolated
    cx, cy, found = np.zeros(nz), np.zeros(nz), np.zeros(nz, bool)
    gx, gy = np.mgrid[:nx, :ny]
    for z in range(nz):
        w = np.where(heat[z] >= ctr.threshold, heat[z], 0.0)
        if w.sum() > 0:
            cx[z], cy[z], found[z] = (w * gx).sum() / w.sum(), (w * gy).sum() / w.sum(), True
    out = np.zeros(rpi.shape, np.uint8)
    print(f"published pipeline: cord found on {int(found.sum())} of {nz} slices", file=sys.stderr)
    if found.any():
        zs = np.arange(nz)
        cx, cy = np.interp(zs, zs[found], cx[found]), np.interp(zs, zs[found], cy[found])
        # 48 x 48 crop around the centerline on each slice, histogram-standardised, 0.5 mm slices
        h = PUB_CROP // 2
        lo_x = np.clip(np.rint(cx).astype(int) - h, 0, max(0, nx - PUB_CROP))
        lo_y = np.clip(np.rint(cy).astype(int) - h, 0, max(0, ny - PUB_CROP))
        crop = np.stack([np.pad(vol[lo_x[z]:lo_x[z] + PUB_CROP, lo_y[z]:lo_y[z] + PUB_CROP, z],
                                ((0, max(0, PUB_CROP - nx)), (0, max(0, PUB_CROP - ny))), mode="edge")
                         for z in range(nz)], axis=2)
        crop = published_lesion(crop, les.normalisation_params)
        iso = resample(crop, fine, (0.5, 0.5, 0.5), order=1)
        depth = iso.shape[2]
        pad = (-depth) % PUB_PATCH
        iso = np.pad(iso, ((0, 0), (0, 0), (0, pad)), mode="constant")
        prob = np.empty_like(iso)
        name = s_les.get_inputs()[0].name
        for z0 in range(0, iso.shape[2], PUB_PATCH):
            patch = iso[None, ..., z0:z0 + PUB_PATCH, None]
            prob[..., z0:z0 + PUB_PATCH] = s_les.run(None, {name: patch})[0][0, ..., 0]
        prob = resample_to_shape(prob[..., :depth], (0.5, 0.5, 0.5), crop.shape, order=1)
        fine_mask = np.zeros(vol.shape, np.uint8)
        for z in range(nz):
            part = fine_mask[lo_x[z]:lo_x[z] + PUB_CROP, lo_y[z]:lo_y[z] + PUB_CROP, z]
            part[...] = prob[:part.shape[0], :part.shape[1], z] >= les.threshold
        out = resample_to_shape(fine_mask, fine, rpi.shape, order=0)
    save_like(rpi.to_native(out), img, out_path)


def published_models(anchors: Path) -> tuple[Path, Path]:
    """(t2 CNN1, t2 CNN2-lesion) ONNX files converted from the published Keras files (once, cached)."""
    from bench.lesion_eval import import_published

    paths = import_published(PUBLISHED_CACHE, anchors, log=lambda m: print(m, file=sys.stderr))
    return paths["t2_ctr"], paths["t2_ax_lesion"]


def vs_published(anchors: Path, rounds: int, tmp: Path, warmup: int = 1):
    """Alternating rounds of `cordseg sc`, `cordseg lesion` and the published pipeline as child processes."""
    ctr, les = published_models(anchors)
    img, _, _ = phantom_volume("axial")
    path = tmp / "fov384_T2w.nii.gz"
    nib.save(img, str(path))
    out = tmp / "vs"
    out.mkdir()
    runs = {
        "cordseg sc": cordseg_command() + ["sc", str(path), "-c", "t2", "-q", "-o", str(out)],
        "cordseg lesion": cordseg_command() + ["lesion", str(path), "-c", "t2", "-q", "-o", str(out)],
        "published": [sys.executable, str(Path(__file__).resolve()), "--published-run", str(path), str(ctr),
                      str(les), str(out / "published_lesionseg.nii.gz")],
    }
    print(f"volume: axial phantom {'x'.join(map(str, img.shape))} at 1 mm; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; {rounds} alternating rounds after {warmup} warm-up round(s)")
    res = {k: [] for k in runs}
    for r in range(rounds + warmup):
        for k, args in runs.items():
            wall, peak, rc, tail, cpu = child_run(args)
            if rc != 0:
                raise SystemExit(f"{k} exited {rc}: {tail.strip()}")
            if r >= warmup:  # warm-up rounds fill the file cache
                res[k].append((wall, peak * 1024, cpu))
    pub = res["published"]
    print("\n| command | wall s (median; runs) | CPU s (median) | peak RSS MB (max) | ratio to published "
          "(median of per-round ratios) |\n|---|---|---:|---:|---:|")
    summary = {}
    for k, v in res.items():
        ratios = [a[0] / b[0] for a, b in zip(v, pub)]
        summary[k] = (statistics.median(ratios), max(x[1] for x in v))
        print(f"| {k} | {statistics.median(x[0] for x in v):.2f} ({', '.join(f'{x[0]:.2f}' for x in v)}) | "
              f"{statistics.median(x[2] for x in v):.2f} | {max(x[1] for x in v):.0f} | "
              f"{statistics.median(ratios):.2f} |")
    for k in ("cordseg sc", "cordseg lesion"):
        ratio, peak = summary[k]
        print(f"{k}: {ratio:.2f} x the published pipeline's time (target <= {TARGET_RATIO:g}: "
              f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}), peak RSS {peak:.0f} MB (target <= "
              f"{TARGET_RSS_MB:g} MB: {'met' if peak <= TARGET_RSS_MB else 'NOT met'}); published peak "
              f"{summary['published'][1]:.0f} MB")


# ----------------------------------------------------------------------------------------------------
# many scans: one command for all of them against one command per scan

MANY_SCANS = ["sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_fake_lesion.nii.gz", "unf01/sub-unf01_T2w.nii.gz",
              "unlabeled/t2_ms_axial.nii.gz", "sct_testing/t1/t1w.nii.gz"]


def many_scans(data: Path, n: int, tmp: Path):
    """Scans per minute of `cordseg sc` (t2 models) on n small real scans: one command, then one per scan."""
    src = tmp / "many"
    src.mkdir()
    paths = []
    for i in range(n):
        rel = MANY_SCANS[i % len(MANY_SCANS)]
        dst = src / f"s{i:02d}_{Path(rel).name}"
        shutil.copyfile(data / rel, dst)
        paths.append(dst)
    out = tmp / "many_out"
    out.mkdir()
    base = cordseg_command() + ["sc", "-c", "t2", "-q", "-o", str(out)]
    one, *_ = child_run(base + [str(p) for p in paths])
    sep = [child_run(base + [str(p)]) for p in paths]
    if any(r[2] for r in sep):
        raise SystemExit(f"a single-scan command failed: {[r[3] for r in sep if r[2]][0]}")
    each = sum(r[0] for r in sep)
    print(f"\n{n} small real scans ({len(set(MANY_SCANS[:n]))} distinct, {', '.join(MANY_SCANS[:min(n, 5)])}), "
          f"`cordseg sc -c t2`:")
    print("| how | wall s | scans per minute |\n|---|---:|---:|")
    print(f"| one command, {n} images | {one:.2f} | {60 * n / one:.1f} |")
    print(f"| {n} commands, one image each | {each:.2f} | {60 * n / each:.1f} |")


def memory_512(tmp: Path):
    """Peak RSS of `cordseg sc` and `cordseg lesion` on a 512 x 512 x 52 axial phantom (1 mm)."""
    ph = make_phantom((512, 512, 52), (1.0, 1.0, 1.0), axcodes=("L", "A", "S"), curvature=8.0, noise=0.05,
                      n_lesions=2, contrast="t2", blobs=12, seed=0)
    img = nib.Nifti1Image(np.asarray(ph.image.dataobj, np.float32) * 1000.0, ph.image.affine, ph.image.header)
    path = tmp / "fov512_T2w.nii.gz"
    nib.save(img, str(path))
    out = tmp / "out512"
    out.mkdir()
    for command in ("sc", "lesion"):
        wall, peak, rc, tail, cpu = child_run(cordseg_command() + [command, str(path), "-c", "t2", "-q", "-o",
                                                                   str(out)])
        if rc:
            raise SystemExit(f"cordseg {command} exited {rc}: {tail.strip()}")
        mb = peak * 1024
        print(f"512 x 512 x 52: cordseg {command} {wall:.2f} s, peak RSS {mb:.0f} MB (target <= "
              f"{TARGET_RSS_512_MB:g} MB: {'met' if mb <= TARGET_RSS_512_MB else 'NOT met'})")


# ----------------------------------------------------------------------------------------------------
# report

def report(command: str, runs, walls, rss, cpus, startup):
    print(f"\n`cordseg {command}` stages (in-process, median of {len(runs)} runs, from the runtime's stage events; "
          f"indented lines are parts of the line above them):")
    print("| stage | seconds (median) | CPU s (median) | runs (seconds) |\n|---|---:|---:|---|")
    top_sum = []
    for lab, stage, indent in stage_rows(runs):
        vals = [r.get(stage, 0.0) for r in runs]
        cpu = statistics.median(r.get(("cpu", stage), 0.0) for r in runs)
        print(f"| {'  ' * indent}{lab} | {statistics.median(vals):.3f} | {cpu:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in vals)} |")
        if indent == 0:
            top_sum.append(vals)
    totals = [r["total"] for r in runs]
    other = [t - sum(col) for t, col in zip(totals, zip(*top_sum))]
    tcpu = statistics.median(r[("cpu", "total")] for r in runs)
    print(f"| other (CLI, thresholding, glue) | {statistics.median(other):.3f} | | "
          f"{', '.join(f'{v:.2f}' for v in other)} |")
    print(f"| **in-process total** | **{statistics.median(totals):.3f}** | {tcpu:.2f} | "
          f"{', '.join(f'{v:.2f}' for v in totals)} |")
    wall, peak = statistics.median(walls), max(rss)
    print(f"\nwhole command `cordseg {command}` (child process; startup alone, `cordseg --help`: {startup:.2f} s):")
    print(f"  wall: median {wall:.2f} s over {len(walls)} runs ({', '.join(f'{w:.2f}' for w in walls)}); "
          f"target <= {TARGET_SECONDS:g} s: {'met' if wall <= TARGET_SECONDS else 'NOT met'}")
    print(f"  CPU time (user+sys, all threads): median {statistics.median(cpus):.2f} s "
          f"({', '.join(f'{c:.2f}' for c in cpus)}), i.e. >= {statistics.median(cpus) / 2:.1f} s wall even with "
          f"both cores to itself; load average now {os.getloadavg()[0]:.2f}")
    print(f"  peak RSS: {peak:.2f} GB (max over runs: {', '.join(f'{r:.2f}' for r in rss)}); "
          f"target <= {TARGET_RSS_GB:g} GB: {'met' if peak <= TARGET_RSS_GB else 'NOT met'}")
    return wall, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("phantom", "real"), default="phantom")
    p.add_argument("--layout", choices=("sagittal", "axial"), default="sagittal",
                   help="phantom only: how the 384 x 384 x 52 grid is oriented (default sagittal, as the paper's T2)")
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-lesion", action="store_true", help="time `cordseg sc` only")
    p.add_argument("--qc", action="store_true", help="run the commands with --qc (the QC picture included)")
    p.add_argument("--vs-published", action="store_true",
                   help="cordseg sc / lesion against the published pipeline, alternating (needs the train extra)")
    p.add_argument("--rounds", type=int, default=3, help="--vs-published: counted rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="--vs-published: rounds not counted, first (default 1)")
    p.add_argument("--anchors", type=Path, default=REPO.parent / "shared" / "anchors")
    p.add_argument("--many", action="store_true", help="scans per minute: one command for --n scans vs one each")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--memory-512", action="store_true", help="peak RSS on a 512 x 512 x 52 axial scan")
    p.add_argument("--published-run", nargs=4, type=Path, metavar=("IMAGE", "CTR", "LESION", "OUT"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.published_run:
        return published_pipeline(*a.published_run)
    if a.vs_published or a.many or a.memory_512:
        with tempfile.TemporaryDirectory(prefix="cordseg_speed_") as tmp:
            if a.vs_published:
                vs_published(a.anchors, a.rounds, Path(tmp), a.warmup)
            if a.many:
                many_scans(a.data, a.n, Path(tmp))
            if a.memory_512:
                memory_512(Path(tmp))
        return

    with tempfile.TemporaryDirectory(prefix="cordseg_speed_") as tmp:
        tmp = Path(tmp)
        img, truth, n_lesions = phantom_volume(a.layout) if a.source == "phantom" else real_volume(a.data)
        path = tmp / "bench_T2w.nii.gz"
        nib.save(img, str(path))
        out_dir = tmp / "out"
        out_dir.mkdir()
        from cordseg.orientation import to_rpi

        rpi_shape = to_rpi(img).shape
        desc = (f"phantom ({a.layout})" if a.source == "phantom" else "real t2.nii.gz padded")
        print(f"volume: {desc}, native {'x'.join(map(str, img.shape))} {''.join(nib.aff2axcodes(img.affine))} "
              f"at {'x'.join(f'{z:g}' for z in img.header.get_zooms()[:3])} mm; RPI {'x'.join(map(str, rpi_shape))} "
              f"({rpi_shape[2]} axial slices of {rpi_shape[0]}x{rpi_shape[1]}); "
              f"{path.stat().st_size / 1e6:.1f} MB .nii.gz")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
              f"command: {' '.join(Path(c).name for c in cordseg_command())}")
        startup = startup_seconds(min(a.repeats, 3))
        summary = []
        for command in (["sc"] if a.no_lesion else ["sc", "lesion"]):
            extra = ["--qc"] if a.qc else []
            runs = in_process_runs(command, path, out_dir, a.repeats, extra)
            walls, rss, cpus = whole_command(command, path, out_dir, a.repeats, extra)
            wall, peak = report(command, runs, walls, rss, cpus, startup)
            summary.append((command, wall, peak))
        from cordseg.metrics import dice

        seg = nib.load(str(out_dir / "bench_T2w_seg.nii.gz"))
        found = np.asarray(seg.dataobj) > 0
        print(f"\nsanity: cord voxels found {int(found.sum())}, true {int(truth.sum())}, Dice {dice(found, truth):.3f} "
              f"(output grid {'x'.join(map(str, seg.shape))}, same as the input: {seg.shape == img.shape})")
        les_path = out_dir / "bench_T2w_lesionseg.nii.gz"
        if les_path.is_file() and n_lesions is not None:
            from cordseg.lesions import lesion_table

            print(f"sanity: lesions found {len(lesion_table(nib.load(str(les_path))))}, phantom lesions inserted "
                  f"{n_lesions}")
        for command, wall, peak in summary:
            print(f"speed: cordseg {command} {wall:.2f} s (target <= {TARGET_SECONDS:g} s: "
                  f"{'met' if wall <= TARGET_SECONDS else 'NOT met'}), peak RSS {peak:.2f} GB "
                  f"(target <= {TARGET_RSS_GB:g} GB: {'met' if peak <= TARGET_RSS_GB else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Speed and memory of `cordseg sc` (and `cordseg lesion`) on a 384 x 384 x 52, 1 mm T2-like volume.

python bench/speed.py [--source phantom|real] [--layout sagittal|axial] [--repeats 3] [--no-lesion]

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
    """(wall seconds, peak RSS in GB of that child alone, exit code, stderr tail, CPU seconds user+sys)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-500:]
    cpu = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss / 1024.0 ** 2, proc.returncode, tail, cpu  # ru_maxrss: KiB on Linux


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
    a = p.parse_args(argv)

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

"""Throughput of `cordseg study` on the real scans in ../shared/data: scans per minute with one process,
two local processes and a two-worker Dask LocalCluster, the scheduler's own cost per task, and the memory
each worker holds.

    python bench/study.py                    # all three set-ups, tasks sc,lesion
    python bench/study.py --tasks sc --repeat 2 --skip-dask

The scans are linked (symlinks) into a temporary BIDS tree, one subject per scan; each set-up writes into
its own empty derivatives folder, so nothing is reused between them. Timings are wall clock on this
machine as it is (other jobs included: the load average is printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# BIDS name in the temporary tree -> scan under ../shared/data
SCANS = {
    "sub-t2/anat/sub-t2_T2w.nii.gz": "sct_testing/t2/t2.nii.gz",
    "sub-t2lesion/anat/sub-t2lesion_T2w.nii.gz": "sct_testing/t2/t2_fake_lesion.nii.gz",
    "sub-t1/anat/sub-t1_T1w.nii.gz": "sct_testing/t1/t1w.nii.gz",
    "sub-mt/anat/sub-mt_acq-MTon_MTS.nii.gz": "sct_testing/mt/mt0.nii.gz",
    "sub-dwi/dwi/sub-dwi_dwi.nii.gz": "sct_testing/dmri/dwi_mean.nii.gz",
    "sub-dmri/dwi/sub-dmri_dwi.nii.gz": "extra/dmri.nii.gz",
    "sub-unf01/anat/sub-unf01_T1w.nii.gz": "unf01/sub-unf01_T1w.nii.gz",
    "sub-unf01/anat/sub-unf01_T2w.nii.gz": "unf01/sub-unf01_T2w.nii.gz",
    "sub-msaxial/anat/sub-msaxial_T2w.nii.gz": "unlabeled/t2_ms_axial.nii.gz",
    "sub-lumbar/anat/sub-lumbar_T2w.nii.gz": "unlabeled/t2_lumbar.nii.gz",
    "sub-01/anat/sub-01_acq-MTon_MTS.nii.gz": "unlabeled/sub-01_acq-MTon_MTS.nii.gz",
    "sub-01/anat/sub-01_acq-MToff_MTS.nii.gz": "extra/sub-01_acq-MToff_MTS.nii.gz",
    "sub-03/anat/sub-03_acq-MToff_MTS.nii.gz": "unlabeled/sub-03_acq-MToff_MTS.nii.gz",
    "sub-03/anat/sub-03_acq-MTon_MTS.nii.gz": "extra/sub-03_acq-MTon_MTS.nii.gz",
    "sub-rgb/anat/sub-rgb_T2w.nii.gz": "bad_input/rgb.nii.gz",
}


def build_tree(root: Path, repeat: int) -> int:
    n = 0
    for r in range(repeat):
        for rel, src in SCANS.items():
            if repeat > 1:  # copies become other subjects: sub-t2 -> sub-t2r1
                sub = rel.split("/", 1)[0]
                rel = rel.replace(sub, f"{sub}r{r}")
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(DATA / src, target)
            n += 1
    return n


def _noop(x):
    return x


def pool_overhead(n: int = 200) -> float:
    """Seconds per task that a 2-process pool adds to a task doing nothing (started pool, warm)."""
    from cordseg.study import _pool_context

    with ProcessPoolExecutor(2, mp_context=_pool_context()) as ex:
        list(ex.map(_noop, range(20)))
        t = time.perf_counter()
        futures = [ex.submit(_noop, i) for i in range(n)]
        [f.result() for f in futures]
        return (time.perf_counter() - t) / n


def dask_overhead(client, n: int = 200) -> float:
    client.gather(client.map(_noop, range(20), pure=False))
    t = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - t) / n


def run(label, root: Path, out: Path, tasks: str, **kwargs) -> dict:
    from cordseg.study import run_study

    peak, cpu = {}, []

    def watch(row, result):
        if result is not None and result["seconds"] > 0:
            cpu.append(result.get("cpu_seconds", 0.0))
        if result is not None and result.get("max_rss_mb"):
            peak[result["worker"]] = max(peak.get(result["worker"], 0.0), result["max_rss_mb"])

    t = time.perf_counter()
    res = run_study(root, out, tasks=tasks, on_result=watch, **kwargs)
    wall = time.perf_counter() - t
    done = [r for r in res.rows if r["worker"] != "n/a"]  # computed in this run (not skipped, not reused)
    busy = sum(float(r["seconds"]) for r in done)
    return {"label": label, "scans": len(done), "wall": wall, "per_scan": busy / max(1, len(done)),
            "cpu_per_scan": sum(cpu) / max(1, len(cpu)), "per_min": 60 * len(done) / wall, "peak": peak,
            "counts": res.counts}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sc,lesion")
    ap.add_argument("--repeat", type=int, default=1, help="link each scan this many times (more subjects)")
    ap.add_argument("--skip-dask", action="store_true")
    args = ap.parse_args(argv)
    if not (DATA / "README.md").is_file():
        sys.exit(f"no real data at {DATA}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        n = build_tree(root, args.repeat)
        print(f"{n} scans linked from {DATA}; tasks {args.tasks}; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        cores = os.cpu_count() or 1
        r = run("--jobs 1", root, Path(tmp) / "out1", args.tasks, jobs=1, threads=cores)
        results.append(r)
        results.append(run("--jobs 2", root, Path(tmp) / "out2", args.tasks, jobs=2, threads=max(1, cores // 2)))
        overhead = {"local pool (2 processes)": pool_overhead()}
        if not args.skip_dask:
            from distributed import Client, LocalCluster

            t = time.perf_counter()
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=40) as cluster, Client(cluster) as client:
                started = time.perf_counter() - t
                r = run("Dask LocalCluster, 2 workers x 1 thread", root, Path(tmp) / "out3", args.tasks,
                        dask=client, threads=max(1, cores // 2))
                r["note"] = f"cluster start {started:.1f} s (not counted)"
                results.append(r)
                overhead["Dask LocalCluster (2 workers)"] = dask_overhead(client)
    print()
    print("| set-up | scans | wall s | s per scan in a worker | CPU s per scan | scans/min "
          "| peak memory per worker (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mem = ", ".join(f"{v:.0f}" for v in r["peak"].values())
        print(f"| {r['label']} | {r['scans']} | {r['wall']:.1f} | {r['per_scan']:.2f} | {r['cpu_per_scan']:.2f} | "
              f"{r['per_min']:.1f} | {mem} |")
    for r in results:
        if r.get("note"):
            print(f"{r['label']}: {r['note']}")
    print()
    print("| scheduler | overhead per task (ms, no-op tasks) |")
    print("|---|---|")
    for k, v in overhead.items():
        print(f"| {k} | {1000 * v:.2f} |")


if __name__ == "__main__":
    main()

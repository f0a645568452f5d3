"""Whole studies: a BIDS dataset in, BIDS derivatives and one results table out.

    from cordseg.study import run_study
    result = run_study("bids/", tasks=("sc", "lesion"), jobs=2)        # local worker processes
    result = run_study("bids/", dask="tcp://scheduler:8786")           # an existing Dask cluster
    result.rows          # one dict per image, as in results.tsv

What it writes (OUT defaults to BIDS_DIR/derivatives/cordseg):

    OUT/dataset_description.json          DatasetType "derivative", GeneratedBy, DatasetLinks.raw
    OUT/results.tsv                        one row per image (RESULT_COLUMNS)
    OUT/lesions.tsv                        one row per lesion, with the image it is in
    OUT/sub-X/[ses-Y/]anat/<source stem>_label-SC_seg.nii.gz (+ .json)          cord
    OUT/sub-X/[ses-Y/]anat/<source stem>_label-lesion_seg.nii.gz (+ .json)      lesions
    OUT/sub-X/[ses-Y/]anat/<source stem>_label-centerline_seg.nii.gz (+ .json)  centerline (one voxel a slice)

(dwi images go to dwi/ instead of anat/, as their sources). Each JSON sidecar holds GeneratedBy (name,
version, the model file, its SHA-256, the models the output depends on, the command and the options),
Sources (`bids:raw:<path in the raw dataset>`) and the figures that went into results.tsv.

Resuming: an output whose mask and sidecar exist, and whose sidecar names the current cordseg version, the
SHA-256 of each model it depends on and the current options, is kept and not computed again; its figures are
read back from the sidecar. Every file is written to a temporary name in its folder and renamed into place
(mask first, sidecar last), so an interrupted run leaves complete files only; a killed run's temporary files
are removed when the next run starts. A failure (an unreadable image, no cord found) is one row with its
reason, and the study goes on.

The per-image work is one function, process_image, which the serial loop, the local process pool and Dask
all call; each worker keeps one Segmenter per contrast for its life (models opened once).
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CordsegError, CordsegWarning, InputError, ModelError, OutputError
from .io import nifti_stem, write_bytes_atomic

__all__ = ["run_study", "find_images", "process_image", "StudyOptions", "StudyResult", "BidsImage", "ImageJob",
           "RESULT_COLUMNS", "LESION_COLUMNS", "OUTPUT_SUFFIX", "SUFFIX_CONTRAST", "bids_check"]

CODE_URL = "https://github.com/cordseg/cordseg"
BIDS_VERSION = "1.9.0"
TASKS = ("centerline", "sc", "lesion")
DEFAULT_TASKS = ("sc", "lesion")
# BIDS suffix -> model contrast. MTS (magnetisation transfer) images are gradient echoes: the T2* models;
# the T1-weighted image of an MTS set (acq-T1w) goes to the T1 models.
SUFFIX_CONTRAST = {"T1w": "t1", "T2w": "t2", "T2star": "t2s", "T2starw": "t2s", "MTS": "t2s", "dwi": "dwi"}
DATATYPES = ("anat", "dwi")
OUTPUT_SUFFIX = {"sc": "_label-SC_seg", "lesion": "_label-lesion_seg", "centerline": "_label-centerline_seg"}
# the models an output depends on: its sidecar names each one's SHA-256 ("conus", where the centerline ends:
# only where one serves the contrast)
DEPENDS = {"centerline": ("centerline", "conus"), "sc": ("centerline", "conus", "sc"),
           "lesion": ("centerline", "conus", "lesion", "sc")}
RESULT_COLUMNS = ["image", "subject", "session", "suffix", "contrast", "tasks", "status", "reason",
                  "cord_volume_mm3", "cord_length_mm", "mean_csa_mm2", "lesion_count", "lesion_volume_mm3",
                  "centerline_slices", "seconds", "reused", "worker", "notes"]
LESION_COLUMNS = ["image", "subject", "session", "id", "volume_mm3", "x_mm", "y_mm", "z_mm", "first_slice",
                  "last_slice", "contrast", "local_contrast"]  # contrasts: as `cordseg lesion --csv` (n/a: no cord)
TABLE_EVERY_S = 10.0  # results.tsv is rewritten at most this often while a study runs, and at its end
MAX_POOL_BREAKS = 2  # an image in flight when a local worker died this often more is failed, not resubmitted
PLUGIN_NAME = "cordseg-segmenters"
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(?:\.nii\.gz|\.nii|\.tmp)$")  # cordseg.io's atomic writes


# --------------------------------------------------------------------------- finding the images


@dataclass(frozen=True)
class BidsImage:
    """One image of the raw dataset. contrast None: no model reads this suffix (`why` says so)."""

    path: str  # absolute
    relpath: str  # relative to the BIDS root, with /
    subject: str  # "sub-01"
    session: str | None  # "ses-02" or None
    datatype: str  # anat, dwi
    suffix: str
    entities: tuple  # (("acq", "MTon"), ...)
    contrast: str | None
    why: str = ""

    @property
    def stem(self) -> str:
        return nifti_stem(self.relpath.rsplit("/", 1)[-1])


def contrast_of(suffix: str, entities: dict) -> str | None:
    if suffix == "MTS" and "t1" in entities.get("acq", "").lower():
        return "t1"
    return SUFFIX_CONTRAST.get(suffix)


def _parse_name(stem: str):
    parts = stem.split("_")
    entities = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep:
            return None, None
        entities[key] = value
    return parts[-1], entities


def find_images(bids_dir, participant_labels=None, include=None, exclude=None) -> list[BidsImage]:
    """The images of a BIDS dataset: sub-*/[ses-*/]{anat,dwi}/*.nii[.gz], sorted by path.

    participant_labels: labels (with or without "sub-") to keep. include/exclude: cordseg.selection
    Selection objects (or None). Files whose names are not BIDS (no suffix, entities without a value) are
    left out; images with a suffix no model reads are returned with contrast None."""
    root = Path(bids_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (give the root of a BIDS dataset).")
    wanted = None
    if participant_labels:
        wanted = {p if p.startswith("sub-") else f"sub-{p}" for p in participant_labels}
    found = []
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir() or (wanted is not None and sub_dir.name not in wanted):
            continue
        session_dirs = [d for d in sorted(sub_dir.glob("ses-*")) if d.is_dir()] or [None]
        for ses_dir in session_dirs:
            base = ses_dir or sub_dir
            for datatype in DATATYPES:
                folder = base / datatype
                if not folder.is_dir():
                    continue
                for f in sorted(folder.iterdir()):
                    name = f.name
                    if name.startswith(".") or not (name.endswith(".nii.gz") or name.endswith(".nii")):
                        continue
                    suffix, entities = _parse_name(nifti_stem(name))
                    if suffix is None or entities.get("sub") != sub_dir.name[4:]:
                        continue
                    rel = f.relative_to(root).as_posix()
                    ses = ses_dir.name if ses_dir else None
                    if include is not None and not include.matches(sub_dir.name, ses, rel):
                        continue
                    if exclude is not None and exclude.matches(sub_dir.name, ses, rel):
                        continue
                    contrast = contrast_of(suffix, entities)
                    why = "" if contrast else f"no cordseg model reads '{suffix}' images"
                    found.append(BidsImage(str(f.absolute()), rel, sub_dir.name, ses, datatype, suffix,
                                           tuple(entities.items()), contrast, why))
    wanted_missing = sorted(wanted - {i.subject for i in found}) if wanted else []
    if wanted_missing and not found:
        raise InputError(f"{root}: no images for participant(s) {', '.join(wanted_missing)}.")
    return found


# --------------------------------------------------------------------------- options and jobs


@dataclass(frozen=True)
class StudyOptions:
    """What is computed. Changing a value re-runs the outputs it concerns on the next run (threads do not:
    they change the speed, not the answer)."""

    tasks: tuple = DEFAULT_TASKS
    threads: int | None = None
    smoothness: float | None = None  # None: the centerline's default
    sc_threshold: float | None = None  # None: the model's own
    lesion_threshold: float | None = None
    min_contrast: float | None = None
    conus: bool = True  # end the centerline at the conus (cordseg.conus, t1/t2)

    def __post_init__(self):
        from .inputs import check_flag, check_min_contrast, check_smoothness, check_threads, check_threshold

        tasks = tuple(dict.fromkeys(str(t).strip().lower() for t in self.tasks if str(t).strip()))
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise InputError(f"unknown task(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
        object.__setattr__(self, "tasks", tuple(t for t in TASKS if t in tasks))
        check_threads(self.threads, "threads")
        if self.smoothness is not None:
            check_smoothness(self.smoothness)
        check_threshold(self.sc_threshold, "the cord threshold")
        check_threshold(self.lesion_threshold, "the lesion threshold")
        check_min_contrast(self.min_contrast)
        check_flag(self.conus, "conus")

    def for_output(self, task: str) -> dict:
        """The options an output of `task` depends on (recorded in its sidecar, compared on resume)."""
        opts = {"smoothness": self.smoothness, "conus": self.conus}
        if task == "sc":
            opts["threshold"] = self.sc_threshold
        if task == "lesion":
            opts.update(threshold=self.lesion_threshold, min_contrast=self.min_contrast)
        return opts


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker needs for one image (picklable; paths are absolute)."""

    image: BidsImage
    out_dir: str
    tasks: tuple  # the tasks to compute now
    options: StudyOptions
    command: str
    version: str
    source: dict  # source_fingerprint() when planned


@dataclass
class StudyResult:
    out_dir: Path
    rows: list
    lesions: list
    results_tsv: Path
    lesions_tsv: Path
    counts: dict  # ok / failed / skipped / reused (images whose every output was up to date)
    seconds: float
    notes: list = field(default_factory=list)
    qc_report: Path | None = None


def output_path(out_dir, image: BidsImage, task: str) -> Path:
    folder = Path(out_dir) / Path(image.relpath).parent
    return folder / f"{image.stem}{OUTPUT_SUFFIX[task]}.nii.gz"


def sidecar_path(mask_path) -> Path:
    mask_path = Path(mask_path)
    return mask_path.with_name(nifti_stem(mask_path.name) + ".json")


# --------------------------------------------------------------------------- models and provenance


def file_sha256(path, _cache={}) -> str:  # noqa: B006 - keyed by (path, size, mtime): a changed file re-hashes
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def _model_records(task: str, contrast: str, resolve, conus: bool = True) -> list:
    """[{"Task", "Name", "SHA256"}] for the models an output of `task` depends on; `resolve(task, contrast)`
    gives a model's path or raises ModelError. A missing screening model (sc, for lesions) or conus model (for
    contrasts it does not serve, or when `conus` is off) is left out."""
    records = []
    for dep in DEPENDS[task]:
        if dep == "conus" and not conus:
            continue
        try:
            path = resolve(dep, contrast)
        except ModelError:
            if dep == "conus" or (task == "lesion" and dep == "sc"):
                continue
            raise
        records.append({"Task": dep, "Name": Path(path).name, "SHA256": file_sha256(path)})
    return records


def _driver_resolve(task, contrast):
    from .inference import find_model

    return find_model(task, contrast).path


def _generated_by(job: ImageJob, task: str, models: list) -> dict:
    main = next(m for m in models if m["Task"] == task)
    return {"Name": "cordseg", "Version": job.version, "CodeURL": CODE_URL, "Model": main["Name"],
            "ModelSHA256": main["SHA256"], "Models": models, "Command": job.command,
            "Options": job.options.for_output(task)}


def source_fingerprint(path) -> dict:
    """Size and modification time of a source image: a replaced or edited input is segmented again."""
    st = os.stat(path)
    return {"Size": st.st_size, "MTimeNs": st.st_mtime_ns}


def _up_to_date(mask: Path, version: str, models: list, options: dict, source: dict):
    """The sidecar's Metrics when `mask` and its sidecar exist and match; else None."""
    side = sidecar_path(mask)
    if not (mask.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
        gen = meta["GeneratedBy"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if gen.get("Version") != version or gen.get("Options") != options or meta.get("SourceFile") != source:
        return None
    if [(m.get("Task"), m.get("SHA256")) for m in gen.get("Models", [])] != [(m["Task"], m["SHA256"]) for m in models]:
        return None
    metrics = meta.get("Metrics")
    return metrics if isinstance(metrics, dict) else None


# --------------------------------------------------------------------------- the per-image work


# A worker process's own Segmenters (one per contrast and settings), kept for its life. Set only in the
# processes of the local pool (by _init_pool_worker); Dask workers keep theirs in a WorkerPlugin; the serial
# loop passes its own dict.
_POOL_CACHE: dict | None = None


def _init_pool_worker():
    global _POOL_CACHE
    _POOL_CACHE = {}
    # Ctrl-C, and SIGTERM sent to the whole job, are the parent's to handle: it stops the pool, each worker
    # finishes the image in hand (whole files) and leaves; a SIGKILL that follows leaves at most temporary
    # files, which the next run removes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SegmenterPlugin:
    """Dask worker plugin: each worker (thread) keeps its Segmenters, so models open once per worker."""

    name = PLUGIN_NAME

    def __init__(self):
        self.caches = {}

    def setup(self, worker):
        self.caches = {}

    def teardown(self, worker):
        self.caches.clear()

    def cache(self) -> dict:
        return self.caches.setdefault(threading.get_ident(), {})


def _worker_cache() -> dict:
    if _POOL_CACHE is not None:
        return _POOL_CACHE
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except (ImportError, ValueError, AttributeError):
        plugin = None
    return plugin.cache() if plugin is not None else {}


def _segmenter(cache: dict, contrast: str, options: StudyOptions):
    key = ("segmenter", contrast, options.threads, options.smoothness, options.conus)
    if key not in cache:
        from .segmenter import Segmenter

        kwargs = {} if options.smoothness is None else {"smoothness": options.smoothness}
        cache[key] = Segmenter(contrast, threads=options.threads, conus=options.conus, **kwargs)
    return cache[key]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, CordsegError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _load_source(image: BidsImage, notes: list):
    """The image to segment: the file itself; for a 4D dwi series, the mean of its diffusion-weighted
    volumes (io.mean_volumes), on the series' 3D grid."""
    from .io import load_image

    if image.contrast != "dwi":
        return load_image(image.path)
    src = load_image(image.path, volume="mean")
    if "cordseg_volumes" in src.extra:  # a 4D series (a 3D dwi image is its own mean)
        notes.append(src.extra["cordseg_volumes"])
    return src


def _cord_metrics(mask_img, notes: list) -> dict:
    data = np.asarray(mask_img.dataobj) > 0
    zooms = [float(z) for z in mask_img.header.get_zooms()[:3]]
    out = {"cord_volume_mm3": float(data.sum() * np.prod(zooms))}
    try:
        from .morphometry import morphometry
    except ImportError:
        morphometry = None
    if morphometry is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CordsegWarning)
                row = morphometry(mask_img).rows[0]
            out["mean_csa_mm2"] = float(row["MEAN(area)"])
            out["cord_length_mm"] = float(row["SUM(length)"])
            out["csa_method"] = "angle-corrected (cordseg.morphometry)"
            return out
        except (CordsegError, KeyError, IndexError, ValueError) as exc:
            notes.append(f"morphometry: {_one_line(exc)}; plain axial areas instead")
    from .orientation import to_rpi

    rpi = to_rpi(mask_img)
    z_mm = rpi.zooms[2]
    per_slice = (np.asarray(rpi.data) > 0).sum(axis=(0, 1)) * rpi.zooms[0] * rpi.zooms[1]
    cord = per_slice[per_slice > 0]
    out["mean_csa_mm2"] = float(cord.mean()) if cord.size else float("nan")
    out["cord_length_mm"] = float(cord.size * z_mm)
    out["csa_method"] = "axial slice areas, not angle-corrected"
    return out


def _lesion_metrics(mask_img, image, cord_img) -> dict:
    from .lesions import lesion_table

    try:
        table = lesion_table(mask_img, image=np.asanyarray(image.dataobj),
                             cord=None if cord_img is None else np.asanyarray(cord_img.dataobj))
    except TypeError:  # an older lesion_table without the contrast columns
        table = lesion_table(mask_img)
    rows = [{k: getattr(les, k) for k in ("id", "volume_mm3", "first_slice", "last_slice")}
            | dict(zip(("x_mm", "y_mm", "z_mm"), les.centroid_mm))
            | {k: getattr(les, k, None) for k in ("contrast", "local_contrast")} for les in table]
    return {"lesion_count": len(rows), "lesion_volume_mm3": float(sum(r["volume_mm3"] for r in rows)),
            "lesions": rows}


def _write_output(job: ImageJob, task: str, img, models: list, metrics: dict, seconds: float) -> Path:
    from .io import save_like

    path = output_path(job.out_dir, job.image, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_like(np.asanyarray(img.dataobj), img, path, dtype=np.uint8)
    side = {"GeneratedBy": [_generated_by(job, task, models)],
            "Sources": [f"bids:raw:{job.image.relpath}"], "SourceFile": job.source,
            "Metrics": metrics, "Seconds": round(seconds, 3)}
    write_bytes_atomic((json.dumps(side, indent=2) + "\n").encode(), sidecar_path(path))
    return path


def _remove_output(job: ImageJob, task: str) -> None:
    """A task that failed now leaves no earlier output of its own behind (the table and the files agree)."""
    path = output_path(job.out_dir, job.image, task)
    for p in (sidecar_path(path), path):  # sidecar first: a mask without one is never taken as current
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def process_image(job: ImageJob, cache: dict | None = None) -> dict:
    """Segment one image for job.tasks, write its outputs and sidecars, and return what the table needs:
    {"image", "done": {task: metrics}, "failed": {task: reason}, "reason", "seconds", "notes", "worker"}.

    Errors of the image (unreadable, no cord) come back as reasons, never raised; `cache` holds the
    worker's Segmenters (None: the worker process's own)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cache = _worker_cache() if cache is None else cache
    image = job.image
    done, failed, notes = {}, {}, []
    result = {"image": image.relpath, "done": done, "failed": failed, "reason": "", "notes": notes,
              "worker": f"{os.uname().nodename}:{os.getpid()}", "pid": os.getpid()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CordsegWarning)
        try:
            _segment(job, cache, done, failed, notes)
        except CordsegError as exc:  # the image itself: unreadable, no cord, no model
            result["reason"] = _one_line(exc)
        except MemoryError:
            result["reason"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one image's bug must not stop a study of thousands
            result["reason"] = "internal error: " + _one_line(exc)
    for w in caught:
        if issubclass(w.category, CordsegWarning):
            notes.append(_one_line(w.message))
    # messages name the file by its absolute path; the table names it already, relative to the root
    result["reason"] = result["reason"].replace(image.path + ": ", "").replace(image.path, image.relpath)
    for task, why in failed.items():
        failed[task] = why.replace(image.path + ": ", "").replace(image.path, image.relpath)
    notes[:] = [n.replace(image.path + ": ", "").replace(image.path, image.relpath) for n in notes]
    if result["reason"]:
        for task in job.tasks:
            if task not in done:
                failed.setdefault(task, result["reason"])
                _remove_output(job, task)
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0  # all threads of the worker process
    result["max_rss_mb"] = _max_rss_mb()
    return result


def _max_rss_mb() -> float | None:
    """The worker process's peak resident memory so far (MB), where the platform says.

    Linux: VmHWM of this process's own memory map (getrusage's ru_maxrss survives exec, so a worker that a
    big process started would report its parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _segment(job: ImageJob, cache: dict, done: dict, failed: dict, notes: list) -> None:
    image = job.image
    seg = _segmenter(cache, image.contrast, job.options)
    src = _load_source(image, notes)
    opts = job.options

    def resolve(task, contrast):
        model = seg.model(task, contrast, optional=task == "conus")  # a missing one is looked up once
        if model is None:
            raise ModelError(f"no '{task}' model for contrast '{contrast}'")
        return model.path

    def records(task):
        return _model_records(task, image.contrast, resolve, opts.conus)

    def timed_task(task, fn):
        t = time.perf_counter()
        try:
            return fn(), time.perf_counter() - t
        except CordsegError as exc:
            failed[task] = _one_line(exc)
            _remove_output(job, task)
            return None, 0.0

    t = time.perf_counter()
    cl_img, cl = seg.centerline(src)
    cl_seconds = time.perf_counter() - t
    n_slices = int(len(cl.z))
    if "centerline" in job.tasks:
        metrics = {"centerline_slices": n_slices}
        _write_output(job, "centerline", cl_img, records("centerline"), metrics, cl_seconds)
        done["centerline"] = metrics
    cord_img = None
    if "sc" in job.tasks:
        cord_img, s = timed_task("sc", lambda: seg.cord(src, centerline=cl, threshold=opts.sc_threshold))
        if cord_img is not None:
            metrics = _cord_metrics(cord_img, notes) | {"centerline_slices": n_slices}
            _write_output(job, "sc", cord_img, records("sc"), metrics, cl_seconds + s)
            done["sc"] = metrics
    if "lesion" in job.tasks:
        les_img, s = timed_task("lesion", lambda: seg.lesions(src, centerline=cl, threshold=opts.lesion_threshold,
                                                              min_contrast=opts.min_contrast))
        if les_img is not None:
            metrics = _lesion_metrics(les_img, src, cord_img) | {"centerline_slices": n_slices}
            _write_output(job, "lesion", les_img, records("lesion"), metrics, cl_seconds + s)
            done["lesion"] = metrics


# --------------------------------------------------------------------------- planning and the table


@dataclass
class _Plan:
    image: BidsImage
    runnable: tuple = ()  # tasks with a model for the contrast
    skipped: dict = field(default_factory=dict)  # task -> why (no model)
    reused: dict = field(default_factory=dict)  # task -> metrics read back from its sidecar
    job: ImageJob | None = None


def _plan(images, out_dir: Path, options: StudyOptions, command: str, version: str) -> list:
    plans, records = [], {}
    for image in images:
        plan = _Plan(image)
        plans.append(plan)
        if image.contrast is None:
            plan.skipped = {t: image.why for t in options.tasks}
            continue
        runnable = []
        try:
            source = source_fingerprint(image.path)
        except OSError:
            source = None
        for task in options.tasks:
            key = (task, image.contrast)
            if key not in records:
                try:
                    records[key] = _model_records(task, image.contrast, _driver_resolve, options.conus)
                except ModelError:
                    records[key] = None
            if records[key] is None:
                plan.skipped[task] = f"no {task} model for {image.contrast}"
                continue
            runnable.append(task)
            metrics = _up_to_date(output_path(out_dir, image, task), version, records[key],
                                  options.for_output(task), source)
            if metrics is not None:
                plan.reused[task] = metrics
        plan.runnable = tuple(runnable)
        todo = tuple(t for t in runnable if t not in plan.reused)
        if todo:
            plan.job = ImageJob(image, str(out_dir), todo, options, command, version, source)
    return plans


def _lesion_cell(column, value):
    if column.endswith(("_mm", "mm3")):
        return _fmt(value)
    return _fmt(value, 3) if column.endswith("contrast") else value


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _row(plan: _Plan, result: dict | None) -> tuple[dict, list]:
    image = plan.image
    metrics, failed = {}, {}
    for task in TASKS:  # centerline, sc, lesion: later tasks' shared keys win
        if task in plan.reused:
            metrics.update(plan.reused[task])
        if result and task in result["done"]:
            metrics.update(result["done"][task])
    if result:
        failed = dict(result["failed"])
    done = [t for t in plan.runnable if t in plan.reused or (result and t in result["done"])]
    reasons = [f"{t}: {why}" for t, why in failed.items()]
    if failed and set(failed) == set(plan.runnable) and len(set(failed.values())) == 1:
        reasons = [next(iter(failed.values()))]  # one reason for the whole image (unreadable, no cord)
    if result and result["reason"] and not failed:
        reasons.append(result["reason"])
    status = "failed" if reasons else ("ok" if done else "skipped")
    if image.contrast is None:
        reasons.append(image.why)
    else:
        reasons += [f"{t} skipped: {why}" for t, why in plan.skipped.items()]
    lesion_rows = []
    for les in metrics.get("lesions", []) if "lesion" in done else []:
        lesion_rows.append({"image": image.relpath, "subject": image.subject, "session": image.session or "n/a"}
                           | {k: _lesion_cell(k, les.get(k)) for k in LESION_COLUMNS[3:]})
    has = set(done)
    row = {
        "image": image.relpath, "subject": image.subject, "session": image.session or "n/a",
        "suffix": image.suffix, "contrast": image.contrast or "n/a", "tasks": ",".join(done) or "n/a",
        "status": status, "reason": "; ".join(reasons) or "n/a",
        "cord_volume_mm3": _fmt(metrics.get("cord_volume_mm3")) if "sc" in has else "n/a",
        "cord_length_mm": _fmt(metrics.get("cord_length_mm")) if "sc" in has else "n/a",
        "mean_csa_mm2": _fmt(metrics.get("mean_csa_mm2")) if "sc" in has else "n/a",
        "lesion_count": _fmt(metrics.get("lesion_count")) if "lesion" in has else "n/a",
        "lesion_volume_mm3": _fmt(metrics.get("lesion_volume_mm3")) if "lesion" in has else "n/a",
        "centerline_slices": _fmt(metrics.get("centerline_slices")) if has else "n/a",
        "seconds": _fmt(result["seconds"]) if result else "0.00",
        "reused": ",".join(t for t in plan.runnable if t in plan.reused) or "n/a",
        "worker": result["worker"] if result else "n/a",
        "notes": "; ".join(result["notes"]) if result and result["notes"] else "n/a",
    }
    return row, lesion_rows


def _tsv_bytes(rows, columns) -> bytes:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: str(r.get(k, "n/a")).replace("\t", " ").replace("\n", " ") for k in columns})
    return buf.getvalue().encode()


class _Table:
    """Rows so far, rewritten (atomically) at most every TABLE_EVERY_S and at the end."""

    def __init__(self, out_dir: Path, on_result):
        self.out_dir, self.on_result = out_dir, on_result
        self.rows, self.lesions, self.last = {}, {}, 0.0

    def add(self, plan: _Plan, result: dict | None):
        row, lesions = _row(plan, result)
        self.rows[plan.image.relpath], self.lesions[plan.image.relpath] = row, lesions
        if self.on_result is not None:
            self.on_result(row, result)
        if time.monotonic() - self.last > TABLE_EVERY_S:
            self.write()

    def write(self):
        self.last = time.monotonic()
        rows = [self.rows[k] for k in sorted(self.rows)]
        lesions = [les for k in sorted(self.lesions) for les in self.lesions[k]]
        write_bytes_atomic(_tsv_bytes(rows, RESULT_COLUMNS), self.out_dir / "results.tsv")
        write_bytes_atomic(_tsv_bytes(lesions, LESION_COLUMNS), self.out_dir / "lesions.tsv")
        return rows, lesions


# --------------------------------------------------------------------------- the output folder


def dataset_description(bids_dir: Path, out_dir: Path, version: str) -> dict:
    try:
        raw = os.path.relpath(bids_dir.resolve(), out_dir.resolve())
    except ValueError:  # another drive
        raw = str(bids_dir.resolve())
    return {"Name": "cordseg", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "cordseg", "Version": version, "CodeURL": CODE_URL}],
            "DatasetLinks": {"raw": raw}}


def _prepare_out(bids_dir: Path, out_dir: Path, version: str) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc}).") from None
    desc = json.dumps(dataset_description(bids_dir, out_dir, version), indent=2) + "\n"
    target = out_dir / "dataset_description.json"
    if not target.is_file() or target.read_text() != desc:
        write_bytes_atomic(desc.encode(), target)
    # results tables and the QC page are not BIDS files: tell the BIDS validator to pass over them
    ignore = "results.tsv\nlesions.tsv\nqc/\n"
    if not (out_dir / ".bidsignore").is_file():
        write_bytes_atomic(ignore.encode(), out_dir / ".bidsignore")


def remove_stale_temp_files(out_dir: Path) -> int:
    """Temporary files that a killed run left (cordseg.io's `.<name>.<12 hex>.tmp...` pattern)."""
    removed = 0
    for folder, _dirs, files in os.walk(out_dir):
        for name in files:
            if _TEMP_FILE.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    return removed


class _Lock:
    """One study at a time per output folder (a second one would delete the first one's temporary files)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".cordseg-study.lock"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = None
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise OutputError(f"{self.path.parent}: another study (process {pid}) is writing here; "
                                      f"wait for it, or delete {self.path.name} if it is gone.") from None
                self.path.unlink(missing_ok=True)  # left by a killed run
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return self
        raise OutputError(f"{self.path}: cannot take the study lock.")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- running


def run_study(bids_dir, out_dir=None, *, tasks=DEFAULT_TASKS, participant_labels=None, include=None,
              exclude=None, jobs: int = 1, dask=None, threads: int | None = None, smoothness=None,
              sc_threshold=None, lesion_threshold=None, min_contrast=None, qc: bool = False,
              command: str | None = None, conus: bool = True,
              on_result: Callable[[dict, dict | None], None] | None = None) -> StudyResult:
    """Segment every image of a BIDS dataset; write derivatives, results.tsv and lesions.tsv into out_dir.

    tasks: any of "centerline", "sc", "lesion". include/exclude: a Selection, or a path to a list file.
    jobs: local worker processes (1: in this process). dask: a distributed.Client or a scheduler address
    (then `jobs` is ignored). threads: ONNX Runtime threads per image (None: the cores divided among the
    local jobs; 1 on Dask). qc: also write the QC report into out_dir/qc when cordseg.qc can. conus: end
    each centerline at the conus on t1/t2 images (cordseg.conus).
    on_result(row, worker_result): called in this process as each image's row is ready (worker_result
    None for images with nothing to compute). Ctrl-C stops the study after writing the table of the images
    done; the next run carries on."""
    from . import __version__
    from .selection import Selection, read_selection

    t_start = time.perf_counter()
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: not a folder (give the root of a BIDS dataset).")
    out_dir = Path(out_dir) if out_dir is not None else bids_dir / "derivatives" / "cordseg"
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"jobs must be a whole number >= 1, got {jobs!r}")
    if threads is None and dask is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    elif threads is None:
        threads = 1
    options = StudyOptions(tuple(tasks.split(",") if isinstance(tasks, str) else tasks), threads, smoothness,
                           sc_threshold, lesion_threshold, min_contrast, conus)
    include = read_selection(include) if include is not None and not isinstance(include, Selection) else include
    exclude = read_selection(exclude) if exclude is not None and not isinstance(exclude, Selection) else exclude
    images = find_images(bids_dir, participant_labels, include, exclude)
    if not images:
        what = "" if include is None and exclude is None and not participant_labels else " (after the selection)"
        raise InputError(f"{bids_dir}: no images found{what}; expected sub-*/[ses-*/]anat/*_T2w.nii.gz and "
                         "the like.")
    command = command or f"cordseg.study.run_study({str(bids_dir)!r}, tasks={','.join(options.tasks)!r})"

    _prepare_out(bids_dir, out_dir, __version__)
    notes = []
    with _Lock(out_dir):
        stale = remove_stale_temp_files(out_dir)
        if stale:
            notes.append(f"removed {stale} temporary file(s) left by an interrupted run")
        plans = _plan(images, out_dir, options, command, __version__)
        table = _Table(out_dir, on_result)
        todo = []
        for plan in plans:
            if plan.job is None:
                table.add(plan, None)
            else:
                todo.append(plan)
        try:
            if todo:
                if dask is not None:
                    _run_dask(todo, dask, table)
                elif jobs == 1 or len(todo) == 1:
                    _run_serial(todo, table)
                else:
                    _run_pool(todo, jobs, table)
        finally:  # Ctrl-C included: the images done so far are in the table, the next run carries on
            rows, lesions = table.write()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    counts["reused"] = sum(p.job is None and p.runnable != () for p in plans)
    report = None
    if qc:
        report, note = _qc_report(out_dir)
        notes.append(note)
    return StudyResult(out_dir, rows, lesions, out_dir / "results.tsv", out_dir / "lesions.tsv", counts,
                       time.perf_counter() - t_start, notes, report)


def _qc_report(out_dir: Path):
    try:
        from . import qc as _qc
    except ImportError as exc:
        return None, f"QC report unavailable ({exc})"
    write_report = getattr(_qc, "write_report", None)
    if write_report is None:
        return None, "QC report unavailable: this cordseg has no cordseg.qc.write_report yet"
    path = write_report(out_dir, out_dir / "qc")
    return Path(path) if path is not None else out_dir / "qc", f"QC report: {path or out_dir / 'qc'}"


def _run_serial(todo, table: _Table) -> None:
    cache = {}
    for plan in todo:
        table.add(plan, process_image(plan.job, cache))


def _pool_context():
    """Spawned workers: each imports the runtime itself (a second or two, once per worker). Not forkserver:
    a SIGTERM sent to the whole job kills the fork server, whose pipes are how the pool watches its
    workers, and the pool would take them all for dead while they still run."""
    import multiprocessing as mp

    return mp.get_context("spawn")


def _failed(plan: _Plan, reason: str) -> dict:
    """A worker result for an image whose worker never answered."""
    return {"image": plan.image.relpath, "done": {}, "failed": {t: reason for t in plan.job.tasks}, "reason": reason,
            "seconds": 0.0, "cpu_seconds": 0.0, "notes": [], "worker": "n/a", "pid": None}


def _died(plan: _Plan, times: int) -> dict:
    return _failed(plan, f"the worker process died {times} time(s) while this image was in flight "
                         "(killed, or out of memory)")


def _stop_workers(ex) -> None:
    """Kill a broken pool's surviving workers. A worker killed while it held the task queue's lock leaves the
    others unable to read it, and Python 3.11's pool then waits for them forever while it shuts down (seen
    in tests/test_study.py's killed-worker test); their images go to the next pool anyway, and what they
    were writing is removed (_run_pool)."""
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, AttributeError, ValueError):
            pass


def _run_pool(todo, jobs: int, table: _Table) -> None:
    """Local worker processes. A worker that dies (killed, out of memory) breaks the pool: the images not
    done are sent to a fresh pool; one in flight through MAX_POOL_BREAKS + 1 breaks is failed."""
    pending = {p.image.relpath: p for p in todo}
    breaks = dict.fromkeys(pending, 0)
    while pending:
        ex = ProcessPoolExecutor(min(jobs, len(pending)), mp_context=_pool_context(),
                                 initializer=_init_pool_worker)
        try:
            futures = {ex.submit(process_image, p.job): key for key, p in pending.items()}
            broken = False
            for fut in as_completed(futures):
                key = futures[fut]
                exc = fut.exception()
                if isinstance(exc, BrokenProcessPool):
                    if not broken:
                        _stop_workers(ex)
                    broken = True
                    continue
                if exc is not None:  # pickling or the like: not the image's fault, but report it
                    result = _failed(pending[key], "internal error: " + _one_line(exc))
                else:
                    result = fut.result()
                table.add(pending.pop(key), result)
            ex.shutdown(wait=True)
        except BaseException:
            # the images not started are dropped; the workers finish the ones in hand (whole files, seconds)
            # and leave: a worker left behind would hold the queues open and never exit
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        if broken:
            # the survivors were killed, perhaps in the middle of a write: their temporary files go now, before
            # the next pool writes its own (the study's lock keeps any other run out of this folder)
            remove_stale_temp_files(table.out_dir)
            for key in list(pending):
                breaks[key] += 1
                if breaks[key] > MAX_POOL_BREAKS:
                    table.add(pending[key], _died(pending.pop(key), breaks[key]))


def _run_dask(todo, dask, table: _Table) -> None:
    try:
        from distributed import Client, as_completed as dask_completed
        from distributed.scheduler import KilledWorker
    except ImportError:
        raise InputError("--dask needs the cluster extra: pip install 'cordseg[cluster]'") from None
    own = not isinstance(dask, Client)
    try:
        client = Client(dask) if own else dask
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {dask} ({_one_line(exc)})") from None
    try:
        client.register_plugin(_dask_plugin(), name=PLUGIN_NAME)
        futures = {}
        for plan in todo:
            fut = client.submit(process_image, plan.job, pure=False, retries=1,
                                key=f"cordseg-{hashlib.sha1(plan.image.path.encode()).hexdigest()[:12]}-"
                                    f"{os.getpid()}-{time.monotonic_ns()}")
            futures[fut.key] = (fut, plan)
        try:
            for fut in dask_completed([f for f, _ in futures.values()]):
                plan = futures[fut.key][1]
                try:
                    result = fut.result()
                except KilledWorker as exc:
                    result = _failed(plan, "the Dask workers running this image died (killed, or out of "
                                           f"memory): {_one_line(exc)}")
                except Exception as exc:  # noqa: BLE001 - a cluster error for one image
                    result = _failed(plan, "cluster error: " + _one_line(exc))
                table.add(plan, result)
        except BaseException:
            client.cancel([f for f, _ in futures.values()])
            raise
    finally:
        if own:
            client.close()


def _dask_plugin():
    """A SegmenterPlugin that Dask takes as a worker plugin (made here so that importing this module does
    not import distributed; the class travels to the workers by value)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SegmenterWorkerPlugin(SegmenterPlugin, WorkerPlugin):
        pass

    return SegmenterWorkerPlugin()


# --------------------------------------------------------------------------- BIDS checks


def bids_check(out_dir) -> dict:
    """What the `bids-validator` package can say about a derivatives folder written here.

    BIDSValidator.is_bids knows raw-data names only, so: dataset_description.json is checked as a BIDS
    file and for the derivative fields; each output's source part (the name without _label-..._seg) must
    be a valid raw BIDS name in its folder; every sidecar's Sources must name an existing raw file.
    Returns {"checked": n, "problems": [...]}."""
    from bids_validator import BIDSValidator

    out_dir = Path(out_dir)
    v = BIDSValidator()
    problems, checked = [], 0
    desc_path = out_dir / "dataset_description.json"
    if not v.is_bids("/dataset_description.json") or not desc_path.is_file():
        problems.append("dataset_description.json missing")
    else:
        desc = json.loads(desc_path.read_text())
        for key in ("Name", "BIDSVersion", "DatasetType", "GeneratedBy"):
            if key not in desc:
                problems.append(f"dataset_description.json: no {key}")
        if desc.get("DatasetType") != "derivative":
            problems.append("dataset_description.json: DatasetType is not 'derivative'")
    raw_root = (out_dir / desc.get("DatasetLinks", {}).get("raw", "")).resolve() if desc_path.is_file() else None
    pattern = re.compile("(" + "|".join(re.escape(s) for s in OUTPUT_SUFFIX.values()) + r")\.nii\.gz$")
    for mask in sorted(out_dir.rglob("*_seg.nii.gz")):
        rel = mask.relative_to(out_dir).as_posix()
        m = pattern.search(rel)
        if m is None:
            continue
        checked += 1
        source_rel = rel[: m.start()] + ".nii.gz"
        if not v.is_bids("/" + source_rel):
            problems.append(f"{rel}: its source name {source_rel} is not a valid BIDS name")
        side = sidecar_path(mask)
        if not side.is_file():
            problems.append(f"{rel}: no JSON sidecar")
            continue
        meta = json.loads(side.read_text())
        for src in meta.get("Sources", []):
            target = Path(src[len("bids:raw:"):]) if src.startswith("bids:raw:") else Path(src)
            if raw_root is not None and not target.is_absolute():
                target = raw_root / target
            if not target.exists():
                problems.append(f"{rel}: Sources names {src}, which does not exist")
        gen = (meta.get("GeneratedBy") or [{}])[0]
        for key in ("Name", "Version", "Model", "ModelSHA256"):
            if key not in gen:
                problems.append(f"{rel}: sidecar GeneratedBy has no {key}")
    return {"checked": checked, "problems": problems}


def command_line(argv=None) -> str:
    """The command as typed, for the sidecars."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["cordseg", *argv])


def options_dict(options: StudyOptions) -> dict:
    return asdict(options)

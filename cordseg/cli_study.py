"""`cordseg study`: a whole BIDS dataset in, BIDS derivatives and one results table out."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from .errors import CordsegError, CordsegWarning

EXIT_ERROR = 2

_HELP = """Segment every image of a BIDS dataset and write BIDS derivatives and one table.

\b
Images: sub-*/[ses-*/]{anat,dwi}/*.nii.gz; the contrast comes from the suffix
(T1w -> t1, T2w -> t2, T2star/MTS -> t2s, dwi -> dwi; a 4D dwi series: the mean
of its diffusion-weighted volumes). Suffixes without a model, and tasks without a
model for a contrast, are skipped and the table says so.

\b
Writes into OUT (default BIDS_DIR/derivatives/cordseg):
  dataset_description.json, results.tsv (one row per image), lesions.tsv
  sub-X/[ses-Y/]anat/<source>_label-SC_seg.nii.gz        cord      (+ .json)
  sub-X/[ses-Y/]anat/<source>_label-lesion_seg.nii.gz    lesions   (+ .json)
  sub-X/[ses-Y/]anat/<source>_label-centerline_seg.nii.gz centerline (+ .json)

\b
Run it again to carry on: outputs whose sidecar matches the current models
(SHA-256) and options are kept; failed and missing ones are computed.

\b
cordseg study bids/ --jobs 2
cordseg study bids/ -o results/ --tasks sc --participant-label 01,02
cordseg study bids/ --exclude qc_exclude.yml --qc
cordseg study bids/ --dask tcp://scheduler:8786 --threads 2
"""


def _command() -> str:
    """The command as given (the options that differ from their defaults), for the sidecars."""
    import shlex

    ctx = click.get_current_context()
    words = ["cordseg", "study", str(ctx.params["bids_dir"])]
    for param in ctx.command.params:
        if param.name == "bids_dir" or param.name == "quiet":
            continue
        value = ctx.params.get(param.name)
        if value is None or value is False or value == () or value == param.default:
            continue
        flag = max(param.opts, key=len)
        if value is True:
            words.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                words += [flag, str(v)]
    return shlex.join(words)


def _labels(values):
    out = []
    for v in values:
        out += [p.strip() for p in v.replace(",", " ").split() if p.strip()]
    return out


@click.command("study", help=_HELP)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Derivatives folder (default: BIDS_DIR/derivatives/cordseg).")
@click.option("--tasks", default="sc,lesion", show_default=True,
              help="Comma-separated, from centerline, sc, lesion.")
@click.option("--participant-label", "participants", multiple=True, metavar="LABEL",
              help="Only these subjects (01 or sub-01; repeat the option, or separate them by commas).")
@click.option("--include", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Only the subjects/sessions/images listed (plain text or YAML).")
@click.option("--exclude", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Leave out the subjects/sessions/images listed (e.g. the QC page's qc_exclude.yml).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes.")
@click.option("--dask", "dask", default=None, metavar="ADDRESS",
              help="Send the images to this Dask scheduler (needs cordseg[cluster]); OUT and BIDS_DIR "
                   "must be reachable from the workers at the same paths.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per image (default: the cores divided among --jobs; 1 on Dask).")
@click.option("--smoothness", type=float, default=None, help="Centerline curvature penalty (default: the model's).")
@click.option("--sc-threshold", type=float, default=None, help="Cord probability threshold (default: the model's).")
@click.option("--lesion-threshold", type=float, default=None,
              help="Lesion probability threshold (default: the model's).")
@click.option("--min-contrast", type=float, default=None,
              help="Least lesion/cord intensity ratio kept (default: the model's; 0: no screening).")
@click.option("--no-conus", is_flag=True, help="Keep each centerline's own lower end (by default t1/t2 images "
              "end at the conus).")
@click.option("--qc", is_flag=True, help="Also write the QC report into OUT/qc.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the summary.")
def study(bids_dir, out, tasks, participants, include, exclude, jobs, dask, threads, smoothness, sc_threshold,
          lesion_threshold, min_contrast, no_conus, qc, quiet):
    from .study import run_study

    counter = {"n": 0}

    def progress(row, _result):
        counter["n"] += 1
        if quiet:
            return
        status = row["status"]
        line = f"[{counter['n']}] {row['image']}: {status}"
        if status != "ok" and row["reason"] != "n/a":
            line += f" ({row['reason']})"
        elif row["reused"] != "n/a" and _result is None:
            line += " (up to date)"
        click.echo(line, err=True)

    error, code, result = None, EXIT_ERROR, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CordsegWarning)
        try:
            result = run_study(bids_dir, out, tasks=tasks, participant_labels=_labels(participants),
                               include=include, exclude=exclude, jobs=jobs, dask=dask, threads=threads,
                               smoothness=smoothness, sc_threshold=sc_threshold, lesion_threshold=lesion_threshold,
                               min_contrast=min_contrast, qc=qc, command=_command(), on_result=progress,
                               conus=not no_conus)
        except CordsegError as exc:
            error = " ".join(str(exc).split())
        except MemoryError:
            error = "out of memory"
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP turned into one by the cordseg group
            signum = int(getattr(exc, "signum", 2))
            words = {1: "hung up (SIGHUP)", 15: "terminated (SIGTERM)"}.get(signum, "interrupted")
            error = f"{words}; the images done so far are in the table; run the same command to carry on"
            code = 128 + signum
    for w in caught:
        if issubclass(w.category, CordsegWarning):
            click.echo(f"cordseg: warning: {w.message}", err=True)
    if error is not None:
        click.echo(f"cordseg: error: {error}", err=True)
        sys.exit(code)
    for note in result.notes:
        click.echo(f"cordseg: note: {note}", err=True)
    c = result.counts
    click.echo(f"study: {len(result.rows)} image(s): {c['ok']} ok ({c['reused']} up to date), {c['failed']} failed, "
               f"{c['skipped']} skipped in {result.seconds:.1f} s -> {result.results_tsv}")

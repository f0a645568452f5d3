"""`cordseg qc`: a study's quality-control report, a static page to review every result in a browser."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import one_line_errors

_HELP = """Write a QC report of a study's results: index.html and its pictures, in the -o folder.

\b
DERIVATIVES is the folder the study command wrote (masks named <image>_label-SC_seg.nii.gz,
_label-lesion_seg, _label-centerline_seg, each with a JSON sidecar naming its source image;
results.tsv when there). The page needs no network: open index.html in a browser.

\b
One row per image (sortable, filterable); Up/Down pages through them, each shown as a
straightened sagittal strip and its axial views at 4 pixels per mm with the outlines.
Keys: o outline on/off, p / f / a mark pass / fail / artifact, n note, +/- zoom.
Marks stay in the browser; Export writes qc_marks.tsv and qc_exclude.yml, which the
study command's --exclude reads back.

\b
cordseg qc derivatives/cordseg -o qc_report/
"""


@click.command("qc", help=_HELP)
@click.argument("derivatives", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Folder to write the report into (default: DERIVATIVES/qc).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Threads drawing the pictures (default: one per CPU).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings.")
def qc(derivatives, out, jobs, quiet):
    from .qc import write_report

    out = out if out is not None else derivatives / "qc"
    with one_line_errors():
        index = write_report(derivatives, out, progress=None if quiet else _Progress(), workers=jobs)
    if not quiet:
        click.echo(f"QC report -> {index}")


class _Progress:
    """One line on stderr, rewritten in place on a terminal; the last state only otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()

    def __call__(self, stage, fraction):
        width = 30
        filled = int(round(width * min(1.0, fraction)))
        line = f"{stage:<12} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%"
        if self.tty:
            click.echo("\r" + line, err=True, nl=fraction >= 1.0)
        elif fraction >= 1.0:
            click.echo(line, err=True)

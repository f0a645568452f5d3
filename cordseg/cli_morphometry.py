"""`cordseg morphometry`: cross-sectional area and shape of the cord from a mask, as a table."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import one_line_errors
from .errors import CordsegError

_HELP = """Cord cross-sectional area (CSA) and shape from a cord mask (binary or soft).

\b
Per axial slice: area corrected for the cord's angle to the slice (mm2), diameter_AP and
diameter_RL (axes of the ellipse with the section's second moments, mm), eccentricity,
orientation, solidity, angle_AP, angle_RL (deg) and length (mm). Slices are counted in the
RPI grid, inferior to superior, whatever the order of the stored array. Without
--perslice: mean and SD over the whole cord, over --slices, or per level with --levels.
Slices where the mask has several components or touches the edge of the field of view
are flagged and left out of the means (the Flags and Excluded slices columns say so).

\b
cordseg morphometry t2_seg.nii.gz
cordseg morphometry t2_seg.nii.gz --slices 10:30 -o csa.csv
cordseg morphometry t2_seg.nii.gz --levels t2_levels.nii.gz --vert 2:3 -o csa.csv
cordseg morphometry t2_seg.nii.gz --perslice -o out/     # out/t2_seg_csa.csv
"""


@click.command("morphometry", help=_HELP)
@click.argument("seg", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="The image the mask was made from (named in the table; its grid is checked).")
@click.option("--perslice", is_flag=True, help="One row per slice instead of the mean.")
@click.option("--slices", default=None, metavar="A:B",
              help="RPI slice range (inferior to superior, both included) to average over.")
@click.option("--levels", type=click.Path(path_type=Path), default=None, metavar="LABELS",
              help="Vertebral levels (a level per voxel) or disc labels (value n at the disc above vertebra n).")
@click.option("--vert", default=None, metavar="A:B", help="With --levels: the levels to average over, e.g. 2:3.")
@click.option("--perlevel/--no-perlevel", default=None,
              help="With --levels: one row per level (the default unless --vert is given).")
@click.option("--no-angle-correction", "no_angle", is_flag=True,
              help="Axial-slice areas, without the correction for the cord's angle.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="CSV file to write (a folder: <mask>_csa.csv in it).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings.")
def morphometry(seg, image, perslice, slices, levels, vert, perlevel, no_angle, out, quiet):
    from . import morphometry as _m

    with one_line_errors():
        target = None
        if out is not None:
            target = _m.csv_path_beside(Path(out) / seg.name) if out.is_dir() else out
            from .io import same_file

            for given in (seg, image, levels):  # no output on any input (links and hard links included)
                if given is not None and same_file(target, given):
                    raise CordsegError(f"{target}: refusing to overwrite the input {given}.")
        table = _m.morphometry(seg, image, perslice=perslice, slices=slices, levels=levels, vert=vert,
                               perlevel=perlevel, angle_correction=not no_angle)
        if target is not None:
            table.to_csv(target)
    for note in table.notes:
        click.echo(f"cordseg: note: {note}", err=True)
    if not quiet:
        click.echo(table.text())
        if target is not None:
            click.echo(f"morphometry: {len(table.rows)} row(s) -> {target}")

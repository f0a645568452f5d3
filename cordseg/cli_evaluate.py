"""`cordseg evaluate`: compare predictions with references and print the paper's metrics.

Registered in cordseg.cli with ``main.add_command(evaluate)``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import CordsegError
from .evaluation import KINDS, discover_pairs, evaluate_pair, evaluate_pairs, format_table

_HELP = """Compare predictions with references (Dice, volumes, lesion detection, centerline error).

\b
PRED and REF: two files (one pair); or two folders (files with the same name, or REF's
<name>-manual, pair up); or one folder alone (<base>.nii.gz pairs with <base>-manual.nii.gz).
--pair PRED REF adds a pair and may be repeated. Several pairs give one row each plus the
median and interquartile range (25th/75th percentiles).

\b
--kind sc          cord masks: dice, rvd, sensitivity, precision, volumes (mm3)
--kind lesion      lesion masks: the above plus lesion-wise sensitivity/precision
                   (3D components, 26-connectivity, a prediction matches a manual lesion
                   when it covers more than 25% of it); volume-wise specificity over
                   pairs whose reference has no lesion
--kind centerline  PRED a centerline mask or CSV (x,y,z voxels in RPI working space of
                   REF), REF a cord mask or centerline: mean squared distance (mm2) to the
                   reference's per-slice centre of mass, localization rate

A prediction on another grid is resampled onto the reference's (nearest neighbour).
--json prints one JSON object for one pair, or {"pairs": [...], "summary": {...}} for several.
"""


@click.command("evaluate", help=_HELP)
@click.argument("pred", required=False, type=click.Path(path_type=Path))
@click.argument("ref", required=False, type=click.Path(path_type=Path))
@click.option(
    "--pair", "extra_pairs", nargs=2, multiple=True, type=click.Path(path_type=Path),
    metavar="PRED REF", help="One more prediction/reference pair (repeatable).",
)
@click.option(
    "--kind", type=click.Choice(KINDS), default="sc", show_default=True,
    help="What is compared: cord masks, lesion masks or a centerline.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(pred, ref, extra_pairs, kind, as_json):
    try:
        pairs = _collect_pairs(pred, ref, extra_pairs)
        if len(pairs) == 1:
            row = evaluate_pair(pairs[0][0], pairs[0][1], kind)
            text = json.dumps(row, indent=2, allow_nan=False) if as_json else format_table([row])
        else:
            rows, summary = evaluate_pairs(pairs, kind)
            if as_json:
                text = json.dumps({"pairs": rows, "summary": summary}, indent=2, allow_nan=False)
            else:
                text = format_table(rows, summary)
    except CordsegError as exc:  # one line, as every command reports its errors
        message = " ".join(str(exc).split())
        click.echo(f"cordseg: error: {message}", err=True)
        sys.exit(2)
    click.echo(text)


def _collect_pairs(pred, ref, extra_pairs) -> list:
    pairs = []
    if pred is not None:
        if pred.is_dir():
            if ref is not None and not ref.is_dir():
                raise click.UsageError("PRED is a folder, so REF must be a folder too (or be left out).")
            found, unmatched = discover_pairs(pred, ref)
            for f in unmatched:
                click.echo(f"cordseg: note: no counterpart for {f}, skipped", err=True)
            pairs.extend(found)
        elif ref is None:
            raise click.UsageError("missing REF: give PRED REF, a folder, or --pair PRED REF.")
        else:
            pairs.append((pred, ref))
    pairs.extend(tuple(p) for p in extra_pairs)
    if not pairs:
        raise click.UsageError("nothing to evaluate: give PRED REF, a folder, or --pair PRED REF.")
    return pairs

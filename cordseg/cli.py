"""Command line: parses, calls the API, prints, and turns CordsegError into one line on stderr."""
from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from pathlib import Path

import click

from .errors import CordsegError, CordsegWarning

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C: a batch stops there instead of moving to the next image
_FILE_PREFIX = "cordseg_file_prefix"  # click context key: in a batch, messages name the image they concern


class Reporter:
    """Progress bar and stage times on stderr (quiet: nothing but errors)."""

    def __init__(self, quiet=False, verbose=False):
        self.quiet, self.verbose = quiet, verbose
        self.stage, self.t0, self.started = None, time.perf_counter(), time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, stage, fraction):
        if stage != self.stage:
            self.finish()
            self.stage, self.t0 = stage, time.perf_counter()
        if self.quiet:
            return
        width = 30
        filled = int(round(width * min(1.0, fraction)))
        line = f"{stage:<12} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%"
        if self.tty:
            click.echo("\r" + line, err=True, nl=False)
        elif fraction >= 1.0:
            click.echo(line, err=True)

    def finish(self):
        if self.stage is None:
            return
        if not self.quiet and self.tty:
            click.echo("", err=True)
        if self.verbose:
            click.echo(f"{self.stage}: {time.perf_counter() - self.t0:.2f} s", err=True)
        self.stage = None

    def done(self):
        self.finish()
        if self.verbose:
            click.echo(f"total: {time.perf_counter() - self.started:.2f} s", err=True)


def _prefix(message: str) -> str:
    """In a batch, the image a message concerns (unless the message names it already)."""
    ctx = click.get_current_context(silent=True)
    image = ctx.meta.get(_FILE_PREFIX) if ctx is not None else None
    return "" if image is None or image in message else f"{image}: "


def _fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"cordseg: error: {_prefix(message)}{message}", err=True)
    sys.exit(code)


def _run(fn):
    """Call fn() mapping our errors to one stderr line; warnings become one line each (before any error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CordsegWarning)
        error, code = None, EXIT_ERROR
        try:
            result = fn()
        except CordsegError as exc:
            error = str(exc)
        except MemoryError:
            error = "out of memory"
        except KeyboardInterrupt:
            error, code = "interrupted", EXIT_INTERRUPTED
    for w in caught:
        if issubclass(w.category, CordsegWarning):
            click.echo(f"cordseg: warning: {_prefix(str(w.message))}{w.message}", err=True)
    if error is not None:
        _fail(error, code)
    return result


def _for_each(images, out, one):
    """`one(image, out)` for every input image.

    One image: as it always was (an error ends the command). Several (their outputs checked first by
    _check_outputs): every failure prints one line naming its image and the others go on; the exit status is
    2 when any failed. Ctrl-C stops the whole batch."""
    if len(images) == 1:
        one(images[0], out)
        return
    ctx = click.get_current_context()
    failed = []
    for image in images:
        ctx.meta[_FILE_PREFIX] = str(image)
        try:
            one(image, out)
        except SystemExit as exc:
            if exc.code == EXIT_INTERRUPTED:
                raise
            if exc.code not in (0, None):
                failed.append(image)
        finally:
            ctx.meta.pop(_FILE_PREFIX, None)
    if failed:
        _fail(f"{len(failed)} of {len(images)} images failed (see above)")


def _check_outputs(images, out, suffix):
    """Before any work, for several images: `-o` is a folder, and no two outputs land on one file (same name,
    one output folder), which would let the last overwrite the others."""
    if len(images) < 2:
        return
    from .io import default_output_path

    if out is not None and not Path(out).is_dir():
        _fail(f"with several images, -o must be an existing folder, not {out}")
    seen = {}
    for image in images:
        try:
            target = default_output_path(image, out, suffix).resolve()
        except CordsegError:
            continue  # reported with its image when its turn comes
        if target in seen:
            _fail(f"{seen[target]} and {image} would both write {target}; give them distinct names or run "
                  "them separately")
        seen[target] = image


def _common(f):
    f = click.option("-v", "--verbose", is_flag=True, help="print each stage's time")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None, envvar="CORDSEG_THREADS",
                     show_envvar=True, help="CPU threads for the networks (default: one per physical core; "
                     "set it to the cores a cluster job was given)")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="no progress bar")(f)
    f = click.option("--volume", type=int, default=None, help="volume of a 4D image to use (0-based)")(f)
    f = click.option("-o", "--output", "out", type=click.Path(), default=None,
                     help="output file, or an existing folder (default: current folder)")(f)
    f = click.option("-c", "--contrast", type=click.Choice(["t1", "t2", "t2s", "dwi"], case_sensitive=False),
                     default=None, help="image contrast (default: read from the file name)")(f)
    f = click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(dir_okay=True))(f)
    return f


_qc_option = click.option(
    "--qc", is_flag=True,
    help="also write a quality-control picture beside the output, <output>_qc.png: axial views around the "
         "cord with the result outlined")

_given_centerline_option = click.option(
    "--centerline", "centerline_file", type=click.Path(dir_okay=False),
    help="use this centerline mask (e.g. `cordseg centerline`'s output, corrected, or a few marked voxels) "
         "instead of detecting one")


def _output(image, out, suffix):
    """The output path, checked before any work: a folder that exists and can be written, a NIfTI name."""
    from .io import default_output_path

    path = _run(lambda: default_output_path(image, out, suffix))
    folder = path.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        _fail(f"cannot write {path}: folder {folder} does not exist or is not writable")
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        _fail(f"cannot write {path}: the output name must end in .nii.gz or .nii")
    return path


def _save(img, path: Path):
    from .io import save_like

    _run(lambda: save_like(img.get_fdata(dtype="float32") if img.get_data_dtype().kind == "f" else
                           img.dataobj, img, path, dtype=img.get_data_dtype()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cordseg", message="cordseg %(version)s")
def main():
    """Find the spinal cord in MRI and segment the cord and MS lesions, on a CPU."""


@main.command()
@_common
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN1 ONNX model file to use")
@click.option("--smoothness", type=float, default=None, help="OptiC's curvature penalty (default 1.0)")
@_qc_option
def centerline(images, contrast, out, volume, quiet, verbose, threads, model, smoothness, qc):
    """Cord centerline: a NIfTI mask (one voxel per slice) and a CSV beside it. Several images: -o is a
    folder."""
    from . import api

    if smoothness is not None:
        _run(lambda: api.check_smoothness(smoothness, "--smoothness"))
    _check_outputs(images, out, "_centerline")
    _for_each(images, out, lambda image, out: _centerline_one(image, contrast, out, volume, quiet, verbose, threads,
                                                                model, smoothness, qc))


def _centerline_one(image, contrast, out, volume, quiet, verbose, threads, model, smoothness, qc):
    from . import api
    from .centerline import DEFAULT_SMOOTHNESS

    path = _output(image, out, "_centerline")
    rep = Reporter(quiet, verbose)
    src, contrast, volume = _source(image, contrast, volume, qc)
    mask, cl = _run(lambda: api.detect_centerline(src, contrast, model=model, volume=volume, progress=rep,
                                                  threads=threads,
                                                  smoothness=DEFAULT_SMOOTHNESS if smoothness is None else smoothness))
    rep.done()
    _save(mask, path)
    csv_path = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".csv")
    # x, y, z: RPI working-space voxels (as the published tool writes them); i, j, k: the input's own voxels
    rpi_pts, native, mm = cl.rpi_points, cl.native_points(), cl.scanner_mm()
    _write_csv(csv_path, ["slice", "x", "y", "z", "i", "j", "k", "x_mm", "y_mm", "z_mm"],
               [[int(z), *(f"{v:.3f}" for v in r), *(f"{v:.3f}" for v in n), *(f"{v:.3f}" for v in m)]
                for z, r, n, m in zip(cl.z, rpi_pts, native, mm)])
    qc_file = _write_qc(src, {"centerline": mask}, path) if qc else None
    if not quiet:
        click.echo(f"centerline: {len(cl.z)} slices -> {path} and {csv_path}" + (f" (QC: {qc_file})" if qc else ""))


@main.command()
@_common
@click.option("--soft", is_flag=True, help="write the float32 probability map instead of a mask")
@click.option("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN2 cord ONNX model file to use")
@_given_centerline_option
@_qc_option
def sc(images, contrast, out, volume, quiet, verbose, threads, soft, threshold, model, centerline_file, qc):
    """Spinal cord segmentation -> <stem>_seg.nii.gz. Several images: -o is a folder."""
    from . import api

    _run(lambda: api.check_threshold(threshold, "--threshold"))
    _one_centerline_for_one_image(images, centerline_file)
    _check_outputs(images, out, "_seg")
    _for_each(images, out, lambda image, out: _sc_one(image, contrast, out, volume, quiet, verbose, threads, soft,
                                                        threshold, model, centerline_file, qc))


def _sc_one(image, contrast, out, volume, quiet, verbose, threads, soft, threshold, model, centerline_file, qc):
    from . import api

    path = _output(image, out, "_seg")
    rep = Reporter(quiet, verbose)
    src, contrast, volume = _source(image, contrast, volume, qc)
    seg = _run(lambda: api.segment_cord(src, contrast, soft=soft, threshold=threshold, model=model,
                                        centerline=centerline_file, volume=volume, progress=rep,
                                        threads=threads))
    rep.done()
    _save(seg, path)
    qc_file = _write_qc(src, {"cord": _binary(seg, threshold if soft else None)}, path) if qc else None
    if not quiet:
        import numpy as np

        vox = float(np.prod(seg.header.get_zooms()[:3]))
        n = int((np.asarray(seg.dataobj) >= 0.5).sum())
        click.echo(f"cord: {n * vox:.0f} mm3 -> {path}" + (f" (QC: {qc_file})" if qc else ""))


@main.command()
@_common
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), help="write one row per lesion here")
@click.option("--soft", is_flag=True, help="write the float32 probability map instead of a mask")
@click.option("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
@click.option("--min-contrast", type=float, default=None,
              help="report only lesions touching the cord and at least this many times brighter than the "
              "cord's median on their slices (default: the model's, 1.1 for the shipped one; 0: no screening)")
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN2 lesion ONNX model file to use")
@_given_centerline_option
@_qc_option
def lesion(images, contrast, out, volume, quiet, verbose, threads, csv_file, soft, threshold, min_contrast, model,
           centerline_file, qc):
    """MS lesion segmentation -> <stem>_lesionseg.nii.gz; prints lesion count and volume. Several images: -o
    is a folder, and --csv one table with an image column."""
    from . import api

    _run(lambda: api.check_threshold(threshold, "--threshold"))
    _one_centerline_for_one_image(images, centerline_file)
    if csv_file:  # fail before any work (and before the mask is written) when the table cannot be written
        folder = Path(csv_file).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            _fail(f"cannot write {csv_file}: folder {folder} does not exist or is not writable")
    _check_outputs(images, out, "_lesionseg")
    table = []  # (image, lesion rows) of every image done

    def one(image, out):
        rows = _lesion_one(image, contrast, out, volume, quiet, verbose, threads, soft, threshold, min_contrast,
                           model, centerline_file, qc)
        if rows is not None:
            table.append((image, rows))

    try:
        _for_each(images, out, one)
    finally:  # several images: one table for all that succeeded, with an image column, even if some failed
        if csv_file and table and not soft:
            several = len(images) > 1
            from .lesions import LESION_CSV_HEADER

            header = (["image"] if several else []) + LESION_CSV_HEADER
            _write_csv(Path(csv_file), header,
                       [([str(image)] if several else []) + r.csv_row() for image, rows in table for r in rows])


def _lesion_one(image, contrast, out, volume, quiet, verbose, threads, soft, threshold, min_contrast, model,
                centerline_file, qc):
    """One image; returns its lesion table (None with --soft)."""
    from . import api

    path = _output(image, out, "_lesionseg")
    rep = Reporter(quiet, verbose)
    src, contrast, volume = _source(image, contrast, volume, qc)
    given, track = centerline_file, None
    if qc:  # the views follow the cord, so the centerline is needed on the image's grid (found once)
        if centerline_file:
            track, given = _run(lambda: api.centerline_from_mask(src, centerline_file, volume=volume))
        else:
            track, given = _run(lambda: api.detect_centerline(src, contrast, volume=volume, progress=rep,
                                                              threads=threads))
    seg = _run(lambda: api.segment_lesions(src, contrast, soft=soft, threshold=threshold,
                                           min_contrast=min_contrast, model=model, centerline=given,
                                           volume=volume, progress=rep, threads=threads))
    rep.done()
    _save(seg, path)
    qc_note = ""
    if qc:
        qc_file = _write_qc(src, {"lesion": _binary(seg, threshold if soft else None)}, path, track)
        qc_note = f" (QC: {qc_file})"
    if soft:
        if not quiet:
            click.echo(f"lesion probability map -> {path}{qc_note}")
        return None
    from .lesions import lesion_table

    rows = lesion_table(seg)
    total = sum(r.volume_mm3 for r in rows)
    click.echo(f"lesions: {len(rows)}, total volume {total:.1f} mm3 -> {path}{qc_note}")
    return rows


def _one_centerline_for_one_image(images, centerline_file):
    if centerline_file and len(images) > 1:
        _fail("--centerline belongs to one image: give one image with it")


@main.command("models")
def models_cmd():
    """List the installed models and what each one is."""
    from .inference import list_models, model_dirs

    found = _run(list_models)
    if not found:
        _fail("no models found in " + ", ".join(str(d) for d in model_dirs()))
    for m in found:
        click.echo(m.describe())


def _binary(seg, threshold=None):
    """A mask image for the QC outline: the mask itself, or a soft map at `threshold` (default 0.5)."""
    import numpy as np

    from .io import image_like

    data = np.asarray(seg.dataobj, np.float32)
    return image_like((data >= (0.5 if threshold is None else threshold)).astype(np.uint8), seg)


def _source(image, contrast, volume, qc):
    """What the API is given for `image`: its path, or with --qc the image read once here (its contrast read
    from its name, its volume picked), since the picture and, for lesions, the centerline need it too."""
    if not qc:
        return image, contrast, volume
    from . import api
    from .io import load_image

    src = _run(lambda: load_image(image, volume=volume))
    return src, _run(lambda: api.resolve_contrast(image, contrast)), None


def _write_qc(src, overlays, output: Path, track=None) -> Path:
    """The QC picture of `src` (a path or the image read by _source) beside `output`, once that is written."""
    from .qc import qc_path, write_qc

    path = qc_path(output)
    return _run(lambda: write_qc(src, overlays, path, track=track))


def _write_csv(path: Path, header, rows):
    """Atomic CSV write (temporary file beside the target, then rename)."""
    import io as _io

    from .io import write_bytes_atomic

    buf = _io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    _run(lambda: write_bytes_atomic(buf.getvalue().encode("utf-8"), path))


from .cli_evaluate import evaluate  # noqa: E402

main.add_command(evaluate)


# what the training extra installs; the training modules import them only inside their functions, so a
# missing one would otherwise surface as a traceback halfway through a command
TRAIN_EXTRA = ("tensorflow", "keras", "tf2onnx", "onnx")


def _extra_command(name, module, function, doc):
    """A command that hands its arguments to the training extra's own parser (TensorFlow loads only then)."""

    @main.command(name, help=doc, add_help_option=False,
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx):
        import importlib
        import importlib.util

        def absent(package):
            try:
                return importlib.util.find_spec(package) is None
            except ImportError:
                return True

        missing = [m for m in TRAIN_EXTRA if absent(m)]
        try:
            if missing:
                raise ImportError(f"missing: {', '.join(missing)}")
            entry = getattr(importlib.import_module(f"cordseg.training.{module}"), function)
        except ImportError as exc:
            _fail(f"{name} needs the training extra: pip install 'cordseg[train]' ({exc})")
        sys.exit(entry(ctx.args))

    return command


_extra_command("import-keras", "keras_import", "main_import_keras",
               "Convert a published Keras .h5 model to a cordseg ONNX model (needs cordseg[train]).")
_extra_command("train", "train", "main",
               "Train a network from synthetic (and BIDS) data (needs cordseg[train]); see `cordseg train -h`.")


if __name__ == "__main__":  # pragma: no cover
    main()

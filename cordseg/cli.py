"""Command line: parses, calls the API, prints, and turns CordsegError into one line on stderr.

Errors become that line in one place (_reported), for the whole command or, in a batch, for each image.
Stage events: cordseg.cli.main.main(args=[...], obj={"on_stage": fn}) sends the run's stage events
(cordseg.stages.StageEvent) to fn, as benchmarks use it. evaluate, train, import-keras and morphometry are
imported only when run.
"""
from __future__ import annotations

import os
import signal
import sys


def _quiet_signals_while_starting():
    """Run as the `cordseg` program: until the command's own handlers are in place (_signals), an interruption
    ends the process with one line instead of an import traceback. Nothing is written yet, so nothing to
    clean. Imported as a library, signal handling is left alone."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if os.path.basename(main_file).lower() not in ("cordseg", "cordseg.exe", "cordseg-script.py"):
        return

    def leave(signum, frame):
        os.write(2, f"cordseg: error: {_SIGNAL_WORDS.get(signum, 'interrupted')}\n".encode())
        os._exit(128 + signum)

    for sig in _SIGNALS:
        try:
            signal.signal(sig, leave)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_SIGNAL_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}
if hasattr(signal, "SIGHUP"):
    _SIGNAL_WORDS[signal.SIGHUP] = "hung up (SIGHUP)"
_quiet_signals_while_starting()

import csv  # noqa: E402 - the handlers above go first
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .contract import CONTRASTS  # noqa: E402
from .errors import (CordsegError, CordsegWarning, InputError, ModelError, OutputError,  # noqa: E402
                     ResourceError)
from .stages import timed  # noqa: E402

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C: a batch stops there instead of moving to the next image


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) received: unwinds like Ctrl-C, so every temporary file is removed on the
    way out; the command exits with 128 + the signal's number (143, 129, 130)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals():
    """For the command's duration (main thread only): SIGINT, SIGTERM and SIGHUP raise Interrupted, which
    unwinds through every clean-up. Once one has, the handlers from before are back: a second signal acts
    as it would without cordseg (a second Ctrl-C or kill ends a run that is slow to stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig, old in previous.items():
            signal.signal(sig, old)
        raise Interrupted(signum)

    previous = {}
    for sig in _SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_INTERRUPTED_CODES = frozenset(128 + int(sig) for sig in _SIGNALS) | {EXIT_INTERRUPTED}


def _interrupted(exc: BaseException) -> tuple[str, int]:
    signum = getattr(exc, "signum", signal.SIGINT)
    return _SIGNAL_WORDS.get(signum, "interrupted"), 128 + int(signum)


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


class _Reported(Exception):
    """An error already printed as its line; the command (or, in a batch, the image) ends with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@contextmanager
def _reported(image=None):
    """The one place where errors become a line on stderr: CordsegError, out of memory and Ctrl-C end the
    block with _Reported; cordseg warnings become one line each, before any error. In a batch, `image`
    names the input the lines concern (unless they name it already)."""

    def prefix(message):
        if image is None or str(image) in message or Path(str(image)).name in message:
            return ""
        return f"{image}: "

    error, code = None, EXIT_ERROR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CordsegWarning)
        try:
            yield
        except CordsegError as exc:
            error = " ".join(str(exc).split())  # one line, whatever the message holds
        except MemoryError:
            error = "out of memory"
        except KeyboardInterrupt as exc:
            error, code = _interrupted(exc)
    for w in caught:
        if issubclass(w.category, CordsegWarning):
            click.echo(f"cordseg: warning: {prefix(str(w.message))}{w.message}", err=True)
    if error is not None:
        click.echo(f"cordseg: error: {prefix(error)}{error}", err=True)
        raise _Reported(code)


@contextmanager
def one_line_errors():
    """_reported for a command object run on its own (the lazily loaded commands' modules), ending with the
    exit status; under the cordseg group the group's own _reported sees nothing more."""
    try:
        with _reported():
            yield
    except _Reported as done:
        sys.exit(done.code)


class _LazyCommand(click.Command):
    """A command whose module is imported only when it runs (or its own help is asked for)."""

    def __init__(self, name, module, attr, short_help):
        super().__init__(name, short_help=short_help, help=short_help, add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        self.target = (module, attr)

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.target[0]) is not None
        except ImportError:
            return False

    def load(self) -> click.Command:
        try:
            return getattr(importlib.import_module(self.target[0]), self.target[1])
        except (ImportError, AttributeError) as exc:
            raise CordsegError(f"{self.name} is not available in this installation ({exc})") from None

    def make_context(self, info_name, args, parent=None, **extra):
        return self.load().make_context(info_name, args, parent=parent, **extra)


class _Main(click.Group):
    """The `cordseg` group: lazy commands, and every error of every command reported by _reported."""

    lazy: dict = {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | {n for n, c in self.lazy.items() if c.available()})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self.lazy and self.lazy[name].available():
            command = self.lazy[name]
        return command

    def invoke(self, ctx):
        try:
            with _reported():
                return super().invoke(ctx)
        except _Reported as done:
            sys.exit(done.code)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main with signals handled (_signals) and click's own errors (usage, Ctrl-C while parsing)
        as one `cordseg: error:` line, exit status 2 (130/143/129 when interrupted)."""
        try:
            with _signals():
                return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                    standalone_mode=False, **extra)
        except click.exceptions.Exit as done:  # pragma: no cover - click returns it with standalone_mode=False
            code = done.exit_code
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `cordseg` alone (click >= 8.2): the help, as before
                click.echo(exc.ctx.get_help())
                code = 0
            else:
                hint = f" (see {exc.ctx.command_path} -h)" if exc.ctx is not None else ""
                click.echo(f"cordseg: error: {' '.join(exc.format_message().split())}{hint}", err=True)
                code = EXIT_ERROR
        except click.ClickException as exc:
            click.echo(f"cordseg: error: {' '.join(exc.format_message().split())}", err=True)
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt) as exc:
            words, code = _interrupted(exc.__cause__ if isinstance(exc, click.Abort) else exc)
            click.echo(f"cordseg: error: {words}", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


@dataclass(frozen=True)
class Options:
    """A segmentation command's options, as click parsed them."""

    images: tuple
    contrast: str | None = None
    out: str | None = None
    volume: int | None = None
    quiet: bool = False
    verbose: bool = False
    threads: int | None = None
    model: str | None = None
    smoothness: float | None = None
    soft: bool = False
    threshold: float | None = None
    min_contrast: float | None = None
    centerline_file: str | None = None
    csv_file: str | None = None
    qc: bool = False
    csa: bool = False
    no_conus: bool = False

    def on_stage(self):
        """The stage-event hook the caller passed to main() as obj={"on_stage": fn}, or None."""
        ctx = click.get_current_context(silent=True)
        obj = ctx.find_root().obj if ctx is not None else None
        return obj.get("on_stage") if isinstance(obj, dict) else None

    def segmenter(self, **models):
        from .segmenter import Segmenter

        kwargs = {} if self.smoothness is None else {"smoothness": self.smoothness}
        return Segmenter(self.contrast, threads=self.threads, on_stage=self.on_stage(), conus=not self.no_conus,
                         **models, **kwargs)


def _for_each(opts: Options, one):
    """`one(image)` for every input image.

    One image: an error ends the command. Several (their outputs checked first): every failure is one line
    naming its image and the others go on; the exit status is 2 when any failed. Ctrl-C stops the batch."""
    images = opts.images
    if len(images) == 1:
        try:
            one(images[0])
        except (MemoryError, ResourceError) as exc:  # say which scan needed more than there was
            said = str(exc) if isinstance(exc, ResourceError) else "out of memory"
            raise ResourceError(said if str(images[0]) in said else f"{images[0]}: {said}") from None
        return
    failed = []
    for image in images:
        try:
            with _reported(image):
                one(image)
        except _Reported as done:
            if done.code in _INTERRUPTED_CODES:  # Ctrl-C, SIGTERM, SIGHUP: the batch stops
                raise
            failed.append(image)
    if failed:
        raise CordsegError(f"{len(failed)} of {len(images)} images failed (see above)")


def _check_outputs(opts: Options, suffix):
    """Before any work: for several images, `-o` is a folder and --centerline belongs to one image; for any
    number, no output (mask, CSV, QC picture, --csv table) lands on an input of the command (any image of the
    batch, --centerline, --model) or on another output."""
    images, out = opts.images, opts.out
    if len(images) > 1:
        if opts.centerline_file:
            raise InputError("--centerline belongs to one image: give one image with it")
        if out is not None and not os.path.isdir(out):
            raise InputError(f"with several images, -o must be an existing folder, not {out}")
    from .io import default_output_path, file_key, nifti_stem

    inputs = {}
    for path, what in ([(image, "input image") for image in images]
                       + [(opts.centerline_file, "--centerline mask"), (opts.model, "--model file")]):
        if path is not None:
            for key in file_key(path):
                inputs.setdefault(key, (what, path))
    written = {}

    def claim(path, what, image):
        for key in file_key(path):
            if key in inputs:
                kind, source = inputs[key]
                raise OutputError(f"{path}: the {what} would overwrite the {kind} {source}; choose another "
                                  "output name or folder")
            if key in written:
                other, other_image = written[key]
                if other_image != image:
                    raise OutputError(f"{other_image} and {image} would both write {path} (the {other} of one, the "
                                      f"{what} of the other); give them distinct names or run them separately")
                raise OutputError(f"{path}: the {what} and the {other} of {image} would be the same file; choose "
                                  "another name")
        for key in file_key(path):
            written[key] = (what, image)

    for image in images:
        try:
            target = default_output_path(image, out, suffix)
        except CordsegError:
            if len(images) == 1:
                raise
            continue  # reported with its image when its turn comes
        claim(target, "output", image)
        if suffix == "_centerline":
            claim(target.with_name(nifti_stem(target) + ".csv"), "centerline CSV", image)
        if opts.csa:
            claim(target.with_name(nifti_stem(target) + "_csa.csv"), "CSA table", image)
        if opts.qc:
            from .qc import qc_path

            claim(qc_path(target), "QC picture", image)
    if opts.csv_file:
        claim(Path(opts.csv_file), "--csv table", images[0] if len(images) == 1 else "the images")


def _writable_folder(path):
    from .io import check_output_name

    folder = Path(os.path.realpath(check_output_name(path))).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist or is not writable")


class _Volume(click.ParamType):
    name = "INDEX|mean"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "mean":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a volume index (0-based) nor 'mean'", param, ctx)


VOLUME = _Volume()


def _common(f):
    f = click.option("-v", "--verbose", is_flag=True, help="print each stage's time")(f)
    f = click.option("--no-conus", is_flag=True, help="keep the centerline's own lower end: do not end the cord "
                     "at the conus (t1/t2; see `cordseg models`)")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None, envvar="CORDSEG_THREADS",
                     show_envvar=True, help="CPU threads for the networks (default: one per physical core; "
                     "set it to the cores a cluster job was given)")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="no progress bar")(f)
    f = click.option("--volume", type=VOLUME, default=None, help="volume of a 4D image to use (0-based), or "
                     "'mean': the mean of its volumes (a diffusion series: of its diffusion-weighted volumes, "
                     "b > 50 from the .bval beside it, else the volumes not brighter than 1.5x the median one)")(f)
    f = click.option("-o", "--output", "out", type=click.Path(), default=None,
                     help="output file, or an existing folder (default: current folder)")(f)
    f = click.option("-c", "--contrast", type=click.Choice(CONTRASTS, case_sensitive=False),
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

    path = default_output_path(image, out, suffix)
    _writable_folder(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise OutputError(f"cannot write {path}: the output name must end in .nii.gz or .nii")
    return path


def _save(img, path: Path, opts: Options, stage):
    """`img` staged for `path` (renamed into place with the image's other outputs, see io.staged_outputs)."""
    with timed(opts.on_stage(), "save"):
        stage.image(img.get_fdata(dtype="float32") if img.get_data_dtype().kind == "f" else img.dataobj, img,
                    path, dtype=img.get_data_dtype())


@contextmanager
def _outputs():
    """One image's outputs (mask, CSV, QC picture), all put in place at the end of the block or none."""
    from .io import staged_outputs

    with staged_outputs() as stage:
        yield stage


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message="cordseg %(version)s")
def main():
    """Find the spinal cord in MRI and segment the cord and MS lesions, on a CPU."""


@main.command()
@_common
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN1 ONNX model file to use")
@click.option("--smoothness", type=float, default=None, help="OptiC's curvature penalty (default 1.0)")
@_qc_option
def centerline(**params):
    """Cord centerline: a NIfTI mask (one voxel per slice) and a CSV beside it. Several images: -o is a
    folder."""
    from .inputs import check_smoothness

    opts = Options(**params)
    if opts.smoothness is not None:
        check_smoothness(opts.smoothness, "--smoothness")
    _check_outputs(opts, "_centerline")
    seg = opts.segmenter(centerline_model=opts.model)
    _for_each(opts, lambda image: _centerline_one(image, opts, seg))


def _centerline_one(image, opts: Options, seg):
    from .io import nifti_stem

    path, rep, (src, contrast, volume) = _start(image, opts, "_centerline")
    mask, cl = seg.centerline(src, contrast=contrast, volume=volume, progress=rep)
    rep.done()
    csv_path = path.with_name(nifti_stem(path) + ".csv")
    # x, y, z: RPI working-space voxels (as the published tool writes them); i, j, k: the input's own voxels
    rpi_pts, native, mm = cl.rpi_points, cl.native_points(), cl.scanner_mm()
    with _outputs() as stage:
        _save(mask, path, opts, stage)
        _write_csv(csv_path, ["slice", "x", "y", "z", "i", "j", "k", "x_mm", "y_mm", "z_mm"],
                   [[int(z), *(f"{v:.3f}" for v in r), *(f"{v:.3f}" for v in n), *(f"{v:.3f}" for v in m)]
                    for z, r, n, m in zip(cl.z, rpi_pts, native, mm)], stage)
        qc_file = _write_qc(src, {"centerline": _binary(mask, opts, src)}, path, opts, stage=stage) if opts.qc else None
    if not opts.quiet:
        click.echo(f"centerline: {len(cl.z)} slices -> {path} and {csv_path}"
                   + (f" (QC: {qc_file})" if opts.qc else ""))


@main.command()
@_common
@click.option("--soft", is_flag=True, help="write the float32 probability map instead of a mask")
@click.option("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN2 cord ONNX model file to use")
@_given_centerline_option
@_qc_option
@click.option("--csa", is_flag=True, help="also write <output stem>_csa.csv, the cross-sectional area and shape "
              "of every cord slice (cordseg morphometry --perslice), and print the mean area")
def sc(**params):
    """Spinal cord segmentation -> <stem>_seg.nii.gz. Several images: -o is a folder."""
    from .inputs import check_threshold

    opts = Options(**params)
    check_threshold(opts.threshold, "--threshold")
    _check_outputs(opts, "_seg")
    seg = opts.segmenter(cord_model=opts.model)
    _for_each(opts, lambda image: _sc_one(image, opts, seg))


def _sc_one(image, opts: Options, seg):
    path, rep, (src, contrast, volume) = _start(image, opts, "_seg")
    mask = seg.cord(src, contrast=contrast, soft=opts.soft, threshold=opts.threshold,
                    centerline=opts.centerline_file, volume=volume, progress=rep)
    rep.done()
    csa = None
    if opts.csa:  # measured on what is written: the mask, or the soft map's partial-volume areas
        from .morphometry import morphometry

        with timed(opts.on_stage(), "csa"):
            csa = morphometry(mask, image if isinstance(image, (str, Path)) else None, perslice=True)
    with _outputs() as stage:
        _save(mask, path, opts, stage)
        qc_file = _write_qc(src, {"cord": _binary(mask, opts, src)}, path, opts, stage=stage) if opts.qc else None
        if csa is not None:
            from .io import nifti_stem

            _write_csv(path.with_name(nifti_stem(path) + "_csa.csv"), list(csa.columns),
                       [[_cell(r.get(c)) for c in csa.columns] for r in csa.rows], stage)
    if not opts.quiet:
        import numpy as np

        vox = _voxel_mm3(mask)
        n = int((np.asarray(mask.dataobj) >= 0.5).sum())
        area = f", mean CSA {csa.mean_area:.1f} mm2" if csa is not None else ""
        click.echo(f"cord: {n * vox:.0f} mm3 -> {path}{area}" + (f" (QC: {qc_file})" if opts.qc else ""))


def _cell(v):
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@main.command()
@_common
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), help="write one row per lesion here")
@click.option("--soft", is_flag=True, help="write the float32 probability map instead of a mask")
@click.option("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
@click.option("--min-contrast", type=float, default=None,
              help="one fixed bar for every lesion: report only lesions touching the cord and at least this "
              "many times brighter than it (the shipped model: than the same places of the cord above and below; "
              "default: the model's screening, for the shipped one a bar each scan sets itself; 0: no screening)")
@click.option("--model", type=click.Path(dir_okay=False), help="a CNN2 lesion ONNX model file to use")
@_given_centerline_option
@_qc_option
def lesion(**params):
    """MS lesion segmentation -> <stem>_lesionseg.nii.gz; prints lesion count and volume. Several images: -o
    is a folder, and --csv one table with an image column."""
    from .inputs import check_threshold

    opts = Options(**params)
    check_threshold(opts.threshold, "--threshold")
    if opts.csv_file:  # fail before any work (and before the mask is written) when the table cannot be written
        _writable_folder(opts.csv_file)
    _check_outputs(opts, "_lesionseg")
    seg = opts.segmenter(lesion_model=opts.model)
    table = []  # (image, lesion rows) of every image done

    def one(image):
        rows = _lesion_one(image, opts, seg)
        if rows is not None:
            table.append((image, rows))

    try:
        _for_each(opts, one)
    finally:  # several images: one table for all that succeeded, with an image column, even if some failed
        if opts.csv_file and table and not opts.soft and len(opts.images) > 1:
            _write_lesion_csv(opts, table)


def _write_lesion_csv(opts: Options, table, stage=None):
    """--csv: one row per lesion of each (image, rows) of `table`; several images: an image column first."""
    from .lesions import LESION_CSV_HEADER

    several = len(opts.images) > 1
    header = (["image"] if several else []) + LESION_CSV_HEADER
    _write_csv(Path(opts.csv_file), header,
               [([str(image)] if several else []) + r.csv_row() for image, rows in table for r in rows], stage)


def _lesion_one(image, opts: Options, seg):
    """One image; returns its lesion table (None with --soft)."""
    from .api import centerline_from_mask

    path, rep, (src, contrast, volume) = _start(image, opts, "_lesionseg")
    given, track = opts.centerline_file, None
    if opts.qc:  # the views follow the cord, so the centerline is needed on the image's grid (found once)
        if opts.centerline_file:
            track, given = centerline_from_mask(src, opts.centerline_file, volume=volume)
        else:
            track, given = seg.centerline(src, contrast=contrast, volume=volume, progress=rep)
    kw = dict(contrast=contrast, threshold=opts.threshold, min_contrast=opts.min_contrast, centerline=given,
              volume=volume, progress=rep)
    if opts.soft:
        mask, rows = seg.lesions(src, soft=True, **kw), None
    else:  # each lesion's probability and brightness come with the mask, for the table
        mask, rows = seg.lesion_table(src, **kw)
    layers = {}
    if opts.qc:  # the lesions shown inside the cord's outline (the cord model along the same centerline)
        from .errors import NoCordError

        try:
            layers["cord"] = _binary(seg.cord(src, contrast=contrast, centerline=given, volume=volume), opts, src)
        except (NoCordError, ModelError):
            pass
    rep.done()
    qc_note = ""
    with _outputs() as stage:
        _save(mask, path, opts, stage)
        if opts.qc:
            layers["lesion"] = _binary(mask, opts, src)
            qc_note = f" (QC: {_write_qc(src, layers, path, opts, track, stage)})"
        if opts.csv_file and len(opts.images) == 1 and rows is not None:  # the table goes with its mask
            _write_lesion_csv(opts, [(image, rows)], stage)
    if opts.soft:
        if not opts.quiet:
            click.echo(f"lesion probability map -> {path}{qc_note}")
        return None
    total = sum(r.volume_mm3 for r in rows)
    click.echo(f"lesions: {len(rows)}, total volume {total:.1f} mm3 -> {path}{qc_note}")
    return rows


@main.command("models")
def models_cmd():
    """List the installed models and what each one is."""
    from .inference import list_models, model_dirs

    found = list_models()
    if not found:
        raise ModelError("no models found in " + ", ".join(str(d) for d in model_dirs()))
    for m in found:
        click.echo(m.describe())


def _binary(seg, opts: Options, src):
    """A mask image for the QC outline, on `src`'s 3D grid: the mask itself, or a soft map at --threshold
    (default 0.5)."""
    import numpy as np

    from .io import image_like

    threshold = opts.threshold if opts.soft and opts.threshold is not None else 0.5
    data = np.asarray(seg.dataobj, np.float32).reshape(src.shape)
    return image_like((data >= threshold).astype(np.uint8), src)


def _voxel_mm3(img) -> float:
    """One voxel's volume from the header (a 2D image's slice thickness counts as given, or 1 mm)."""
    import numpy as np

    zooms = [float(z) for z in img.header["pixdim"][1:4]]
    return float(np.prod([abs(z) if np.isfinite(z) and z != 0 else 1.0 for z in zooms]))


def _start(image, opts: Options, suffix):
    """One image's output path (checked before any work), progress reporter and what the API is given."""
    return _output(image, opts.out, suffix), Reporter(opts.quiet, opts.verbose), _source(image, opts)


def _source(image, opts: Options):
    """What the API is given for `image`: (image, contrast, volume): its path, or with --qc the image read
    once here (its contrast read from its name, its volume picked), since the picture and, for lesions, the
    centerline need it too."""
    if not opts.qc:
        return image, opts.contrast, opts.volume
    from .inputs import resolve_contrast
    from .io import load_image

    with timed(opts.on_stage(), "load"):
        src = load_image(image, volume=opts.volume)
    return src, resolve_contrast(image, opts.contrast), None


def _write_qc(src, overlays, output: Path, opts: Options, track=None, stage=None) -> Path:
    """The QC picture of `src` (the image read by _source) beside `output`, staged with it."""
    from .qc import mosaic, png_bytes, qc_path

    with timed(opts.on_stage(), "qc"):
        return stage.bytes(png_bytes(mosaic(src, overlays, track=track)), qc_path(output))


def _write_csv(path: Path, header, rows, stage=None):
    """Atomic CSV write (temporary file beside the target, then rename), staged with an image's other outputs
    when `stage` is given."""
    import io as _io

    from .io import write_bytes_atomic

    buf = _io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    if stage is not None:
        stage.bytes(buf.getvalue().encode("utf-8"), path)
    else:
        write_bytes_atomic(buf.getvalue().encode("utf-8"), path)


# what the training extra installs; the training modules import them only inside their functions, so a
# missing one would otherwise surface as a traceback halfway through a command
TRAIN_EXTRA = ("tensorflow", "keras", "tf2onnx", "onnx")


def _extra_command(name, module, function, doc):
    """A command that hands its arguments to the training extra's own parser (TensorFlow loads only then)."""

    @main.command(name, help=doc, add_help_option=False,
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx):
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
            raise CordsegError(f"{name} needs the training extra: pip install 'cordseg[train]' ({exc})") from None
        sys.exit(entry(ctx.args))

    return command


_extra_command("import-keras", "keras_import", "main_import_keras",
               "Convert a published Keras .h5 model to a cordseg ONNX model (needs cordseg[train]).")
_extra_command("train", "train", "main",
               "Train a network from synthetic (and BIDS) data (needs cordseg[train]); see `cordseg train -h`.")
_Main.lazy = {
    "evaluate": _LazyCommand("evaluate", "cordseg.cli_evaluate", "evaluate",
                             "Compare predictions with references (Dice, volumes, lesions, centerline)."),
    "morphometry": _LazyCommand("morphometry", "cordseg.cli_morphometry", "morphometry",
                                "Cord cross-sectional area and shape from a cord mask."),
    "study": _LazyCommand("study", "cordseg.cli_study", "study",
                          "Segment every image of a BIDS dataset into BIDS derivatives and one table."),
    "qc": _LazyCommand("qc", "cordseg.cli_qc", "qc", "A static quality-control page for a study's derivatives."),
}


if __name__ == "__main__":  # pragma: no cover
    main()

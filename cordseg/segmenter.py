"""Segmenter: the models opened once, asked many times.

    seg = cordseg.Segmenter("t2", threads=2)
    for path in paths:
        cord = seg.cord(path)                     # nibabel image on the input grid
        lesions = seg.lesions(path)
        mask, centerline = seg.centerline(path)

A model (CNN1, CNN2 cord, CNN2 lesion) is found and its ONNX Runtime session opened the first time a call
needs it, then kept: a batch of images pays for sessions once. Without a contrast, each image's is read
from its file name and the models of each contrast met are kept. cordseg.segment_cord, segment_lesions and
detect_centerline are one-call wrappers over a Segmenter.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import centerline as _centerline
from . import conus as _conus
from . import lesions as _lesions
from . import segmentation as _segmentation
from .errors import CordsegWarning, InputError, ModelError, NoCordError
from .inference import Model, find_model
from .inputs import (check_callable, check_flag, check_min_contrast, check_model_path, check_smoothness, check_threads,
                     check_threshold, resolve_contrast, typed_errors)
from .io import image_like, input_shape, load_image, same_grid
from .orientation import to_rpi
from .stages import OnStage, timed

_STAGE = {"sc": "cord", "lesion": "lesions"}


class Segmenter:
    """Centerline, cord and lesion segmentation with the models of one contrast (or of each image's).

    contrast: t1, t2, t2s or dwi; None: read from each image's file name.
    centerline_model, cord_model, lesion_model: ONNX files to use instead of the installed models.
    conus: end the detected centerline, and every mask along it, at the conus where the nerve roots run on
    below it (cordseg.conus; where a conus model serves the contrast: the installed one serves t1 and t2).
    conus_model: an ONNX file to use for it instead of the installed one.
    threads: CPU threads for ONNX Runtime (None: its default, one per physical core).
    smoothness: OptiC's curvature penalty for the centerline.
    on_stage: called with a cordseg.stages.StageEvent (stage name, seconds, CPU seconds) after each stage.
    """

    def __init__(self, contrast: str | None = None, *, centerline_model=None, cord_model=None, lesion_model=None,
                 threads: int | None = None, smoothness: float = _centerline.DEFAULT_SMOOTHNESS,
                 on_stage: OnStage | None = None, conus: bool = True, conus_model=None):
        check_threads(threads)
        check_smoothness(smoothness)
        for name, path in (("centerline_model", centerline_model), ("cord_model", cord_model),
                           ("lesion_model", lesion_model), ("conus_model", conus_model)):
            check_model_path(path, name)
        check_callable(on_stage, "on_stage")
        check_flag(conus, "conus")
        self.contrast = None if contrast is None else resolve_contrast(None, contrast)
        self.paths = {"centerline": centerline_model, "sc": cord_model, "lesion": lesion_model, "conus": conus_model}
        self.conus = conus
        self.threads = threads
        self.smoothness = smoothness
        self.on_stage = on_stage
        self._models: dict[tuple[str, str], Model | None] = {}  # None: an optional model not installed

    def __repr__(self):
        opened = ", ".join(f"{t}/{c}" for (t, c), m in self._models.items() if m is not None) or "none yet"
        return f"Segmenter(contrast={self.contrast!r}, threads={self.threads!r}; models open: {opened})"

    # --- models ---
    def model(self, task: str, contrast: str, optional: bool = False) -> Model | None:
        """The model for `task` ("centerline", "sc", "lesion", "conus") and `contrast`, found and its session
        opened on first use, then kept (None where there is none and it is `optional`)."""
        key = (task, contrast)
        if key not in self._models or (self._models[key] is None and not optional):
            with timed(self.on_stage, "models"):
                model = find_model(task, contrast, self.paths[task], self.threads, optional=optional)
                if model is not None:
                    model.session()
            self._models[key] = model
        return self._models[key]

    # --- the three answers ---
    @typed_errors
    def centerline(self, img, *, contrast=None, volume=None, progress=None):
        """(centerline mask image on the input grid, one voxel per slice; Centerline).

        img: a path or a nibabel image. contrast: this image's (default: the Segmenter's, else read from the
        file name). volume: the volume of a 4D image to use (0-based, or "mean": io.load_image). progress:
        called with (stage, fraction done)."""
        image, contrast = self._load(img, volume, contrast, progress)
        return self._centerline(image, contrast, progress)

    @typed_errors
    def cord(self, img, *, soft=False, threshold=None, centerline=None, contrast=None, volume=None, progress=None):
        """Spinal cord mask (uint8) or, with soft=True, its probability map (float32), on the input grid.

        centerline: use this centerline instead of detecting one: a mask (path or image, on any grid of the
        same session; marked voxels on a few slices are interpolated between) or the Centerline that
        .centerline() returned for this image. Other arguments: as for .centerline()."""
        check_threshold(threshold)
        image, contrast = self._load(img, volume, contrast, progress)
        return self._cord(image, contrast, soft, threshold, centerline, progress)

    @typed_errors
    def lesions(self, img, *, soft=False, threshold=None, min_contrast=None, centerline=None, contrast=None,
                volume=None, progress=None):
        """MS lesion mask (uint8) or probability map (float32) in the cord, on the input grid.

        The mask keeps only lesions that touch the cord and are bright enough, as the lesion model says (the
        shipped one: against the same places of the cord on the slices above and below, with a bar the scan
        sets itself; others: the median of the lesion-free cord on their slices). min_contrast None: the
        model's screening; a number: that one bar for every lesion; 0: no screening. The cord is segmented with the
        cord model along the same centerline. The soft map is the network's output, unscreened. centerline: as
        for .cord()."""
        check_min_contrast(min_contrast)
        check_threshold(threshold)
        image, contrast = self._load(img, volume, contrast, progress)
        return self._lesions(image, contrast, soft, threshold, min_contrast, centerline, progress)

    # --- on an image already read (the one-call wrappers read it themselves) ---
    def _load(self, img, volume, contrast=None, progress=None):
        check_callable(progress)
        with timed(self.on_stage, "load"):
            image = load_image(img, volume=volume)
        return image, resolve_contrast(img, self.contrast if contrast is None else contrast)

    def _rpi(self, image):
        with timed(self.on_stage, "reorient"):
            return to_rpi(image)

    def _output(self, data, image, dtype=np.uint8):
        """`data` (on `image`'s 3D grid) as an image of the input's own shape (2D stays 2D, 4D stays 4D)."""
        with timed(self.on_stage, "output"):
            return image_like(np.asarray(data, dtype).reshape(input_shape(image)), image)

    def _centerline(self, image, contrast, progress):
        rpi = self._rpi(image)
        cl = self._detect(rpi, contrast, progress)
        return self._output(cl.native_mask(), image), cl

    def _detect(self, rpi, contrast, progress):
        model = self.model("centerline", contrast)
        _check_working_grid(rpi, model)
        with timed(self.on_stage, "centerline"):
            cl = _centerline.detect(rpi, model, smoothness=self.smoothness, progress=progress,
                                    on_stage=self.on_stage)
        _check_cord_extent(cl, rpi)
        end = self.model("conus", contrast, optional=True) if self.conus else None
        if end is not None:
            with timed(self.on_stage, "conus"):
                cl = _conus.end_at_conus(cl, end, progress=progress, on_stage=self.on_stage)
        return cl

    def _soft_map(self, task, image, contrast, centerline, progress):
        """(RPI view, probability map, CNN2 model, centerline) for `task` "sc" or "lesion"."""
        rpi = self._rpi(image)
        cnn2 = self.model(task, contrast)  # before any work: a missing model fails fast
        if cnn2.warning:
            warnings.warn(f"{cnn2.path.name}: {cnn2.warning}", CordsegWarning, stacklevel=4)
        cl = given_centerline(centerline, rpi) if centerline is not None else self._detect(rpi, contrast, progress)
        stage = _STAGE[task]
        with timed(self.on_stage, stage):
            prob = _segmentation.soft_segmentation(cl, cnn2, progress, stage=stage, on_stage=self.on_stage)
        return rpi, prob, cnn2, cl

    def _cord(self, image, contrast, soft, threshold, centerline, progress):
        rpi, prob, model, _ = self._soft_map("sc", image, contrast, centerline, progress)
        if soft:
            return self._output(rpi.to_native(prob), image, np.float32)
        thr = model.threshold_for(contrast) if threshold is None else float(threshold)
        with timed(self.on_stage, "mask"):
            mask = _segmentation.keep_largest_component((prob >= thr).astype(np.uint8))
        if not mask.any():
            raise NoCordError("no spinal cord found (the centerline was found, but no voxel reached the "
                              f"cord threshold {thr:g})")
        return self._output(rpi.to_native(mask), image)

    def _lesions(self, image, contrast, soft, threshold, min_contrast, centerline, progress, table=False):
        rpi, prob, model, cl = self._soft_map("lesion", image, contrast, centerline, progress)
        if soft:
            return self._output(rpi.to_native(prob), image, np.float32)
        thr = model.threshold if threshold is None else float(threshold)
        c = model.contract
        with timed(self.on_stage, "mask"):
            mask = (prob >= thr).astype(np.uint8)
            if 0 < c.lesion_grow_to < thr:  # cores grown to the map's lower contour (whole lesions)
                mask = _lesions.grow_lesions(mask, prob, c.lesion_grow_to)
        least = model.min_lesion_contrast if min_contrast is None else float(min_contrast)
        # a bar the caller names is one bar for every lesion: the scan's own (adaptive) bar is the model's
        measure = "local" if min_contrast is not None and c.lesion_contrast == "adaptive" else c.lesion_contrast
        cord = None
        if (least > 0 or c.lesion_fill or table) and mask.any():
            try:
                sc = self.model("sc", contrast)
            except ModelError as err:
                warnings.warn(f"lesion screening skipped: {err}", CordsegWarning, stacklevel=3)
            else:
                with timed(self.on_stage, "screening"):
                    if measure == "adaptive" and least > 0:  # each lesion's shape moves along all the cord
                        margin = prob.shape[2]
                    elif measure != "slice" or table or (c.lesion_edge and least > 0):
                        # local contrasts need the cord above and below (growth to the edge follows screening only)
                        margin = _lesions.local_reach_slices(rpi.zooms)
                    else:
                        margin = 0
                    cord = _lesions.cord_along_lesions(mask, cl, sc, progress, on_stage=self.on_stage, margin=margin,
                                                       threshold=sc.threshold_for(contrast))
                    if least > 0:
                        mask = _lesions.screen_lesions(mask, rpi.data, cord, least, measure=measure,
                                                       floor=c.lesion_contrast_floor, zooms=rpi.zooms)[0]
                    if c.lesion_edge and least > 0 and mask.any():  # the screened lesions' rims
                        mask = _lesions.grow_to_local_edge(mask, prob, rpi.data, cord, rpi.zooms, *c.lesion_edge)
                    if c.lesion_fill and mask.any():
                        mask = _lesions.fill_to_edge(mask, rpi.data, cord, c.lesion_fill, rpi.zooms)
        if not mask.any():
            self._require_cord(contrast, cl)
        out = self._output(rpi.to_native(mask), image)
        if not table:
            return out
        with timed(self.on_stage, "table"):
            on_grid = image_like(rpi.to_native(mask).astype(np.uint8), image)  # 3D, as the maps (out may be 2D/4D)
            rows = _lesions.lesion_table(on_grid, prob=rpi.to_native(prob), image=np.asanyarray(image.dataobj),
                                         cord=None if cord is None else rpi.to_native(cord))
        return out, rows

    def _require_cord(self, contrast, cl):
        """Zero lesions must mean a cord without lesions: NoCordError when the cord model finds no cord along
        the centerline (skipped when no cord model is installed for the contrast)."""
        try:
            sc = self.model("sc", contrast)
        except ModelError:
            return
        with timed(self.on_stage, "cord check"):
            prob = _segmentation.soft_segmentation(cl, sc, None, stage="cord", on_stage=self.on_stage)
        thr = sc.threshold_for(contrast)
        if not (prob >= thr).any():
            raise NoCordError("no spinal cord found (the centerline was found, but no voxel reached the cord "
                              f"threshold {thr:g}, so no lesion could be looked for)")

    @typed_errors
    def lesion_table(self, img, *, threshold=None, min_contrast=None, centerline=None, contrast=None, volume=None,
                     progress=None):
        """(lesion mask image as .lesions() returns it, [cordseg.lesions.Lesion]): each lesion with its volume,
        place, slices, mean and maximum probability and brightness over the lesion-free cord."""
        check_min_contrast(min_contrast)
        check_threshold(threshold)
        image, contrast = self._load(img, volume, contrast, progress)
        return self._lesions(image, contrast, False, threshold, min_contrast, centerline, progress, table=True)


MAX_WORKING_VOXELS = 2**25  # the image on CNN1's grid: 128 MB as float32, a few copies of it at once
MIN_CORD_MM = 10.0  # a cord seen over less than this, in an image that spans much more, is a stray blob


def _check_working_grid(rpi, model):
    """Refuse, before resampling, an image whose grid at the model's voxel size would not fit in memory."""
    from .resampling import resampled_shape

    target = _centerline.model_grid(rpi, model, model.contract.centerline_slice_mm)
    shape = resampled_shape(rpi.shape, rpi.zooms, target)
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_WORKING_VOXELS:
        raise InputError(f"resampled to the centerline model's {'x'.join(f'{z:g}' for z in target)} mm voxels, "
                         f"the image would have {'x'.join(map(str, shape))} voxels ({n:,}; at most "
                         f"{MAX_WORKING_VOXELS:,}); crop it around the spinal cord")


def _check_cord_extent(cl, rpi):
    """NoCordError for a centerline too short to be a cord: CNN1 answers a bright blob of noise on a slice or
    two; a cord runs along the image (or, in a thin slab, across most of it)."""
    dz = float(rpi.zooms[2])
    length, span = len(cl.z) * dz, rpi.shape[2] * dz
    if length < MIN_CORD_MM and length < 0.5 * span:
        raise NoCordError(f"no spinal cord found (only a {length:.0f} mm stretch of the {span:.0f} mm the image "
                          "spans looked like cord)")


def given_centerline(centerline, rpi):
    """A centerline the caller supplies, on `rpi`'s slices: a Centerline found on the same image, or a mask
    (path or nibabel image; a few marked voxels are enough, see centerline.from_mask)."""
    if isinstance(centerline, _centerline.Centerline):
        if not same_grid(centerline.rpi.affine, centerline.rpi.shape, rpi.affine, rpi.shape):
            raise InputError("the centerline given was found on another image (its grid differs)")
        return _centerline.Centerline(centerline.z, centerline.x, centerline.y, rpi)
    mask = load_image(centerline)
    return _centerline.from_mask(rpi, np.asanyarray(mask.dataobj), mask.affine)

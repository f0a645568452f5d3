"""Lesion training patches carved from real lesion-free scans (CarveMix / LesionMix-style).

Fully synthetic patches teach what a lesion looks like; real backgrounds teach what it is not: grey matter
brighter than white matter, coil shading, thick-slice partial volume, the texture of real tissue. Here a
lesion is drawn inside a real scan's cord on a fine grid that subdivides the scan's own voxels, its
intensity added there and averaged into the native voxels (so a 17 mm slice gets the partial-volume lesion a
scanner would record), and the patch is then cut the way the runtime cuts it: slices levelled, resampled to
the model's grid. The label is the lesion on the model's grid. A share of patches stays lesion-free.

Backgrounds are (image, cord mask) pairs: the reference mask where a scan has one, else cordseg's own cord
mask. Keep the subjects of any evaluation set out of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cordseg.io import load_image
from cordseg.orientation import to_rpi
from cordseg.resampling import resample, resample_to_shape
from cordseg.segmentation import level_slices

from . import synth
from .tasks import model_input

FINE_MM = 0.5  # lesions are drawn on the native voxels subdivided to about this size


@dataclass
class Background:
    image: np.ndarray  # RPI, native grid, float32
    cord: np.ndarray  # RPI, native grid, bool (where lesions may go)
    zooms: tuple
    name: str = ""

    @property
    def cord_slices(self):
        return np.nonzero(self.cord.any(axis=(0, 1)))[0]


def load_background(image_path, cord_path=None, *, cord=None, erode=1, name=None):
    """A lesion-free scan and its cord mask (a path, or an RPI array `cord` already on the scan's grid)."""
    rpi = to_rpi(load_image(image_path))
    if cord is None:
        cord = to_rpi(load_image(cord_path)).data > 0.5
    cord = np.asarray(cord, bool)
    if cord.shape != rpi.shape:
        raise ValueError(f"{name or image_path}: its cord mask has shape {cord.shape[:3]}, the image {rpi.shape}")
    if not cord.any():
        raise ValueError(f"{name or image_path}: its cord mask is empty")
    if erode:  # keep inserted lesions intramedullary when the mask is a model's and may reach the CSF
        st = np.zeros((3, 3, 1), bool)
        st[1, :, 0] = st[:, 1, 0] = True
        eroded = ndi.binary_erosion(cord, st, iterations=erode)
        cord = np.where(eroded.any(axis=(0, 1), keepdims=True), eroded, cord)
    return Background(rpi.data.astype(np.float32), cord, tuple(float(z) for z in rpi.zooms),
                      name or str(image_path))


def _subdivision(zooms):
    return tuple(max(1, int(round(z / FINE_MM))) for z in zooms)


def _crop(bg: Background, centre, half_mm):
    """Native voxel slices around `centre` covering +-half_mm (clipped to the volume)."""
    out = []
    for c, h, z, n in zip(centre, half_mm, bg.zooms, bg.image.shape):
        r = int(np.ceil(h / z)) + 1
        out.append(slice(max(0, int(c) - r), min(n, int(c) + r + 1)))
    return tuple(out)


def draw_lesions(cord_fine, rng, fine_zooms, *, count=(1, 3), volume_mm3=(2.0, 600.0)):
    """Soft lesion map (0..1) inside the fine cord mask, drawn by the training generator's lesion shapes."""
    labels = np.where(cord_fine, synth.WM, synth.CSF).astype(np.uint8)
    return synth.insert_lesions(labels, rng, fine_zooms, count=count, volume_mm3=volume_mm3)


def lesion_gain(rng):
    """Lesion/cord brightness: half of the lesions faint (1.1-1.4), half 1.4-2.0."""
    return float(rng.uniform(1.1, 1.4) if rng.random() < 0.5 else rng.uniform(1.4, 2.0))


def thicker(bg: Background, k: int) -> Background:
    """`bg` with axial slices k times thicker (means of k consecutive slices, as a scanner averages a slab;
    the cord where at least half of the slab is cord)."""
    n = bg.image.shape[2] // k
    if k <= 1 or n < 2:
        return bg
    slab = (lambda a: _voxel_means(a[:, :, :n * k], (a.shape[0], a.shape[1], n), (1, 1, k)))
    cord = slab(bg.cord.astype(np.float32)) >= 0.5
    return Background(slab(bg.image).astype(np.float32), cord, bg.zooms[:2] + (bg.zooms[2] * k,), bg.name)


def vary_background(bg: Background, rng, max_slice_mm=10.0) -> Background:
    """A variant of a real background: half of the time its slices made 2-5 times thicker (up to
    `max_slice_mm`), so that a few scans stand for the thick-slice acquisitions they are not."""
    ks = [k for k in range(2, 6) if bg.zooms[2] * k <= max_slice_mm]
    if not ks or rng.random() < 0.5:
        return bg
    out = thicker(bg, int(rng.choice(ks)))
    return out if out.cord.any() else bg


def vary_intensity(x: np.ndarray, rng) -> np.ndarray:
    """Another scanner's rendering of a patch: a gamma of 0.7-1.4 on its intensities and added noise of up
    to 5% of its 99th percentile (Rician: magnitude images)."""
    top = float(np.percentile(x, 99)) or 1.0
    y = top * np.clip(x / top, 0.0, None) ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    sigma = rng.uniform(0.0, 0.05) * top
    return np.hypot(y + rng.normal(0, sigma, y.shape), rng.normal(0, sigma, y.shape)).astype(np.float32)


MAX_TISSUE_GAIN = 3.5  # brightest lesion tissue over the cord (about CSF on T2)


def carve_patch(bg: Background, rng, shape, model_zooms, *, p_free=0.3, count=(1, 3), volume_mm3=(2.0, 600.0),
                shift_mm=3.0, as_seen=False, snap_ends=False):
    """(image patch on the model's grid, lesion target, cord) around a random cord point of `bg`.

    snap_ends: a patch that would reach past the scan's first or last slice is moved inside it, as the
    runtime places its patches along a cord that runs through the whole scan, instead of repeating the end
    slice: an end slice then lies at the patch's border with its context on one side only, as at run time.

    as_seen: each lesion's drawn brightness (lesion_gain) is what the scan shows on its native voxels (their
    mean where the lesion fills at least half of a voxel, over the cord's median), not its tissue's: a small
    lesion on a thick slice then has brighter tissue, as a lesion a rater marks on such a slice must, instead
    of a label over voxels that barely differ from the cord."""
    zs = bg.cord_slices
    z = int(rng.choice(zs))
    xs, ys = np.nonzero(bg.cord[:, :, z])
    centre = [xs.mean() + rng.normal(0, shift_mm / bg.zooms[0]), ys.mean() + rng.normal(0, shift_mm / bg.zooms[1]),
              z + rng.uniform(-0.5, 0.5) * shape[2] * model_zooms[2] / bg.zooms[2] * 0.5]
    half = [0.5 * s * m + 2.0 for s, m in zip(shape, model_zooms)]
    box = _crop(bg, centre, half)
    if snap_ends:  # a crop at the scan's first or last slice reaches a whole patch into the scan
        n, need = bg.image.shape[2], int(np.ceil((shape[2] * model_zooms[2] + 2.0) / bg.zooms[2])) + 1
        z0, z1 = box[2].start, box[2].stop
        if box[2].start == 0:
            z1 = min(n, max(z1, need))
        if box[2].stop == n:
            z0 = max(0, min(z0, n - need))
        box = box[:2] + (slice(z0, z1),)
    img = bg.image[box].astype(np.float32)
    cord = bg.cord[box]
    sub = _subdivision(bg.zooms)
    fine_zooms = tuple(z / s for z, s in zip(bg.zooms, sub))
    fine_shape = tuple(n * s for n, s in zip(img.shape, sub))
    lesion_fine = np.zeros(fine_shape, np.float32)
    if cord.any() and rng.random() >= p_free:
        cord_fine = resample_to_shape(cord.astype(np.float32), bg.zooms, fine_shape, order=1) >= 0.5
        lesion_fine = draw_lesions(cord_fine, rng, fine_zooms, count=count, volume_mm3=volume_mm3)
    if lesion_fine.any():
        level = float(np.median(img[cord]))
        gain = lesion_gain(rng)  # drawn either way: the default's random stream stays the shipped runs'
        texture = 1.0 + synth._smooth_field(rng, fine_shape, [max(2, n // 8) for n in fine_shape], 0.15)
        if as_seen:
            delta = _seen_delta(lesion_fine, texture, img, level, sub, rng)
        else:
            delta = _voxel_means(lesion_fine * (gain - 1.0) * level * texture, img.shape, sub)
        img = img + delta.astype(np.float32)
    img = level_slices(img)
    vol = resample(img, bg.zooms, model_zooms, order=1)
    lesion = resample_to_shape(lesion_fine, fine_zooms, vol.shape, order=1)
    # the patch, centred where the chosen point falls on the model grid (edges repeat, as at run time)
    c = [(v - b.start + 0.5) * z / m - 0.5 for v, b, z, m in zip(centre, box, bg.zooms, model_zooms)]
    starts = [int(round(ci - s / 2)) for ci, s in zip(c, shape)]
    if snap_ends and vol.shape[2] >= shape[2]:
        if starts[2] < 0 and box[2].start == 0:
            starts[2] = 0
        elif starts[2] + shape[2] > vol.shape[2] and box[2].stop == bg.image.shape[2]:
            starts[2] = vol.shape[2] - shape[2]
    idx = [np.clip(np.arange(a, a + s), 0, n - 1) for a, s, n in zip(starts, shape, vol.shape)]
    x = vol[np.ix_(*idx)]
    y = (lesion[np.ix_(*idx)] >= 0.5).astype(np.float32)
    cord_m = resample_to_shape(cord.astype(np.float32), bg.zooms, vol.shape, order=1)[np.ix_(*idx)] >= 0.5
    if rng.random() < 0.5:
        x, y, cord_m = x[::-1], y[::-1], cord_m[::-1]
    x = x * float(np.exp(rng.normal(0, 0.1)))
    return (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32),
            np.ascontiguousarray(cord_m))


def _voxel_means(fine, shape, sub):
    """A fine-grid map averaged into the native voxels it subdivides (what a scanner records)."""
    return fine.reshape(shape[0], sub[0], shape[1], sub[1], shape[2], sub[2]).mean(axis=(1, 3, 5))


def _seen_delta(lesion_fine, texture, img, level, sub, rng):
    """The native-grid intensity added by the lesions of `lesion_fine`, each scaled so that the scan shows
    its drawn brightness (lesion_gain) on the native voxels it at least half fills (the voxels it fills most
    where none is half filled), its tissue no brighter than MAX_TISSUE_GAIN times the cord."""
    comps, n = ndi.label(lesion_fine > 0.05, np.ones((3, 3, 3), bool))
    delta = np.zeros(img.shape, np.float64)
    for i in range(1, n + 1):
        one = np.where(comps == i, lesion_fine, 0.0)
        fill = _voxel_means(one, img.shape, sub)
        unit = _voxel_means(one * level * texture, img.shape, sub)  # added per unit of (tissue gain - 1)
        seen = fill >= min(0.5, float(fill.max()))
        per = float(unit[seen].mean())
        if per <= 0:
            continue
        want = lesion_gain(rng) * level - float(img[seen].mean())  # the mean those voxels must gain
        delta += unit * float(np.clip(want / per, 0.05, MAX_TISSUE_GAIN - 1.0))
    return delta


class CarveSampler:
    """Batches mixing carved real-background patches (share `real_share`) with a synthetic sampler's."""

    def __init__(self, synthetic, backgrounds, *, real_share=0.5, p_free=0.3, vary=0.0, as_seen=False,
                 snap_ends=False):
        self.synthetic = synthetic
        self.as_seen = bool(as_seen)  # lesion brightness as the scan shows it (carve_patch)
        self.snap_ends = bool(snap_ends)  # patches at a scan's ends placed as the runtime places them
        self.backgrounds = list(backgrounds)
        self.real_share = float(real_share)
        self.p_free = p_free
        self.vary = float(vary)  # share of real patches from a varied background (vary_background, vary_intensity)
        cfg = synthetic.cfg
        self.shape, self.zooms, self.batch_size = tuple(cfg.patch_shape), tuple(cfg.voxel_size), cfg.batch_size

    def __call__(self, rng):
        xs, ys = [], []
        for _ in range(self.batch_size):
            if self.backgrounds and rng.random() < self.real_share:
                bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
                varied = bool(self.vary) and rng.random() < self.vary  # drawn only then: streams kept
                x, y, cord = carve_patch(vary_background(bg, rng) if varied else bg, rng, self.shape, self.zooms,
                                         p_free=self.p_free, as_seen=self.as_seen, snap_ends=self.snap_ends)
                if varied:
                    x = vary_intensity(x, rng)
            else:
                x, y, cord = self.synthetic._sample(rng, with_cord=True)
            xs.append(model_input(self.synthetic.cfg, x, cord, rng))
            ys.append(y)
        return np.stack(xs).astype(np.float32), np.stack(ys)[..., None].astype(np.float32)


def cord_mask_for(image_path, contrast, cache_dir):
    """cordseg's own cord mask of a scan (cached), RPI array, for backgrounds without a reference."""
    from pathlib import Path

    import nibabel as nib

    import cordseg

    cache = Path(cache_dir) / (Path(image_path).name.replace(".nii.gz", "") + "_cordseg-sc.nii.gz")
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        nib.save(cordseg.segment_cord(str(image_path), contrast=contrast), str(cache))
    return to_rpi(load_image(cache)).data > 0.5


BACKGROUNDS = {  # subject: ((path under the shared data folder, reference mask or None, contrast), ...)
    "unf01": (("unf01/sub-unf01_T2w.nii.gz", "unf01/sub-unf01_T2w_seg-manual.nii.gz", "t2"),),
    "sub-01": (("unlabeled/sub-01_acq-MTon_MTS.nii.gz", None, "t2s"),
               ("extra/sub-01_acq-MToff_MTS.nii.gz", None, "t2s")),
    "sub-03": (("unlabeled/sub-03_acq-MToff_MTS.nii.gz", None, "t2s"),
               ("extra/sub-03_acq-MTon_MTS.nii.gz", None, "t2s")),
    "sct_testing": (("sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_seg-manual.nii.gz", "t2"),
                    ("sct_testing/mt/mt0.nii.gz", "sct_testing/mt/mt0_seg.nii.gz", "t2s")),
    "lumbar": (("unlabeled/t2_lumbar.nii.gz", None, "t2"),),
}
TRAINING_SUBJECTS = ("unf01", "sub-01")  # the shipped model's; the others are the evaluation's never-seen ones


def load_backgrounds(entries, cache_dir):
    """Backgrounds from (image path, reference cord mask path or None, contrast) entries: without a reference,
    cordseg's own cord mask (cached in `cache_dir`), eroded by a voxel."""
    from pathlib import Path

    out = []
    for image, ref, contrast in entries:
        image = Path(image)
        if ref is not None:
            out.append(load_background(image, Path(ref), erode=0, name=str(image)))
        else:
            out.append(load_background(image, cord=cord_mask_for(image, contrast, cache_dir), erode=1,
                                       name=str(image)))
    return out


def training_backgrounds(data_dir, cache_dir, subjects=TRAINING_SUBJECTS):
    """The lesion-free scans of `subjects` (keys of BACKGROUNDS) as Backgrounds, named by their path under
    `data_dir`."""
    from pathlib import Path

    unknown = sorted(set(subjects) - set(BACKGROUNDS))
    if unknown:
        raise ValueError(f"unknown background subject(s) {', '.join(unknown)} (known: {', '.join(BACKGROUNDS)})")
    entries = [(image, ref, contrast) for subject in subjects for image, ref, contrast in BACKGROUNDS[subject]]
    out = load_backgrounds([(Path(data_dir) / image, None if ref is None else Path(data_dir) / ref, contrast)
                            for image, ref, contrast in entries], cache_dir)
    for bg, (image, _, _) in zip(out, entries):
        bg.name = image
    return out

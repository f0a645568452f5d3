"""The trained models: what each learns from, its input grid, normalisation and metadata.

Every per-model number the runtime needs is defined here once and written into the ONNX file at export.
"""
from __future__ import annotations

import copy

from dataclasses import dataclass, field

import numpy as np

from cordseg.contract import CONTRASTS
from cordseg.normalization import zscore_stack

from . import synth


@dataclass
class TaskConfig:
    task: str  # centerline | sc | lesion
    voxel_size: tuple  # mm of the grid the network sees (x, y, z); z None = native slice thickness
    patch_shape: tuple  # training patch; centerline runs fully convolutionally on whole slices
    normalisation: str
    threshold: float
    batch_size: int
    learning_rate: float
    steps: int
    network: dict = field(default_factory=dict)
    contrasts: tuple = CONTRASTS
    lesion_style: str = "shipped"  # synth.LESION_STYLES: how lesion patches are drawn
    p_conus: float = 0.0  # share of template slices (CNN1) or patches (CNN2) drawn around the conus
    p_sagittal: float = 0.25  # CNN2: share of patches acquired sagittally (thick slices left-right)
    p_dwi: float = 0.0  # CNN2-SC: share of patches drawn as mean diffusion-weighted images
    channels: tuple = ("image",)  # CNN2 input channels (cordseg.normalization.network_input)
    contrast_thresholds: tuple = ()  # ((contrast, threshold), ...): contrasts with a threshold of their own


# Reported lesions must be this much brighter than the same places of the cord on the slices above and below
# ("local"; cordseg.lesions.local_contrasts) - t2/t2s lesions are hyper-intense. Chosen with the lesion
# model's stage 7 and threshold 0.4 on the lesion choosing set (bench/lesion_sweep.py): measured against the
# lesion-free cord's median on their slices ("slice", the rule until 2026-12-06, then at 1.2) faint lesions
# fell under the bar with the grey matter and shading it was set to reject; the local measure keeps lesions
# of 1.1-1.2 and drops grey matter (1.0-1.07 locally).
# Since 2026-12-06 (later) the bar is the scan's own ("adaptive", cordseg.lesions.null_contrasts): the brightest place
# of each lesion's shape moved along the same cord, at least 1.05; 1.12 within 20 mm of the cord's ends and
# on short cords. Chosen on both lesion choosing draws with stage 7 at 0.4 (equal on one, one lesion more and
# fewer false ones on the other), then reported (lesion card).
MIN_LESION_CONTRAST = 1.12
LESION_CONTRAST = "adaptive"
# After screening each lesion takes in its one-voxel rim where the map gives >= 0.1 and the voxel is at least
# half as bright as the lesion over its own places above and below (cordseg.lesions.grow_to_local_edge): the
# map covers a faint lesion's core only. Chosen with the adaptive bar on both choosing draws (equal found on
# one, 30 -> 33 of 43 on the other).
LESION_EDGE = (0.5, 0.1)

# The cord model's mask on mean diffusion-weighted images is narrower than the cord at 0.5 (volume 0.76-0.90 of
# the reference on bench/dwi.py's simulated DWI); 0.15 had the best median Dice there (0.968 against 0.909 at
# 0.5, swept 0.05-0.5). The two real DWI scans were kept out of the choice.
DWI_THRESHOLD = 0.15

TASKS = {
    "centerline": TaskConfig("centerline", (1.0, 1.0, None), (96, 96), "percentile_slices", 0.5,
                             batch_size=12, learning_rate=2e-3, steps=6000,
                             network={"filters": (16, 32, 48)}),
    "sc": TaskConfig("sc", (0.5, 0.5, 1.0), (64, 64, 48), "zscore_stack", 0.5,
                     batch_size=2, learning_rate=2e-3, steps=6000, network={"base_filters": 8},
                     contrasts=("t1", "t2", "t2s", "dwi"), contrast_thresholds=(("dwi", DWI_THRESHOLD),)),
    # the cord model's network trained with a dural sac and nerve roots below the template's conus: used only
    # for where the cord ends (cordseg.conus), on the sagittal T1/T2 scans that reach the conus
    "conus": TaskConfig("conus", (0.5, 0.5, 1.0), (64, 64, 48), "zscore_stack", 0.5,
                        batch_size=2, learning_rate=2e-3, steps=6000, network={"base_filters": 8},
                        contrasts=("t1", "t2")),
    "lesion": TaskConfig("lesion", (0.5, 0.5, 1.0), (48, 48, 48), "zscore_stack", 0.4,
                         batch_size=2, learning_rate=2e-3, steps=6000, network={"base_filters": 8},
                         contrasts=("t2", "t2s")),
}


def with_network(cfg: TaskConfig, network: dict | None, channels=None) -> TaskConfig:
    """A copy of `cfg` whose network settings are updated with `network` (e.g. another CNN2 width) and, if
    given, its input `channels`."""
    cfg = copy.deepcopy(cfg)
    cfg.network.update(network or {})
    if channels:
        cfg.channels = tuple(channels)
    return cfg


def build_model(cfg: TaskConfig):
    from .networks import build_cnn1, build_cnn2

    if cfg.task == "centerline":
        return build_cnn1(**cfg.network)
    return build_cnn2(cfg.patch_shape, in_channels=len(cfg.channels), **cfg.network)


def model_input(cfg: TaskConfig, image, cord, rng) -> np.ndarray:
    """One CNN2 training input (X, Y, Z, C) from a raw patch and its cord (None: unknown, the patch's middle),
    computed by the runtime's own network_input. The centerline is where the cord's centroid is, moved by
    half a millimetre or so: the runtime's comes from OptiC, not from a mask."""
    from cordseg.normalization import centres_from_mask, network_input

    if tuple(cfg.channels) == ("image",):
        return zscore_stack(image)[..., None]
    centres = centres_from_mask(np.zeros(image.shape, bool) if cord is None else cord)
    centres = centres + rng.normal(0.0, 0.5, 2) / np.asarray(cfg.voxel_size[:2])
    return network_input(cfg.normalisation, image[None], channels=cfg.channels, centres=centres[None],
                         zooms=cfg.voxel_size)[0]


def _window_percentiles(image, rng):
    """Slice normalisation computed over a random window, as if the field of view were bigger or smaller."""
    n = image.shape[0]
    w = int(rng.integers(n // 2, n + 1))
    i, j = rng.integers(0, n - w + 1, 2)
    lo, hi = np.percentile(image[i:i + w, j:j + w], [1.0, 99.0])
    return lo, max(hi - lo, 1e-6)


class Sampler:
    """Callable rng -> (x, y) batch for one task; picklable, so worker processes can each hold one.

    `anatomy`: one synth.Anatomy or a list of them with the PAM50 template first; then half of the samples
    come from the template and half from the others (manual masks of real subjects)."""

    def __init__(self, cfg: TaskConfig, anatomy, real=(), real_fraction=0.0):
        self.cfg = cfg
        self.anatomies = list(anatomy) if isinstance(anatomy, (list, tuple)) else [anatomy]
        self.real, self.real_fraction = list(real), float(real_fraction) if real else 0.0

    def _anatomy(self, rng):
        """(anatomy, share of no-cord slices for it) keeping the overall share of no-cord slices at 12%."""
        if len(self.anatomies) == 1:
            return self.anatomies[0], 0.12
        if rng.random() < 0.5:
            return self.anatomies[0], 0.24
        return self.anatomies[1 + int(rng.integers(len(self.anatomies) - 1))], 0.0

    def _sample(self, rng, with_cord=False):
        """One (image, target) pair, before normalisation: real (augmented) or synthetic; with_cord: CNN2's
        (image, target, cord or None)."""
        cfg = self.cfg
        if self.real_fraction and rng.random() < self.real_fraction:
            from .augment import real_patch

            vol = self.real[int(rng.integers(len(self.real)))]
            pair = real_patch(vol, rng, cfg.patch_shape, lesions=cfg.task == "lesion")
            return pair + (None,) if with_cord else pair
        if cfg.task == "centerline":
            anatomy, p_outside = self._anatomy(rng)
            return synth.heatmap_sample(anatomy, rng, size=cfg.patch_shape[0], zoom=cfg.voxel_size[0],
                                        p_outside=p_outside, p_conus=cfg.p_conus)
        img, cord, lesion = synth.patch_sample(self._anatomy(rng)[0], rng, shape=cfg.patch_shape,
                                               spacing=cfg.voxel_size, lesions=cfg.task == "lesion",
                                               p_sagittal=cfg.p_sagittal, p_dwi=cfg.p_dwi, p_conus=cfg.p_conus,
                                               style=synth.LESION_STYLES[cfg.lesion_style])
        target = lesion if cfg.task == "lesion" else cord
        return (img, target, cord) if with_cord else (img, target)

    def __call__(self, rng):
        xs, ys = [], []
        for _ in range(self.cfg.batch_size):
            if self.cfg.task == "centerline":
                img, tgt = self._sample(rng)
                lo, scale = _window_percentiles(img, rng)
                xs.append(((img - lo) / scale)[..., None])
            else:
                img, tgt, cord = self._sample(rng, with_cord=True)
                xs.append(model_input(self.cfg, img, cord, rng))
            ys.append(tgt)
        return np.stack(xs).astype(np.float32), np.stack(ys)[..., None].astype(np.float32)


def load_real(cfg: TaskConfig, data_dir, contrasts=None):
    """Labelled real volumes of a BIDS dataset on the task's grid (those with the mask the task needs)."""
    from .augment import RealVolume
    from .bids import find_labelled

    items = [it for it in find_labelled(data_dir, contrasts)
             if (it.lesion if cfg.task == "lesion" else it.cord) is not None]
    return [RealVolume(it, cfg.voxel_size) for it in items]


def metadata(cfg: TaskConfig, *, contrast: str, steps: int, summary: str, version: str | None = None) -> dict:
    """The runtime's model contract, written as ONNX metadata_props (all values are strings)."""
    from cordseg import __version__
    from cordseg.contract import ModelContract

    centerline = cfg.task == "centerline"
    contrasts = tuple(c.strip() for c in contrast.split(",") if c.strip())
    return ModelContract(
        task=cfg.task,
        contrasts=contrasts,
        layout="NHWC" if centerline else "NXYZC",
        patch_shape=None if centerline else tuple(int(s) for s in cfg.patch_shape),
        voxel_size=tuple(cfg.voxel_size),
        normalisation=cfg.normalisation,
        threshold=float(cfg.threshold),
        size_multiple=4,
        min_lesion_contrast=MIN_LESION_CONTRAST if cfg.task == "lesion" else 0.0,
        lesion_contrast=LESION_CONTRAST if cfg.task == "lesion" else "slice",
        lesion_edge=LESION_EDGE if cfg.task == "lesion" else (),
        channels=tuple(cfg.channels),
        contrast_thresholds=tuple((c, t) for c, t in cfg.contrast_thresholds if c in contrasts),
        info={"version": version or __version__, "training": summary, "steps": str(steps)},
    ).to_metadata()

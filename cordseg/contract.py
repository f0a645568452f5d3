"""The model contract: what a cordseg ONNX file says about itself in its metadata_props.

Parsed and checked once, when a model is opened, so that a file with a bad value is refused there with a
ModelError naming the key, not midway through a run. The same class writes the metadata when a model is
exported or imported, so that the key names are typed in one place.

Keys (all values are strings in the file):
    cordseg_task                 centerline | sc | lesion | conus (a CNN2 whose cord ends at the conus, used
                                 only to say where the cord ends: cordseg.conus)
    cordseg_contrast             contrasts served, comma-separated (t1, t2, t2s, dwi)
    cordseg_layout               NHWC | NCHW (2D) or NXYZC | NCXYZ (3D): the network's input layout
    cordseg_patch_shape          "slice" (whole slices, any size) or e.g. "64x64x48"
    cordseg_voxel_size           the grid the network works on, mm, e.g. "0.5,0.5,native"
    cordseg_normalisation        a scheme of cordseg.normalization
    cordseg_threshold            probability threshold, between 0 and 1
  optional:
    cordseg_contrast_thresholds  thresholds of their own for some of the contrasts served, e.g. "dwi:0.2"
    cordseg_normalisation_params the scheme's constants, comma-separated
    cordseg_size_multiple        spatial sizes the network accepts are multiples of this (default 1)
    cordseg_min_lesion_contrast  lesion models: least lesion/cord intensity ratio reported (default 0: none)
    cordseg_lesion_contrast      lesion models: what min_lesion_contrast is measured against: "slice" (the
                                 lesion-free cord on the lesion's slices; default) or "local" (the same places
                                 of the cord on the slices above and below; "slice" where there are none) or
                                 "adaptive" (the local contrast against the brightest place of the lesion's own
                                 shape elsewhere on the scan's cord; min_lesion_contrast where too few places)
    cordseg_lesion_contrast_floor lesion models, "adaptive": the least local contrast kept (default 1.05)
    cordseg_lesion_grow_to       lesion models: lesions grown from the threshold down to this probability
                                 (hysteresis; default 0: none)
    cordseg_lesion_edge          lesion models: after screening, each lesion grown by one voxel where the map
                                 gives at least LOW and the voxel's own local contrast is at least SHARE of the
                                 lesion's: "SHARE:LOW", e.g. "0.5:0.1" (default: none)
    cordseg_lesion_fill          lesion models: lesions grown inside the cord to this share of their own
                                 contrast (0.5: the half-maximum edge; default 0: none)
    cordseg_warning              a caveat shown to users
    cordseg_second_look_mm       centerline models: window of the second CNN1 pass (default 56; 0: none)
    cordseg_centerline_slice_mm  centerline models: CNN1 sees slices no thinner than this (default 2)
    cordseg_first_pass_mm        centerline models: CNN1's first pass, which only places the second look's
                                 windows, sees slices this far apart (default 8; 0: every slice)
    cordseg_channels             CNN2 input channels, comma-separated, "image" first (default "image"; see
                                 cordseg.normalization.CHANNELS); more than one needs the NXYZC layout
  and free text the runtime only shows: cordseg_version, cordseg_training, cordseg_steps, cordseg_source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ModelError

TASKS = ("centerline", "sc", "lesion", "conus")
CONTRASTS = ("t1", "t2", "t2s", "dwi")
LESION_CONTRASTS = ("slice", "local", "adaptive")  # what a lesion's brightness is compared with (cordseg.lesions)
LAYOUTS = {"NHWC": 2, "NCHW": 2, "NXYZC": 3, "NCXYZ": 3}  # layout -> spatial dimensions
PREFIX = "cordseg_"
REQUIRED_KEYS = ("cordseg_task", "cordseg_contrast", "cordseg_layout", "cordseg_patch_shape",
                 "cordseg_voxel_size", "cordseg_normalisation", "cordseg_threshold")
# Per-model settings of CNN1's two passes (see cordseg.centerline); files without the keys get these.
SECOND_LOOK_MM = 56.0
CENTERLINE_SLICE_MM = 2.0
FIRST_PASS_MM = 8.0
LESION_CONTRAST_FLOOR = 1.05  # "adaptive" lesion screening: the least local contrast kept, however clean the scan


def _g(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class ModelContract:
    """A model's contract, parsed. `info`: the free-text keys (version, training, steps, source), without
    their prefix."""

    task: str
    contrasts: tuple
    layout: str
    patch_shape: tuple | None  # None: whole slices
    voxel_size: tuple  # mm per axis, None where the input's own spacing is kept ("native")
    normalisation: str
    threshold: float
    normalisation_params: str | None = None
    size_multiple: int = 1
    min_lesion_contrast: float = 0.0
    lesion_contrast: str = "slice"
    lesion_contrast_floor: float = LESION_CONTRAST_FLOOR
    lesion_grow_to: float = 0.0
    lesion_fill: float = 0.0
    lesion_edge: tuple = ()  # (share, low) for cordseg.lesions.grow_to_local_edge; () none
    warning: str | None = None
    second_look_mm: float = SECOND_LOOK_MM
    centerline_slice_mm: float = CENTERLINE_SLICE_MM
    first_pass_mm: float = FIRST_PASS_MM
    channels: tuple = ("image",)
    contrast_thresholds: tuple = ()  # ((contrast, threshold), ...) overriding `threshold` for those contrasts
    info: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        try:
            _check(self)
        except _Invalid as exc:
            attr = "contrasts" if exc.key == "contrast" else exc.key
            raise ModelError(f"metadata {PREFIX}{exc.key} = {getattr(self, attr)!r} is not valid "
                             f"({_EXPECTED[exc.key]})") from None

    # --- reading ---
    @classmethod
    def from_metadata(cls, meta: dict, name: str = "model") -> "ModelContract":
        """The contract in `meta` (metadata_props of the file `name`), or ModelError naming the bad key."""
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise ModelError(f"{name}: not a cordseg model (metadata lacks {', '.join(missing)}); "
                             "export it with cordseg's training tools or `cordseg import-keras`")
        parsed = {}
        for key, (attr, parse) in _PARSERS.items():
            if key in meta:
                try:
                    parsed[attr] = parse(meta[key])
                except (ValueError, TypeError):
                    raise ModelError(f"{name}: metadata {key} = {meta[key]!r} is malformed "
                                     f"({_EXPECTED[key[len(PREFIX):]]})") from None
        known = set(_PARSERS)
        info = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX) and k not in known}
        try:
            return cls(**parsed, info=info)
        except ModelError as exc:
            raise ModelError(f"{name}: {exc}") from None

    # --- writing ---
    def to_metadata(self) -> dict:
        """metadata_props for an ONNX file (strings); optional keys only where they differ from the default."""
        meta = {
            "cordseg_task": self.task,
            "cordseg_contrast": ",".join(self.contrasts),
            "cordseg_layout": self.layout,
            "cordseg_patch_shape": "slice" if self.patch_shape is None else "x".join(map(str, self.patch_shape)),
            "cordseg_voxel_size": ",".join("native" if v is None else _g(v) for v in self.voxel_size),
            "cordseg_normalisation": self.normalisation,
            "cordseg_threshold": _g(self.threshold),
        }
        if self.normalisation_params is not None:
            meta["cordseg_normalisation_params"] = self.normalisation_params
        if self.size_multiple != 1:
            meta["cordseg_size_multiple"] = str(self.size_multiple)
        if self.min_lesion_contrast:
            meta["cordseg_min_lesion_contrast"] = _g(self.min_lesion_contrast)
        if self.lesion_contrast != "slice":
            meta["cordseg_lesion_contrast"] = self.lesion_contrast
        if self.lesion_contrast_floor != LESION_CONTRAST_FLOOR:
            meta["cordseg_lesion_contrast_floor"] = _g(self.lesion_contrast_floor)
        if self.lesion_grow_to:
            meta["cordseg_lesion_grow_to"] = _g(self.lesion_grow_to)
        if self.lesion_fill:
            meta["cordseg_lesion_fill"] = _g(self.lesion_fill)
        if self.lesion_edge:
            meta["cordseg_lesion_edge"] = ":".join(_g(v) for v in self.lesion_edge)
        if self.warning:
            meta["cordseg_warning"] = self.warning
        if self.second_look_mm != SECOND_LOOK_MM:
            meta["cordseg_second_look_mm"] = _g(self.second_look_mm)
        if self.centerline_slice_mm != CENTERLINE_SLICE_MM:
            meta["cordseg_centerline_slice_mm"] = _g(self.centerline_slice_mm)
        if self.first_pass_mm != FIRST_PASS_MM:
            meta["cordseg_first_pass_mm"] = _g(self.first_pass_mm)
        if tuple(self.channels) != ("image",):
            meta["cordseg_channels"] = ",".join(self.channels)
        if self.contrast_thresholds:
            meta["cordseg_contrast_thresholds"] = ",".join(f"{c}:{_g(t)}" for c, t in self.contrast_thresholds)
        meta.update({PREFIX + k: str(v) for k, v in self.info.items()})
        return meta


class _Invalid(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key  # the metadata key, without its prefix


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(c: ModelContract):
    from .normalization import CHANNELS, PARAMETRISED, SCHEMES

    if c.task not in TASKS:
        raise _Invalid("task")
    if not c.contrasts or any(x not in CONTRASTS for x in c.contrasts):
        raise _Invalid("contrast")
    if c.layout not in LAYOUTS:
        raise _Invalid("layout")
    if c.patch_shape is not None and (len(c.patch_shape) not in (2, 3) or
                                      any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                          for s in c.patch_shape)):
        raise _Invalid("patch_shape")
    if c.patch_shape is not None and len(c.patch_shape) != LAYOUTS[c.layout]:
        raise _Invalid("patch_shape")
    if len(c.voxel_size) != 3 or any(v is not None and not (_finite(v) and v > 0) for v in c.voxel_size):
        raise _Invalid("voxel_size")
    if c.normalisation not in SCHEMES:
        raise _Invalid("normalisation")
    if c.normalisation in PARAMETRISED and c.normalisation_params is None:
        raise _Invalid("normalisation_params")
    if c.normalisation_params is not None:
        try:
            values = [float(p) for p in c.normalisation_params.split(",") if p.strip()]
        except ValueError:
            raise _Invalid("normalisation_params") from None
        if not values or not all(math.isfinite(v) for v in values):
            raise _Invalid("normalisation_params")
    if not (_finite(c.threshold) and 0.0 < c.threshold < 1.0):
        raise _Invalid("threshold")
    named = [x for x, _ in c.contrast_thresholds]
    if (len(set(named)) != len(named) or any(x not in c.contrasts for x in named)
            or not all(_finite(t) and 0.0 < t < 1.0 for _, t in c.contrast_thresholds)):
        raise _Invalid("contrast_thresholds")
    if isinstance(c.size_multiple, bool) or not isinstance(c.size_multiple, int) or c.size_multiple < 1:
        raise _Invalid("size_multiple")
    for attr in ("min_lesion_contrast", "lesion_contrast_floor", "second_look_mm", "centerline_slice_mm",
                 "first_pass_mm"):
        v = getattr(c, attr)
        if not (_finite(v) and v >= 0):
            raise _Invalid(attr)
    if c.lesion_contrast not in LESION_CONTRASTS:
        raise _Invalid("lesion_contrast")
    if not (_finite(c.lesion_grow_to) and 0.0 <= c.lesion_grow_to < max(c.threshold, 1e-9)):
        raise _Invalid("lesion_grow_to")
    if not (_finite(c.lesion_fill) and 0.0 <= c.lesion_fill < 1.0):
        raise _Invalid("lesion_fill")
    if c.lesion_edge and not (len(c.lesion_edge) == 2 and all(_finite(v) and 0 < v < 1 for v in c.lesion_edge)):
        raise _Invalid("lesion_edge")
    if (not c.channels or c.channels[0] != "image" or any(x not in CHANNELS for x in c.channels)
            or len(set(c.channels)) != len(c.channels) or (len(c.channels) > 1 and c.layout != "NXYZC")):
        raise _Invalid("channels")


def _contrasts(text: str) -> tuple:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _contrast_thresholds(text: str) -> tuple:
    pairs = [p.split(":") for p in text.split(",") if p.strip()]
    return tuple((c.strip(), float(t)) for c, t in pairs)


def _share_and_low(text: str) -> tuple:
    return tuple(float(v) for v in text.split(":")) if text.strip() else ()


def _patch_shape(text: str):
    return None if text == "slice" else tuple(int(v) for v in text.split("x"))


def _voxel_size(text: str) -> tuple:
    return tuple(None if t.strip() == "native" else float(t) for t in text.split(","))


# metadata key -> (attribute, parser); parsers raise ValueError on malformed text
_PARSERS = {
    "cordseg_task": ("task", str),
    "cordseg_contrast": ("contrasts", _contrasts),
    "cordseg_layout": ("layout", str),
    "cordseg_patch_shape": ("patch_shape", _patch_shape),
    "cordseg_voxel_size": ("voxel_size", _voxel_size),
    "cordseg_normalisation": ("normalisation", str),
    "cordseg_threshold": ("threshold", float),
    "cordseg_normalisation_params": ("normalisation_params", lambda t: t or None),
    "cordseg_size_multiple": ("size_multiple", int),
    "cordseg_min_lesion_contrast": ("min_lesion_contrast", float),
    "cordseg_lesion_contrast": ("lesion_contrast", str),
    "cordseg_lesion_contrast_floor": ("lesion_contrast_floor", float),
    "cordseg_lesion_grow_to": ("lesion_grow_to", float),
    "cordseg_lesion_fill": ("lesion_fill", float),
    "cordseg_lesion_edge": ("lesion_edge", _share_and_low),
    "cordseg_warning": ("warning", lambda t: t or None),
    "cordseg_second_look_mm": ("second_look_mm", float),
    "cordseg_centerline_slice_mm": ("centerline_slice_mm", float),
    "cordseg_first_pass_mm": ("first_pass_mm", float),
    "cordseg_channels": ("channels", _contrasts),
    "cordseg_contrast_thresholds": ("contrast_thresholds", _contrast_thresholds),
}
_EXPECTED = {
    "task": f"one of {', '.join(TASKS)}",
    "contrast": f"comma-separated, from {', '.join(CONTRASTS)}",
    "layout": f"one of {', '.join(LAYOUTS)}",
    "patch_shape": "'slice' or positive whole numbers joined by 'x', as many as the layout's spatial axes",
    "voxel_size": "three sizes in mm or 'native', comma-separated",
    "normalisation": "a scheme of cordseg.normalization",
    "threshold": "a number between 0 and 1",
    "normalisation_params": "finite numbers, comma-separated; required by published_* schemes",
    "size_multiple": "a whole number >= 1",
    "min_lesion_contrast": "a number >= 0",
    "lesion_contrast": "slice, local or adaptive",
    "lesion_contrast_floor": "a number >= 0",
    "lesion_grow_to": "a number >= 0 and below the threshold",
    "lesion_fill": "a number >= 0 and below 1",
    "lesion_edge": "SHARE:LOW, two numbers between 0 and 1",
    "warning": "text",
    "second_look_mm": "a number >= 0 (0: no second look)",
    "centerline_slice_mm": "a number >= 0",
    "first_pass_mm": "a number >= 0 (0: every slice)",
    "channels": "'image', then other channels of cordseg.normalization.CHANNELS, comma-separated; more than "
                "one only with the NXYZC layout",
    "contrast_thresholds": "contrast:threshold pairs, comma-separated, each contrast one the model serves and "
                           "named once, each threshold between 0 and 1",
}

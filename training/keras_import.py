"""`cordseg import-keras FILE.h5`: bring a Keras 2 model file (e.g. the published models) into cordseg.

The network is rebuilt in Keras 3 from the file's own JSON `model_config`, and its weights are loaded
layer by layer from `model_weights/<layer>` in `weight_names` order. Rebuilding (rather than
`keras.models.load_model`) is needed because:
- the published CNN1 files hold a `Lambda` whose Python-2 bytecode cannot be loaded; it computes
  z / temperature with the temperature stored in its closure (1.0), so it becomes a Rescaling (identity);
- channels-first 3D networks do not convert to ONNX (../shared/FACTS.md), so they are rebuilt
  channels-last. Keras stores convolution kernels in the same layout for both data formats, so the
  weights load unchanged; only the input, the batch-norm axis and the concatenation axis move.
  The ONNX interface is then NXYZC, the runtime's own layout for 3D models.
2D networks that are fully convolutional get dynamic height and width ("slice" models) when ONNX
Runtime agrees with Keras at the file's own input size and on whole slices.

The runtime metadata describes the published preprocessing (see cordseg/normalization.py):
CNN1: 0.5 mm in-plane, native slice thickness, `published_ctr` (2-98th percentile to 0-255, then the
per-contrast mean/std), heatmap threshold 0.5. CNN2-lesion: 48x48x48 at 0.5 mm isotropic,
`published_lesion` (histogram standardisation to the per-contrast landmarks, then mean/std),
threshold 0.1. Cord models (none were published): 0.5 mm, the per-contrast thresholds of the tool.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cordseg.contract import CONTRASTS
from cordseg.errors import CordsegError, ModelError

# The published tool's constants, by the contrast key it used (the model file's name prefix).
CTR_MEAN_STD = {"t2": (51.1417, 57.4408), "t2s": (68.8591, 71.4659), "t1": (55.7359, 64.3149),
                "dwi": (55.744, 45.003)}
LESION_LANDMARKS = {
    "t2": (0.0, 136.832187, 312.158435, 448.968030, 568.657779, 696.671586, 859.221138, 1074.463414,
           1373.289174, 1811.522669, 2611.0),
    "t2_ax": (0.0, 112.195357, 291.611185, 446.727066, 581.103970, 702.979079, 833.318257, 1011.856313,
              1268.801813, 1687.137075, 2611.0),
    "t2s": (0.0, 123.246969, 226.422561, 338.361023, 532.341924, 788.693675, 1096.975553, 1407.979466,
            1716.524530, 2079.788451, 2611.0),
}
LESION_MEAN_STD = {"t2": (871.309, 557.916), "t2_ax": (835.592, 528.386), "t2s": (1011.31, 678.985)}
SC3D_MEAN_STD = {"t2": (65.8562, 59.7999), "t2s": (87.0212, 64.425), "t1": (88.5001, 66.275)}
SC_THRESHOLD = {"t1": 0.15, "t2": 0.7, "t2s": 0.89, "dwi": 0.01}
TASKS = ("centerline", "sc", "lesion")
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# reading the file

@dataclass
class KerasFile:
    name: str
    config: dict  # the functional model's "config" (layers, input_layers, output_layers)
    weights: dict  # layer name -> list of arrays in weight_names order
    keras_version: str


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def read_keras_file(path) -> KerasFile:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Keras model file not found: {path}")
    try:
        with h5py.File(str(path), "r") as f:
            if "model_config" not in f.attrs:
                raise ModelError(f"{path.name} has no model_config: a weights-only file cannot be rebuilt")
            cfg = json.loads(_text(f.attrs["model_config"]))
            root = f["model_weights"] if "model_weights" in f else f
            weights = {}
            for lname in root.attrs.get("layer_names", []):
                lname = _text(lname)
                group = root[lname]
                weights[lname] = [np.asarray(group[_text(w)]) for w in group.attrs.get("weight_names", [])]
            version = _text(f.attrs.get("keras_version", "unknown"))
    except ModelError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot read {path.name} as a Keras HDF5 model: {exc}") from exc
    if cfg.get("class_name") not in ("Model", "Functional", "Sequential"):
        raise ModelError(f"{path.name}: unsupported model class {cfg.get('class_name')!r}")
    config = cfg["config"]
    if cfg["class_name"] == "Sequential":
        config = _sequential_as_functional(config)
    return KerasFile(path.name, config, weights, version)


def _sequential_as_functional(config):
    layers = config["layers"] if isinstance(config, dict) else config
    out, prev = [], None
    first = layers[0]["config"]
    if "batch_input_shape" not in first:
        raise ModelError("Sequential model without an input shape")
    out.append({"class_name": "InputLayer", "name": "input_1",
                "config": {"batch_input_shape": first["batch_input_shape"], "name": "input_1"}, "inbound_nodes": []})
    prev = "input_1"
    for layer in layers:
        name = layer["config"]["name"]
        out.append({"class_name": layer["class_name"], "name": name, "config": layer["config"],
                    "inbound_nodes": [[[prev, 0, 0, {}]]]})
        prev = name
    return {"layers": out, "input_layers": [["input_1", 0, 0]], "output_layers": [[prev, 0, 0]]}


# ----------------------------------------------------------------------------------------------------
# rebuilding the network

def _channels_first(config) -> bool:
    formats = {l["config"].get("data_format") for l in config["layers"]} - {None}
    if len(formats) > 1:
        raise ModelError("model mixes channels_first and channels_last layers")
    return formats == {"channels_first"}


def _lambda_temperature(cfg) -> float:
    """The published Lambda is `z / temperature` with temperature in the closure; return it."""
    fn = cfg.get("function")
    closure = fn[2] if isinstance(fn, (list, tuple)) and len(fn) == 3 else None
    code = fn[0] if isinstance(fn, (list, tuple)) and fn else ""
    if cfg.get("function_type") != "lambda" or not closure or len(closure) != 1 or "temperature" not in str(code):
        raise ModelError("unsupported Lambda layer (only the published `z / temperature` one can be rebuilt)")
    t = float(closure[0])
    if not np.isfinite(t) or t == 0:
        raise ModelError(f"Lambda temperature {t} is not usable")
    return t


def _make_layer(cls: str, cfg: dict, cf: bool, ndim: int):
    """Keras 3 layer for a Keras 2 layer config; channels-first models are made channels-last."""
    from keras import layers

    name = cfg["name"]
    spatial = ndim - 2

    def axis(a):
        # channels axis: 1 in channels-first files, -1 (or ndim-1) in channels-last ones
        if cf:
            if a == 1:
                return -1
            raise ModelError(f"layer {name}: axis {a} of a channels-first model is not the channel axis")
        if a in (-1, ndim - 1):
            return -1
        raise ModelError(f"layer {name}: axis {a} is not the channel axis")

    conv_common = dict(name=name, padding=cfg.get("padding", "valid"), activation=cfg.get("activation", "linear"),
                       use_bias=cfg.get("use_bias", True), data_format="channels_last")
    if cls in ("Conv2D", "Conv3D"):
        ctor = layers.Conv2D if cls == "Conv2D" else layers.Conv3D
        return ctor(cfg["filters"], tuple(cfg["kernel_size"]), strides=tuple(cfg.get("strides", (1,) * spatial)),
                    dilation_rate=tuple(cfg.get("dilation_rate", (1,) * spatial)), **conv_common)
    if cls in ("Conv2DTranspose", "Conv3DTranspose"):
        if cfg.get("output_padding") not in (None, [None] * spatial):
            raise ModelError(f"layer {name}: output_padding is not supported")
        ctor = layers.Conv2DTranspose if cls == "Conv2DTranspose" else layers.Conv3DTranspose
        return ctor(cfg["filters"], tuple(cfg["kernel_size"]), strides=tuple(cfg.get("strides", (1,) * spatial)),
                    dilation_rate=tuple(cfg.get("dilation_rate", (1,) * spatial)), **conv_common)
    if cls == "BatchNormalization":
        return layers.BatchNormalization(axis=axis(cfg.get("axis", -1)), epsilon=cfg.get("epsilon", 1e-3),
                                         momentum=cfg.get("momentum", 0.99), center=cfg.get("center", True),
                                         scale=cfg.get("scale", True), name=name)
    if cls == "Activation":
        return layers.Activation(cfg["activation"], name=name)
    if cls in ("Dropout", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise"):
        return layers.Identity(name=name)  # inactive at inference
    if cls in ("MaxPooling2D", "MaxPooling3D", "AveragePooling2D", "AveragePooling3D"):
        ctor = getattr(layers, cls)
        return ctor(pool_size=tuple(cfg["pool_size"]), strides=tuple(cfg.get("strides") or cfg["pool_size"]),
                    padding=cfg.get("padding", "valid"), data_format="channels_last", name=name)
    if cls in ("UpSampling2D", "UpSampling3D"):
        if cfg.get("interpolation", "nearest") != "nearest":
            raise ModelError(f"layer {name}: only nearest up-sampling is supported")
        ctor = getattr(layers, cls)
        return ctor(size=tuple(cfg["size"]), data_format="channels_last", name=name)
    if cls == "Concatenate":
        return layers.Concatenate(axis=axis(cfg.get("axis", -1)), name=name)
    if cls in ("Add", "Multiply", "Average", "Maximum"):
        return getattr(layers, cls)(name=name)
    if cls == "Lambda":
        t = _lambda_temperature(cfg)
        return layers.Identity(name=name) if t == 1.0 else layers.Rescaling(1.0 / t, name=name)
    raise ModelError(f"layer {name}: Keras layer class {cls} is not supported by import-keras")


@dataclass
class Rebuilt:
    model: object  # keras.Model, channels-last
    channels_first_file: bool
    file_input_shape: tuple  # the file's input shape without the batch axis, as stored
    ndim: int  # 4 (2D) or 5 (3D)
    dynamic: bool  # spatial sides dynamic


def rebuild(kf: KerasFile, *, dynamic_2d: bool = True) -> Rebuilt:
    """Keras 3 model from the file's config (channels-last), with the file's weights loaded."""
    import keras

    config = kf.config
    cf = _channels_first(config)
    by_name = {l["name"]: l for l in config["layers"]}
    if len(config["input_layers"]) != 1 or len(config["output_layers"]) != 1:
        raise ModelError("only single-input, single-output models are supported")
    in_name, out_name = config["input_layers"][0][0], config["output_layers"][0][0]
    shape = by_name[in_name]["config"].get("batch_input_shape")
    if not shape or len(shape) not in (4, 5):
        raise ModelError(f"input shape {shape} is neither 2D (N,H,W,C) nor 3D (N,X,Y,Z,C)")
    ndim = len(shape)
    file_shape = tuple(shape[1:])
    inner = (tuple(shape[2:]) + (shape[1],)) if cf else tuple(shape[1:])
    dynamic = dynamic_2d and ndim == 4
    if dynamic:
        inner = (None, None, inner[-1])
    tensors = {in_name: keras.Input(inner, name="image")}
    made = {}
    pending = [l for l in config["layers"] if l["name"] != in_name]
    while pending:
        progressed = False
        for layer in list(pending):
            nodes = layer.get("inbound_nodes") or []
            if len(nodes) != 1:
                raise ModelError(f"layer {layer['name']}: shared or unconnected layers are not supported")
            sources = [n[0] for n in nodes[0]]
            if not all(s in tensors for s in sources):
                continue
            lay = _make_layer(layer["class_name"], layer["config"], cf, ndim)
            args = [tensors[s] for s in sources]
            tensors[layer["name"]] = lay(args if len(args) > 1 or layer["class_name"] in
                                         ("Concatenate", "Add", "Multiply", "Average", "Maximum") else args[0])
            made[layer["name"]] = lay
            pending.remove(layer)
            progressed = True
        if not progressed:
            raise ModelError("model graph has layers whose inputs never appear")
    model = keras.Model(tensors[in_name], tensors[out_name], name=Path(kf.name).stem)
    _load_weights(made, kf.weights)
    return Rebuilt(model, cf, file_shape, ndim, dynamic)


def _load_weights(made: dict, weights: dict) -> None:
    for lname, arrays in weights.items():
        if not arrays:
            continue
        if lname not in made:
            raise ModelError(f"weights for layer {lname}, which the model config does not have")
        layer = made[lname]
        want = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if want != got:
            raise ModelError(f"layer {lname}: file weights {got} do not fit the rebuilt layer {want}")
        layer.set_weights(arrays)
    for lname, layer in made.items():
        if layer.weights and not weights.get(lname):
            raise ModelError(f"layer {lname} has no weights in the file")


def to_file_layout(x: np.ndarray, rebuilt: Rebuilt) -> np.ndarray:
    """Channels-last batch -> the file's own layout (for running the original model)."""
    if rebuilt.channels_first_file:
        return np.moveaxis(x, -1, 1)
    return x


def from_file_layout(y: np.ndarray, rebuilt: Rebuilt) -> np.ndarray:
    if rebuilt.channels_first_file:
        return np.moveaxis(y, 1, -1)
    return y


def _load_reference(path, config):
    """`keras.models.load_model` on the file; where its only obstacle is an identity Lambda, on a
    temporary copy whose Lambda is a linear Activation (Keras' own legacy loader then rebuilds the
    network independently of `rebuild`). Returns (model or None, note)."""
    import keras

    try:
        return keras.models.load_model(str(path), compile=False), "keras load_model"
    except Exception as exc:  # the CNN1 files' Python-2 Lambda ends here
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    lambdas = [l for l in config["layers"] if l["class_name"] == "Lambda"]
    try:
        if not lambdas or any(_lambda_temperature(l["config"]) != 1.0 for l in lambdas):
            return None, f"load_model failed ({first})"
    except ModelError:
        return None, f"load_model failed ({first})"
    import shutil
    import tempfile

    import h5py

    with tempfile.TemporaryDirectory(prefix="cordseg_import_") as tmp:
        copy = Path(tmp) / Path(path).name
        shutil.copyfile(path, copy)
        with h5py.File(str(copy), "r+") as f:
            cfg = json.loads(_text(f.attrs["model_config"]))
            for layer in cfg["config"]["layers"]:
                if layer["class_name"] == "Lambda":
                    layer["class_name"] = "Activation"
                    layer["config"] = {"name": layer["config"]["name"], "activation": "linear", "trainable": True}
            f.attrs["model_config"] = json.dumps(cfg)
        try:
            model = keras.models.load_model(str(copy), compile=False)
        except Exception as exc:
            return None, f"load_model failed ({first}; also with the Lambda replaced: {type(exc).__name__})"
    return model, "keras load_model with the identity Lambda replaced by a linear Activation"


def reference_parity(path, rebuilt: Rebuilt, x: np.ndarray, config=None) -> tuple[float | None, str]:
    """Max abs difference between the rebuilt model and Keras' own loader (None where that fails)."""
    ref, note = _load_reference(path, config if config is not None else read_keras_file(path).config)
    if ref is None:
        return None, note
    if rebuilt.channels_first_file:
        # Keras compiles each channels-first Conv3D with XLA on every eager call on CPU; one compiled
        # function for the whole network is faster
        import tensorflow as tf

        run = tf.function(lambda a: ref([a], training=False), jit_compile=True)
    else:
        def run(a):
            return ref([a], training=False)
    want = from_file_layout(np.asarray(run(to_file_layout(x, rebuilt))), rebuilt)
    got = np.asarray(rebuilt.model(x, training=False))
    return float(np.max(np.abs(want.astype(np.float64) - got))), note


# ----------------------------------------------------------------------------------------------------
# preprocessing metadata and check inputs

def published_key(h5_name: str, contrast: str, task: str) -> str:
    """The published tool's constants key: from the file name when it says (t2_ax_lesion -> t2_ax)."""
    stem = Path(h5_name).name.split(".")[0].lower()
    for suffix in ("_lesion", "_ctr", "_sc_3d", "_sc"):
        if stem.endswith(suffix):
            key = stem[: -len(suffix)]
            table = LESION_LANDMARKS if task == "lesion" else CTR_MEAN_STD
            if key in table:
                return key
    return contrast.split(",")[0].strip()


def runtime_metadata(task: str, contrast: str, rebuilt: Rebuilt, source_name: str, keras_version: str,
                     version: str | None = None) -> dict:
    from cordseg import __version__
    from cordseg.contract import ModelContract

    key = published_key(source_name, contrast, task)
    spatial = (rebuilt.file_input_shape[1:] if rebuilt.channels_first_file else rebuilt.file_input_shape[:-1])
    if rebuilt.ndim == 4:
        layout, voxel = "NHWC", (0.5, 0.5, None)
        patch = None if rebuilt.dynamic else tuple(int(s) for s in spatial)
    else:
        layout, voxel, patch = "NXYZC", (0.5, 0.5, 0.5), tuple(int(s) for s in spatial)
    if task == "centerline":
        if key not in CTR_MEAN_STD:
            raise ModelError(f"no published CNN1 preprocessing for contrast '{key}' (known: {', '.join(CTR_MEAN_STD)})")
        mean, std = CTR_MEAN_STD[key]
        norm, params, threshold = "published_ctr", f"{mean:g},{std:g}", 0.5
    elif task == "lesion":
        if key not in LESION_LANDMARKS:
            raise ModelError(f"no published lesion preprocessing for '{key}' (known: {', '.join(LESION_LANDMARKS)})")
        mean, std = LESION_MEAN_STD[key]
        values = list(LESION_LANDMARKS[key]) + [mean, std]
        norm, threshold = "published_lesion", 0.1
        params = ",".join(f"{p:.6f}".rstrip("0").rstrip(".") for p in values)
    else:  # sc: the 2D tool scaled to 0..255 only; the 3D one also z-scored
        if rebuilt.ndim == 5 and key not in SC3D_MEAN_STD:
            raise ModelError(f"no published 3D cord preprocessing for '{key}' (known: {', '.join(SC3D_MEAN_STD)})")
        mean, std = SC3D_MEAN_STD[key] if rebuilt.ndim == 5 else (0.0, 1.0)
        norm, params, threshold = "published_ctr", f"{mean:g},{std:g}", SC_THRESHOLD.get(key, 0.5)
    training = (f"published model (Gros et al. 2019, Spinal Cord Toolbox), Keras {keras_version} "
                f"file {source_name}, rebuilt channels-last and converted with tf2onnx")
    return ModelContract(
        task=task, contrasts=tuple(c.strip() for c in contrast.split(",") if c.strip()), layout=layout,
        patch_shape=patch, voxel_size=voxel, normalisation=norm, threshold=float(threshold),
        normalisation_params=params, size_multiple=4,
        info={"version": version or __version__, "steps": "unknown", "source": f"imported from {source_name}",
              "training": training},
    ).to_metadata()


def _real_t2(voxel):
    """sct_testing t2 in working space at `voxel` mm (None = native), with its cord mask, or None."""
    from .export import _real_volume, shared_data_dir
    from cordseg.resampling import resample

    data_dir = shared_data_dir()
    real = _real_volume(data_dir) if data_dir is not None else None
    if real is None:
        return None
    vol, zooms, seg = real
    new = tuple(z if v is None else v for z, v in zip(zooms, voxel))
    vol = resample(vol, zooms, new, order=1)
    seg = resample(seg.astype(np.float32), zooms, new, order=1) > 0.5 if seg is not None else None
    return vol, seg


def check_batches(rebuilt: Rebuilt, meta: dict, *, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Channels-last batches to compare outputs on: published-normalised real data when available.

    2D: slices at the file's input size and, for dynamic models, whole slices too. 3D: patches
    around the cord.
    """
    from cordseg.normalization import normalize_with
    from .export import _take

    rng = np.random.default_rng(seed)
    spatial = (rebuilt.file_input_shape[1:] if rebuilt.channels_first_file else rebuilt.file_input_shape[:-1])
    spatial = tuple(int(s) if s else 80 for s in spatial)
    name, params = meta["cordseg_normalisation"], meta.get("cordseg_normalisation_params")
    if rebuilt.ndim == 4:
        real = _real_t2((0.5, 0.5, None))
        if real is None:
            batches = [rng.normal(0, 1, (n,) + spatial + (1,))]
            if rebuilt.dynamic:
                batches.append(rng.normal(0, 1, (2, spatial[0] + 24, spatial[1] + 8, 1)))
            return [b.astype(np.float32) for b in batches]
        vol, seg = real
        norm = normalize_with(name, vol, params)
        zs = np.linspace(0, norm.shape[2] - 1, n).round().astype(int)
        centre = np.array(np.nonzero(seg)).mean(axis=1) if seg is not None and seg.any() else np.array(vol.shape) / 2
        crops = [_take(norm[:, :, z], centre[:2] + rng.normal(0, 4, 2), spatial) for z in zs]
        batches = [np.stack(crops)[..., None]]
        if rebuilt.dynamic:
            h, w = (norm.shape[0] // 4) * 4, (norm.shape[1] // 4) * 4
            batches.append(np.stack([norm[:h, :w, z] for z in zs[:2]])[..., None])
        return [b.astype(np.float32) for b in batches]
    real = _real_t2((0.5, 0.5, 0.5))
    if real is None:
        return [rng.normal(0, 1, (1,) + spatial + (1,)).astype(np.float32)]
    vol, seg = real
    centre = np.array(np.nonzero(seg)).mean(axis=1) if seg is not None and seg.any() else np.array(vol.shape) / 2
    # one real 48^3 patch gives >100k outputs to compare; more mostly costs time (3D runs are slow on CPU)
    patches = _take(vol, centre, spatial)[None]
    return [normalize_with(name, patches, params)[..., None].astype(np.float32)]


# ----------------------------------------------------------------------------------------------------
# the import

@dataclass
class ImportResult:
    path: Path
    onnx_diff: float  # max abs difference ONNX Runtime vs rebuilt Keras, over all check batches
    reference_diff: float | None  # rebuilt Keras vs keras.models.load_model (None: does not load)
    reference_note: str
    metadata: dict = field(default_factory=dict)
    parameters: int = 0
    refusals: tuple = ()  # why earlier dynamic-size attempts were refused (empty when the first one passed)


def import_keras(h5_path, out_path, *, task: str, contrast: str, atol: float = ATOL, dynamic_2d: bool = True,
                 opset: int = 17) -> ImportResult:
    """Rebuild a Keras 2 model file, verify it, convert it to ONNX with cordseg's metadata.

    Raises ModelError (writing nothing) when the file cannot be rebuilt, when the rebuilt network
    disagrees with `load_model` where that loads, or when ONNX and Keras differ by more than `atol`.
    A CNN1 (task centerline) is first tried with dynamic height and width ("slice"), twice; if that fails
    parity it is exported at the file's fixed input size. Other 2D models keep their fixed input size.
    """
    from . import export

    if task not in TASKS:
        raise ModelError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    contrasts = [c.strip() for c in contrast.split(",") if c.strip()]
    if not contrasts or any(c not in CONTRASTS for c in contrasts):
        raise ModelError(f"unknown contrast '{contrast}' (choose from {', '.join(CONTRASTS)}, comma-separated)")
    h5_path, out_path = Path(h5_path), Path(out_path)
    kf = read_keras_file(h5_path)
    first_error, refusals = None, []
    # only CNN1 runs on whole slices; 2D cord models ran on fixed crops around the centerline
    # The dynamic attempt is made twice, the second time in a cleared Keras session: in a process that has
    # built and converted other networks before, it was now and then refused although it passes on its own
    # (export_checked also converts afresh within an attempt; a rebuild here gives the layers new names).
    for attempt, dynamic in enumerate([True, True, False] if dynamic_2d and task == "centerline" else [False]):
        if attempt == 1:
            import keras

            keras.backend.clear_session()
        rebuilt = rebuild(kf, dynamic_2d=dynamic)
        if rebuilt.ndim == 4 and task in ("lesion",) or rebuilt.ndim == 5 and task == "centerline":
            raise ModelError(f"{h5_path.name} is a {rebuilt.ndim - 2}D network; task '{task}' needs the other kind")
        meta = runtime_metadata(task, ",".join(contrasts), rebuilt, h5_path.name, kf.keras_version)
        batches = check_batches(rebuilt, meta)
        ref_diff, ref_note = reference_parity(h5_path, rebuilt, batches[0], kf.config)
        if ref_diff is not None and not ref_diff <= atol:
            raise ModelError(f"rebuilt network differs from keras load_model by {ref_diff:.3g} (allowed {atol:g})")
        try:  # every batch, all input sizes (export_checked also converts afresh when tf2onnx errs)
            path, diff = export.export_checked(rebuilt.model, out_path, meta, check_inputs=batches, atol=atol,
                                               opset=opset)
        except ModelError as exc:
            if rebuilt.dynamic:  # retry (then with the file's fixed input size)
                first_error = first_error or exc
                refusals.append(str(exc))
                continue
            if first_error is not None:
                raise ModelError(f"{exc} (dynamic-size attempt: {first_error})") from exc
            raise
        return ImportResult(path, diff, ref_diff, ref_note, meta, int(rebuilt.model.count_params()),
                            tuple(refusals))
    raise first_error  # pragma: no cover - the loop always returns or raises


# ----------------------------------------------------------------------------------------------------
# command line (registered as `cordseg import-keras`)

def _missing_train_extra() -> str | None:
    try:
        import tensorflow  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        return f"import-keras needs TensorFlow and tf2onnx ({exc.name or exc} is missing): install cordseg[train]"
    return None


def _build_click_command():
    import click

    @click.command("import-keras")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--task", required=True, type=click.Choice(TASKS), help="what the network predicts")
    @click.option("--contrast", required=True, help="contrast(s) it serves: t1, t2, t2s, dwi (comma-separated)")
    @click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write")
    def import_keras_cmd(file, task, contrast, output):
        """Convert a Keras 2 model file (e.g. a published model) into a cordseg ONNX model."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
        problem = _missing_train_extra()
        if problem:
            click.echo(f"error: {problem}", err=True)
            raise SystemExit(2)
        try:
            res = import_keras(file, output, task=task, contrast=contrast)
        except CordsegError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(2)
        ref = (f"{res.reference_diff:.1e} vs {res.reference_note}" if res.reference_diff is not None
               else f"no Keras reference ({res.reference_note})")
        click.echo(f"wrote {res.path}: {res.metadata['cordseg_task']} {res.metadata['cordseg_layout']} "
                   f"{res.metadata['cordseg_patch_shape']}, {res.parameters} parameters; max abs difference "
                   f"ONNX vs Keras {res.onnx_diff:.1e}, {ref}")
        for why in res.refusals:
            click.echo(f"note: a dynamic-size attempt was refused: {why}", err=True)

    return import_keras_cmd


try:
    import_keras_cmd = _build_click_command()
except ImportError:  # click is a runtime dependency; this only guards odd environments
    import_keras_cmd = None


def main_import_keras(argv=None) -> int:
    """Entry point without the cordseg group: `python -m training.keras_import FILE --task ... -o OUT`."""
    try:
        import_keras_cmd.main(args=argv, prog_name="cordseg import-keras", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main_import_keras())

"""Export a trained Keras network to ONNX with the metadata the runtime reads, refusing unfaithful exports.

The conversion goes through tf2onnx. An export is accepted only when ONNX Runtime, run on the written
graph, reproduces the Keras outputs on `check_inputs` within `atol`: tf2onnx can return without an
error while producing an invalid or wrong graph (see ../shared/FACTS.md), so the check is the gate.
The file is written atomically (temporary file in the target folder, then os.replace) and only after
the check, so a refused export leaves nothing behind.

CLI: python -m cordseg.training.export TASK WEIGHTS [WEIGHTS ...] OUT.onnx --contrast t1,t2 --summary "..." [--steps N]
(several snapshots of one run are averaged first: training.loop.average_snapshots)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cordseg.errors import ModelError, OutputError
from cordseg.io import write_bytes_atomic

from .loop import average_snapshots, snapshot_step
from .onnx_graph import simplify_upsampling


def _input_signature(model):
    """Batch always dynamic; spatial sides as the Keras model declares them (None stays dynamic)."""
    import tensorflow as tf

    shape = (None,) + tuple(model.inputs[0].shape[1:])
    name = getattr(model.inputs[0], "name", None) or "image"
    return (tf.TensorSpec(shape, tf.float32, name=name.split(":")[0]),)


CONVERSION_ATTEMPTS = 3


def convert(model, *, opset: int = 17):
    """Keras 3 (TensorFlow backend) model -> onnx.ModelProto, in memory.

    We trace the model ourselves and hand tf2onnx the function: `from_keras` picks between a legacy
    tf.keras tracer and tf.function depending on what the process has imported before, and in long
    processes (the test suite) it now and then produced a graph with a wrong input rank.
    """
    import tensorflow as tf
    import tf2onnx

    spec = _input_signature(model)

    @tf.function(input_signature=spec)
    def forward(x):
        return model(x, training=False)

    try:
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds; the caller only needs to know it failed
        raise ModelError(f"tf2onnx could not convert model '{model.name}': {type(exc).__name__}: {exc}") from exc
    simplify_upsampling(proto)  # CNN2's up-sampling as one copy; the parity check that follows covers it
    return proto


def set_metadata(proto, metadata: dict) -> None:
    """Replace metadata_props with `metadata` (values stringified: the contract says all values are strings)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)


def onnx_outputs(proto_or_bytes, inputs: np.ndarray) -> np.ndarray:
    """Run the graph in ONNX Runtime (CPU) on a float32 batch; returns the first output."""
    import onnxruntime as ort

    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.asarray(inputs, np.float32)})[0])


def keras_outputs(model, inputs: np.ndarray) -> np.ndarray:
    out = model(np.asarray(inputs, np.float32), training=False)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out)


def parity(model, proto, check_inputs: np.ndarray) -> float:
    """Max abs difference between Keras (inference mode) and ONNX Runtime on `check_inputs`."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"converted graph is invalid ({type(exc).__name__}: {exc})") from exc
    try:
        got = onnx_outputs(proto, check_inputs)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot run the converted graph: {type(exc).__name__}: {exc}") from exc
    want = keras_outputs(model, check_inputs)
    if got.shape != want.shape:
        raise ModelError(f"ONNX output shape {got.shape} differs from Keras output shape {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    if not np.isfinite(diff):
        raise ModelError("non-finite outputs in the parity check")
    return diff


def write_atomic(data: bytes, path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return write_bytes_atomic(data, path)


def export_onnx(model, path, metadata: dict, *, check_inputs: np.ndarray, opset: int = 17,
                atol: float = 1e-4) -> Path:
    """Convert `model`, check ONNX vs Keras on `check_inputs`, then write `path` with `metadata`.

    Raises ModelError (and writes nothing) when conversion fails or the outputs differ by more than
    `atol`. Returns the path written.
    """
    return export_checked(model, path, metadata, check_inputs=check_inputs, opset=opset, atol=atol)[0]


def convert_checked(model, batches, *, opset: int = 17) -> tuple:
    """convert(), then the parity check on every batch: (proto, [max abs difference per batch]).

    A graph that fails the check is converted afresh, up to CONVERSION_ATTEMPTS times: tf2onnx now and then
    writes a wrong graph for a model it converts correctly on the next try (seen in the full test suite only:
    an output with an extra leading axis). Only graphs that pass the check ever leave this function."""
    for attempt in range(CONVERSION_ATTEMPTS):
        proto = convert(model, opset=opset)
        try:
            return proto, [parity(model, proto, b) for b in batches]
        except ModelError as exc:
            if attempt == CONVERSION_ATTEMPTS - 1:
                raise ModelError(f"{exc} (after {CONVERSION_ATTEMPTS} conversions)") from exc


def export_checked(model, path, metadata: dict, *, check_inputs, opset: int = 17,
                   atol: float = 1e-4, proto=None) -> tuple[Path, float]:
    """`export_onnx`, also returning the measured max abs difference (for reports and model cards).

    `check_inputs`: one batch, or a list of batches (e.g. of different spatial sizes for a fully
    convolutional network); the difference returned is the largest over all of them. `proto` lets a caller
    pass a graph it converted itself; it must take the same inputs as `model`.
    """
    batches = [np.asarray(b, np.float32) for b in (check_inputs if isinstance(check_inputs, (list, tuple))
                                                   else [check_inputs])]
    if not batches or any(b.ndim < 2 or b.shape[0] == 0 for b in batches):
        raise ModelError("export needs a non-empty batch of check inputs")
    if proto is None:
        proto, diffs = convert_checked(model, batches, opset=opset)
    else:
        diffs = [parity(model, proto, b) for b in batches]
    diff = max(diffs)
    if not diff <= atol:
        raise ModelError(f"refusing to export {Path(path).name}: ONNX and Keras outputs differ by {diff:.3g} "
                         f"(allowed {atol:g})")
    set_metadata(proto, metadata)
    return write_atomic(proto.SerializeToString(), path), diff


# ----------------------------------------------------------------------------------------------------
# check inputs: real patches when the shared data is at hand, random ones otherwise

from cordseg.datasets import shared_data_dir  # noqa: E402,F401 (the training tools' name for it)


def _real_volume(data_dir: Path):
    """sct_testing t2 in working space (float32) with its zooms and cord mask, or None."""
    from cordseg.io import load_image
    from cordseg.orientation import to_rpi

    img_path = data_dir / "sct_testing" / "t2" / "t2.nii.gz"
    seg_path = data_dir / "sct_testing" / "t2" / "t2_seg-manual.nii.gz"
    if not img_path.exists():
        return None
    img = to_rpi(load_image(img_path))
    seg = to_rpi(load_image(seg_path)).data > 0.5 if seg_path.exists() else None
    return img.data, tuple(float(z) for z in img.zooms), seg


def _crop_multiple(a: np.ndarray, m: int) -> np.ndarray:
    h, w = (a.shape[0] // m) * m, (a.shape[1] // m) * m
    return a[:h, :w]


def _take(a: np.ndarray, centre, shape) -> np.ndarray:
    """Patch of `shape` centred at `centre`, edge voxels repeated where it leaves the volume (as at run time)."""
    from cordseg.segmentation import extract_patch

    corner = [int(round(c)) - size // 2 for c, size in zip(centre, shape)]
    return extract_patch(a, corner, shape)


def check_inputs_for(cfg, *, n: int = 4, rng=None, data_dir: Path | None = None, patch_shape=None) -> np.ndarray:
    """A batch to check parity on: normalised real slices/patches where possible, else random."""
    from cordseg.normalization import centres_from_mask, network_input, normalize
    from cordseg.resampling import resample

    rng = rng if rng is not None else np.random.default_rng(0)
    patch_shape = tuple(patch_shape or cfg.patch_shape)
    data_dir = data_dir if data_dir is not None else shared_data_dir()
    real = _real_volume(data_dir) if data_dir is not None else None
    if real is not None:
        vol, zooms, seg = real
        new_zooms = tuple(z if v is None else float(v) for z, v in zip(zooms, cfg.voxel_size))
        vol = resample(vol, zooms, new_zooms, order=1)
        if cfg.task == "centerline":
            norm = normalize(cfg.normalisation, vol)
            zs = np.linspace(0, norm.shape[2] - 1, n).round().astype(int)
            batch = np.stack([_crop_multiple(norm[:, :, z], 4) for z in zs])
            return batch[..., None].astype(np.float32)
        if seg is not None:
            seg = resample(seg.astype(np.float32), zooms, new_zooms, order=1) > 0.5
            centre = np.array(np.nonzero(seg)).mean(axis=1)
        else:
            centre = np.array(vol.shape) / 2.0
        patches, cords = [], []
        for k in range(n):
            jitter = rng.normal(0.0, 3.0, 3) if k else np.zeros(3)
            patches.append(_take(vol, centre + jitter, patch_shape))
            cords.append(_take(seg, centre + jitter, patch_shape) if seg is not None else np.zeros(patch_shape, bool))
        if len(cfg.channels) > 1:
            return network_input(cfg.normalisation, np.stack(patches), channels=cfg.channels,
                                 centres=np.stack([centres_from_mask(c) for c in cords]), zooms=new_zooms)
        return normalize(cfg.normalisation, np.stack(patches))[..., None].astype(np.float32)
    if cfg.task == "centerline":
        return rng.normal(0.0, 1.0, (n, 64, 48, 1)).astype(np.float32)
    return rng.normal(0.0, 1.0, (n,) + patch_shape + (len(cfg.channels),)).astype(np.float32)


def export_from_weights(task: str, weights_path, out_path, *, contrast: str, summary: str, steps: int,
                        check_inputs: np.ndarray | None = None, atol: float = 1e-4, network: dict | None = None,
                        opset: int = 17, channels=None) -> Path:
    """Build TASKS[task]'s network, load a `*.weights.h5` snapshot, export it with `tasks.metadata`.

    check_inputs None: real normalised slices/patches from ../shared/data when present, else random.
    """
    return export_from_weights_checked(task, weights_path, out_path, contrast=contrast, summary=summary,
                                       steps=steps, check_inputs=check_inputs, atol=atol, network=network,
                                       opset=opset, channels=channels)[0]


def export_from_weights_checked(task, weights_path, out_path, *, contrast, summary, steps, check_inputs=None,
                                atol=1e-4, network=None, opset=17, channels=None) -> tuple[Path, float]:
    """`export_from_weights`, also returning the measured max abs difference."""
    from . import tasks

    if task not in tasks.TASKS:
        raise ModelError(f"unknown task '{task}' (known: {', '.join(tasks.TASKS)})")
    cfg = tasks.with_network(tasks.TASKS[task], network, channels)
    weights_path = Path(weights_path)
    if not weights_path.exists():
        raise ModelError(f"weights file not found: {weights_path}")
    model = tasks.build_model(cfg)
    try:
        model.load_weights(str(weights_path))
    except Exception as exc:
        raise ModelError(f"cannot load {weights_path.name} into the {task} network: {exc}") from exc
    if check_inputs is None:
        check_inputs = check_inputs_for(cfg)
    meta = tasks.metadata(cfg, contrast=contrast, steps=steps, summary=summary)
    meta.setdefault("cordseg_source", "cordseg")
    return export_checked(model, out_path, meta, check_inputs=check_inputs, opset=opset, atol=atol)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cordseg.training.export", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=["centerline", "sc", "conus", "lesion"])
    p.add_argument("weights", nargs="+", help="a *.weights.h5 snapshot written by training/loop.py; several "
                   "snapshots of one run are averaged")
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--contrast", required=True, help="contrasts served, comma-separated (e.g. t1,t2,t2s,dwi)")
    p.add_argument("--summary", required=True, help="one-line training summary for the model card metadata")
    p.add_argument("--steps", type=int, help="training steps (default: read from the snapshot's name)")
    p.add_argument("--base-filters", type=int, help="CNN2 width used in training")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--channels", help="CNN2 input channels used in training, comma-separated (default: image)")
    a = p.parse_args(argv)
    channels = a.channels.split(",") if a.channels else None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    weights = [Path(w) for w in a.weights]
    steps = a.steps if a.steps is not None else snapshot_step(weights[-1])
    if steps is None:
        print("error: give --steps (the snapshot's name does not say)", file=sys.stderr)
        return 2
    network = {"base_filters": a.base_filters} if a.base_filters else None
    try:
        missing = [w for w in weights if not w.exists()]
        if missing:
            raise ModelError(f"weights file not found: {missing[0]}")
        with tempfile.TemporaryDirectory() as tmp:
            source = weights[0]
            if len(weights) > 1:
                from . import tasks

                cfg = tasks.with_network(tasks.TASKS[a.task], network, channels)
                try:
                    source = average_snapshots(lambda: tasks.build_model(cfg), weights,
                                               Path(tmp) / "mean.weights.h5")
                except Exception as exc:  # as for one snapshot: a file of another network is a ModelError
                    raise ModelError(f"cannot average {len(weights)} snapshots into the {a.task} network: "
                                     f"{exc}") from exc
            path, diff = export_from_weights_checked(a.task, source, a.out, contrast=a.contrast,
                                                     summary=a.summary, steps=steps, atol=a.atol,
                                                     network=network, channels=channels)
    except (ModelError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(weights) > 1:
        print(f"averaged {len(weights)} snapshots")
    print(f"wrote {path} (max abs difference ONNX vs Keras {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

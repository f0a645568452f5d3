"""Keras weights recovered from an exported cordseg CNN2 (.onnx), so that a shipped model can be fine-tuned
when its training snapshots are not at hand (a clean clone holds only the ONNX files).

The export folds each batch norm into the convolution before it (kernel scaled, bias added), so the
normalisation's own statistics are gone. They are rebuilt from data: each batch norm gets the per-channel
mean and spread of its convolution's output on calibration patches, with gamma and beta chosen so that the
inference output is unchanged. Training-mode batch statistics then start close to the moving ones, instead of
rescaling every channel at the first step.

    python -m cordseg.training.onnx_weights models/cordseg_lesion.onnx out.weights.h5  (or cordseg_sc.onnx)
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _onnx_convs(path):
    """{keras conv layer name: (kernel in Keras layout, bias)} read from the ONNX graph's Conv nodes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w_name, b_name = node.input[1], node.input[2]
        layer = w_name.split("/")[1].rsplit("_", 1)[0]  # "cnn2_1/enc1_conv0_1/convolution/..." -> enc1_conv0
        kernel = np.transpose(init[w_name], (2, 3, 4, 1, 0))  # (O, I, x, y, z) -> (x, y, z, I, O)
        out[layer] = (kernel.astype(np.float32), init[b_name].astype(np.float32).reshape(-1))
    return out


def _contract(path):
    from cordseg.inference import read_metadata

    return read_metadata(path)


def keras_from_onnx(path, calibration=None, *, patch_shape=None):
    """A Keras CNN2 with the ONNX file's weights (batch norms rebuilt on `calibration`, (N, X, Y, Z, C))."""
    from .networks import build_cnn2

    convs = _onnx_convs(path)
    meta = _contract(path)
    shape = tuple(patch_shape or [int(v) for v in meta["cordseg_patch_shape"].split("x")])
    base = convs["enc1_conv0"][0].shape[-1]
    model = build_cnn2(shape, base_filters=int(base), in_channels=int(convs["enc1_conv0"][0].shape[-2]))
    bns = []
    for layer in model.layers:
        if layer.__class__.__name__ != "Conv3D":
            continue
        kernel, bias = convs[layer.name]
        if layer.use_bias:
            layer.set_weights([kernel, bias])
            continue
        layer.set_weights([kernel])
        bn = model.get_layer(layer.name.replace("conv", "bn"))
        eps = bn.epsilon
        bn.set_weights([np.ones_like(bias), bias, np.zeros_like(bias), np.full_like(bias, 1.0 - eps)])
        bns.append((layer, bn, bias))
    if calibration is not None and len(calibration):
        import keras

        probe = keras.Model(model.input, [conv.output for conv, _, _ in bns])
        outs = probe.predict(np.asarray(calibration, np.float32), verbose=0, batch_size=2)
        for (conv, bn, bias), y in zip(bns, outs):
            m = y.mean(axis=(0, 1, 2, 3))
            s2 = y.var(axis=(0, 1, 2, 3))
            var = np.maximum(s2 - bn.epsilon, 1e-6)
            gamma = np.sqrt(var + bn.epsilon)
            # gamma * (x - m) / sqrt(var + eps) + beta == x + bias  for beta = bias + m
            bn.set_weights([gamma.astype(np.float32), (bias + m).astype(np.float32), m.astype(np.float32),
                            var.astype(np.float32)])
    return model


def parity(model, path, x) -> float:
    """Largest |Keras - ONNX Runtime| output difference on `x`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0]
    return float(np.abs(model.predict(np.asarray(x, np.float32), verbose=0) - ref).max())


def calibration_patches(task="lesion", n=8, seed=0, channels=("image",)):
    """Synthetic training-like patches, normalised as the network sees them (with its input `channels`)."""
    from . import synth, tasks
    from .train import default_labelmaps

    cfg = tasks.with_network(tasks.TASKS[task], None, channels)
    anatomy = synth.load_anatomies(default_labelmaps())
    sampler = tasks.Sampler(cfg, anatomy)
    rng = np.random.default_rng(seed)
    xs = []
    while len(xs) < n:
        x, _ = sampler(rng)
        xs.extend(list(x))
    return np.stack(xs[:n])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("onnx")
    p.add_argument("out", help="*.weights.h5")
    p.add_argument("--task", help="the task whose patches calibrate the batch norms (default: the model's own)")
    p.add_argument("--n", type=int, default=8, help="calibration patches")
    a = p.parse_args(argv)
    from cordseg.contract import ModelContract

    contract = ModelContract.from_metadata(_contract(a.onnx), a.onnx)
    x = calibration_patches(a.task or contract.task, a.n, channels=contract.channels)
    model = keras_from_onnx(a.onnx, x)
    err = parity(model, a.onnx, x[:2])
    if err > 1e-3:
        print(f"refused: Keras and ONNX differ by {err:.2e}", file=sys.stderr)
        return 2
    model.save_weights(a.out)
    print(f"wrote {a.out} (parity {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The two networks of the method, in Keras 3, channels-last (3D channels-first does not convert to ONNX).

CNN1: 2D U-Net with two poolings and dilated convolutions, batch norm + ReLU + dropout after each
convolution, sigmoid heatmap. CNN2: 3D U-Net of depth 2; each level has two 3x3x3 convolutions, the
second doubling the filters (the published lesion models' layout), nearest up-sampling, sigmoid output.
Sizes are smaller than the paper's so that they train on two CPU cores; see the model cards.
"""
from __future__ import annotations

import numpy as np

import keras
from keras import layers


def _conv_block_2d(x, filters, dilations, dropout, name):
    for i, d in enumerate(dilations):
        x = layers.Conv2D(filters, 3, padding="same", dilation_rate=d, use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
        if dropout:
            x = layers.SpatialDropout2D(dropout, name=f"{name}_drop{i}")(x)
    return x


def build_cnn1(filters=(16, 32, 48), bottleneck_dilations=(1, 2, 4, 8), dropout=0.1, name="cnn1"):
    """2D heatmap U-Net; input (H, W, 1) with H, W multiples of 4."""
    inp = keras.Input((None, None, 1), name="image")
    e1 = _conv_block_2d(inp, filters[0], (1, 2), dropout, "enc1")
    p1 = layers.MaxPooling2D(2, name="pool1")(e1)
    e2 = _conv_block_2d(p1, filters[1], (1, 2), dropout, "enc2")
    p2 = layers.MaxPooling2D(2, name="pool2")(e2)
    b = _conv_block_2d(p2, filters[2], bottleneck_dilations, dropout, "bottleneck")
    u2 = layers.Conv2DTranspose(filters[1], 2, strides=2, padding="same", name="up2")(b)
    d2 = _conv_block_2d(layers.Concatenate(name="cat2")([u2, e2]), filters[1], (1, 1), dropout, "dec2")
    u1 = layers.Conv2DTranspose(filters[0], 2, strides=2, padding="same", name="up1")(d2)
    d1 = _conv_block_2d(layers.Concatenate(name="cat1")([u1, e1]), filters[0], (1, 1), dropout, "dec1")
    out = layers.Conv2D(1, 1, activation="sigmoid", name="heatmap")(d1)
    return keras.Model(inp, out, name=name)


def _conv_block_3d(x, filters, dropout, name):
    for i, f in enumerate((filters, filters * 2)):
        x = layers.Conv3D(f, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout:
        x = layers.SpatialDropout3D(dropout, name=f"{name}_drop")(x)
    return x


def build_cnn2(patch_shape, base_filters=8, dropout=0.1, name="cnn2", in_channels=1):
    """3D U-Net of depth 2; input (X, Y, Z, in_channels) with each side a multiple of 4."""
    inp = keras.Input(tuple(patch_shape) + (in_channels,), name="image")
    f = base_filters
    e1 = _conv_block_3d(inp, f, 0.0, "enc1")  # f, 2f
    p1 = layers.MaxPooling3D(2, name="pool1")(e1)
    e2 = _conv_block_3d(p1, 2 * f, 0.0, "enc2")  # 2f, 4f
    p2 = layers.MaxPooling3D(2, name="pool2")(e2)
    b = _conv_block_3d(p2, 4 * f, dropout, "bottleneck")  # 4f, 8f
    u2 = layers.UpSampling3D(2, name="up2")(b)
    d2 = _conv_block_3d(layers.Concatenate(name="cat2")([u2, e2]), 2 * f, dropout, "dec2")
    u1 = layers.UpSampling3D(2, name="up1")(d2)
    d1 = _conv_block_3d(layers.Concatenate(name="cat1")([u1, e1]), f, 0.0, "dec1")
    out = layers.Conv3D(1, 1, activation="sigmoid", name="probability")(d1)
    return keras.Model(inp, out, name=name)


def _input_map(layer, source):
    """Where each of `source`'s input channels of `layer` sits among the wider network's: a prefix, except
    after a concatenation, whose parts each start at their own offset."""
    producer = layer.input._keras_history.operation
    if not isinstance(producer, layers.Concatenate):
        return np.arange(source.get_layer(layer.name).input.shape[-1])
    parts, offset = [], 0
    for wide, narrow in zip(producer.input, source.get_layer(producer.name).input):
        parts.append(offset + np.arange(narrow.shape[-1]))
        offset += wide.shape[-1]
    return np.concatenate(parts)


def copy_widened(source, target):
    """Copy `source`'s weights into `target`, the same network with more input channels and/or more filters,
    so that `target` computes what `source` does until training teaches it to use the rest: kernel weights
    from new input channels start at zero; new filters keep their random start (their output reaches the old
    filters only through those zeros); new batch-norm channels start as the identity."""
    for layer in target.layers:
        own = layer.get_weights()
        if not own:
            continue
        weights = source.get_layer(layer.name).get_weights()
        if isinstance(layer, layers.BatchNormalization):
            for o, w in zip(own, weights):
                o[:len(w)] = w
        else:  # a convolution: kernel (k, k, k, in, out), then the bias if it has one
            kernel, old = own[0], weights[0]
            rows = _input_map(layer, source)
            new_rows = np.setdiff1d(np.arange(kernel.shape[-2]), rows)
            n_out = old.shape[-1]
            kernel[..., new_rows, :n_out] = 0.0
            kernel[..., rows, :n_out] = old
            if len(own) > 1:
                own[1][:n_out] = weights[1]
        layer.set_weights(own)
    return target

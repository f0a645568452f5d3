"""ONNX export: parity with Keras, metadata round trip, refusal and atomic writes (tiny networks)."""
from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")

from cordseg.errors import ModelError  # noqa: E402
from cordseg.inference import read_metadata  # noqa: E402
from cordseg.training import export  # noqa: E402
from cordseg.training.loop import snapshot_step  # noqa: E402
from cordseg.training.networks import build_cnn1, build_cnn2  # noqa: E402

META = {"cordseg_task": "centerline", "cordseg_contrast": "t1,t2", "cordseg_layout": "NHWC",
        "cordseg_patch_shape": "slice", "cordseg_threshold": "0.5", "cordseg_steps": 12}


def _randomise_bn(model, seed=0):
    """Non-trivial batch-norm statistics, so that parity tests more than convolutions."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 2.0, v.shape)])
    return model


@pytest.fixture(scope="module")
def cnn1():
    keras.utils.set_random_seed(1)
    return _randomise_bn(build_cnn1(filters=(4, 8, 8), bottleneck_dilations=(1, 2), dropout=0.2, name="tiny_cnn1"))


@pytest.fixture(scope="module")
def cnn1_onnx(cnn1, tmp_path_factory):
    x = np.random.default_rng(0).normal(size=(3, 32, 40, 1)).astype(np.float32)
    path = tmp_path_factory.mktemp("cnn1") / "cnn1.onnx"
    out, diff = export.export_checked(cnn1, path, META, check_inputs=x)
    return out, diff


@pytest.fixture(scope="module")
def cnn1_proto(cnn1):
    return export.convert(cnn1)


def _copy(proto):
    dup = onnx.ModelProto()
    dup.CopyFrom(proto)
    return dup


def _dims(path):
    model = onnx.load(str(path))
    shape = model.graph.input[0].type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def test_cnn1_parity_metadata_and_dynamic_sides(cnn1, cnn1_onnx):
    path, diff = cnn1_onnx
    assert path.is_file() and diff <= 1e-4
    meta = read_metadata(path)
    assert meta == {k: str(v) for k, v in META.items()}  # all values written as strings
    assert _dims(path) == [None, None, None, 1]  # batch, H and W dynamic
    # a size the check never saw, and not square
    x = np.random.default_rng(5).normal(size=(2, 24, 56, 1)).astype(np.float32)
    got = export.onnx_outputs(path.read_bytes(), x)
    want = export.keras_outputs(cnn1, x)
    assert got.shape == (2, 24, 56, 1)
    assert np.max(np.abs(got - want)) <= 1e-4
    assert 0.0 < want.min() and want.max() < 1.0  # a sigmoid, and not a constant


def test_cnn2_parity_fixed_patch_dynamic_batch(tmp_path):
    keras.utils.set_random_seed(2)
    model = _randomise_bn(build_cnn2((16, 16, 16), base_filters=2, dropout=0.3, name="tiny_cnn2"))
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    meta = {"cordseg_task": "sc", "cordseg_layout": "NXYZC", "cordseg_patch_shape": "16x16x16"}
    path = export.export_onnx(model, tmp_path / "sub" / "cnn2.onnx", meta, check_inputs=x)
    assert path == tmp_path / "sub" / "cnn2.onnx" and path.is_file()
    assert _dims(path) == [None, 16, 16, 16, 1]
    assert read_metadata(path) == meta
    x3 = np.random.default_rng(3).normal(size=(3, 16, 16, 16, 1)).astype(np.float32)
    assert np.max(np.abs(export.onnx_outputs(path.read_bytes(), x3) - export.keras_outputs(model, x3))) <= 1e-4
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Tile" not in ops and ops.count("Expand") == 2  # each up-sampling one broadcast (training/onnx_graph)


def test_upsampling_rewrite_of_an_existing_file(tmp_path, capsys):
    """A file exported before the rewrite (tf2onnx's repeat chains) rewritten by the CLI: identical outputs,
    metadata kept; a graph without chains is left alone."""
    from cordseg.training import onnx_graph

    keras.utils.set_random_seed(4)
    model = _randomise_bn(build_cnn2((16, 16, 8), base_filters=2, name="tiny_cnn2", in_channels=2))
    meta = {"cordseg_task": "lesion", "cordseg_layout": "NXYZC", "cordseg_patch_shape": "16x16x8"}
    orig = tmp_path / "orig.onnx"
    with mock.patch.object(export, "simplify_upsampling", lambda proto: 0):  # as files were written before
        x = np.random.default_rng(1).normal(size=(2, 16, 16, 8, 2)).astype(np.float32)
        export.export_onnx(model, orig, meta, check_inputs=x)
    assert "Tile" in [n.op_type for n in onnx.load(str(orig)).graph.node]
    out = tmp_path / "new.onnx"
    assert onnx_graph.main([str(orig), str(out)]) == 0
    assert "2 up-sampling chains replaced, outputs identical" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Tile" not in ops and ops.count("Expand") == 2
    assert read_metadata(out) == meta
    assert onnx_graph.same_outputs(orig, out) == 0.0
    x3 = np.random.default_rng(3).normal(size=(3, 16, 16, 8, 2)).astype(np.float32)
    assert np.array_equal(export.onnx_outputs(out.read_bytes(), x3), export.onnx_outputs(orig.read_bytes(), x3))
    again = tmp_path / "again.onnx"
    assert onnx_graph.main([str(out), str(again)]) == 1 and not again.exists()  # nothing left to replace


def test_refuses_when_parity_fails_and_writes_nothing(cnn1, cnn1_proto, tmp_path):
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 1)).astype(np.float32)
    target = tmp_path / "m.onnx"
    with pytest.raises(ModelError, match="differ"):  # atol < 0: no difference passes
        export.export_checked(cnn1, target, META, check_inputs=x, atol=-1.0, proto=_copy(cnn1_proto))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_refusal_keeps_an_existing_file(cnn1, cnn1_proto, tmp_path, monkeypatch):
    """A wrong graph (simulated: ONNX Runtime output off by 0.01) never replaces a good file."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous model")
    real = export.onnx_outputs
    monkeypatch.setattr(export, "onnx_outputs", lambda proto, x: real(proto, x) + 0.01)
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 1)).astype(np.float32)
    with pytest.raises(ModelError, match="refusing"):
        export.export_checked(cnn1, target, META, check_inputs=x, proto=_copy(cnn1_proto))
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_invalid_graph_is_refused(cnn1, cnn1_proto, tmp_path):
    """A graph ONNX cannot check (what tf2onnx leaves for channels-first 3D) is refused, not written."""
    proto = _copy(cnn1_proto)
    proto.graph.node[0].op_type = "StatefulPartitionedCall"
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 1)).astype(np.float32)
    with pytest.raises(ModelError):
        export.export_checked(cnn1, tmp_path / "m.onnx", META, check_inputs=x, proto=proto)
    assert not (tmp_path / "m.onnx").exists()


def test_a_wrong_conversion_is_retried_and_never_written(cnn1, cnn1_proto, tmp_path, monkeypatch):
    """tf2onnx's occasional wrong graph: the next conversion is tried; if every one is wrong, nothing is
    written and the error says how many were tried."""
    bad = _copy(cnn1_proto)
    bad.graph.node[0].op_type = "StatefulPartitionedCall"
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 1)).astype(np.float32)
    made = []

    def flaky(model, opset=17):
        made.append(1)
        return _copy(bad) if len(made) == 1 else _copy(cnn1_proto)

    monkeypatch.setattr(export, "convert", flaky)
    out, diff = export.export_checked(cnn1, tmp_path / "m.onnx", META, check_inputs=x)
    assert len(made) == 2 and diff <= 1e-4 and read_metadata(out)["cordseg_task"] == "centerline"
    made.clear()
    monkeypatch.setattr(export, "convert", lambda model, opset=17: made.append(1) or _copy(bad))
    with pytest.raises(ModelError, match=f"after {export.CONVERSION_ATTEMPTS} conversions"):
        export.export_checked(cnn1, tmp_path / "n.onnx", META, check_inputs=x)
    assert len(made) == export.CONVERSION_ATTEMPTS and not (tmp_path / "n.onnx").exists()


def test_export_from_weights_uses_task_metadata(tmp_path):
    from cordseg.training import tasks

    keras.utils.set_random_seed(3)
    net = {"filters": (4, 8, 8), "bottleneck_dilations": (1, 2)}
    trained = _randomise_bn(build_cnn1(**net))
    weights = tmp_path / "ema_000120.weights.h5"
    trained.save_weights(str(weights))
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 1)).astype(np.float32)
    out = export.export_from_weights("centerline", weights, tmp_path / "ctr.onnx", contrast="t1,t2,t2s,dwi",
                                     summary="tiny test network", steps=120, check_inputs=x, network=net)
    meta = read_metadata(out)
    expected = tasks.metadata(tasks.TASKS["centerline"], contrast="t1,t2,t2s,dwi", steps=120,
                              summary="tiny test network")
    assert {k: meta[k] for k in expected} == expected
    assert meta["cordseg_source"] == "cordseg" and meta["cordseg_layout"] == "NHWC"
    # the exported graph computes the snapshot's network, not a freshly initialised one
    assert np.max(np.abs(export.onnx_outputs(out.read_bytes(), x) - export.keras_outputs(trained, x))) <= 1e-4


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    rc = export.main(["sc", str(tmp_path / "missing.weights.h5"), str(tmp_path / "o.onnx"), "--contrast", "t2",
                      "--summary", "x", "--steps", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "missing.weights.h5" in err and "\n" not in err
    assert snapshot_step(tmp_path / "ema_004000.weights.h5") == 4000
    assert snapshot_step(tmp_path / "final.weights.h5") is None


def test_cli_averages_several_snapshots(tmp_path, capsys):
    from cordseg.training import tasks

    build = lambda: tasks.build_model(tasks.TASKS["centerline"])  # noqa: E731
    paths, nets = [], []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        nets.append(_randomise_bn(build()))
        paths.append(tmp_path / f"ema_{seed:06d}.weights.h5")
        nets[-1].save_weights(str(paths[-1]))
    out = tmp_path / "mean.onnx"
    rc = export.main(["centerline", *map(str, paths), str(out), "--contrast", "t2", "--summary", "x"])
    assert rc == 0 and "averaged 2 snapshots" in capsys.readouterr().out
    assert read_metadata(out)["cordseg_steps"] == "2"  # the last snapshot's step
    mean = build()
    mean.set_weights([(a + b) / 2 for a, b in zip(nets[0].get_weights(), nets[1].get_weights())])
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 1)).astype(np.float32)
    assert np.max(np.abs(export.onnx_outputs(out.read_bytes(), x) - export.keras_outputs(mean, x))) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema_000001.weights.h5", "ema_000002.weights.h5",
                                                         "mean.onnx"]

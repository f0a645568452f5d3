"""CNN2's extra input channel "cord_anomaly" (cordseg.normalization): what it shows on phantoms with known
answers, how a multi-channel model is fed, and that the runtime hands it the centerline of each patch."""
from __future__ import annotations

import numpy as np
import pytest

from cordseg import normalization, segmentation
from cordseg.centerline import Centerline
from cordseg.errors import ModelError
from cordseg.inference import Model
from cordseg.normalization import centres_from_mask, cord_anomaly, network_input, zscore_stack
from cordseg.orientation import to_rpi
from cordseg.phantom import make_phantom


def cord_patch(*, lesion_ratio=1.2, gm=1.25, shading=1.0, bend_vox=4.0, noise=0.02, seed=0):
    """48^3 patch at 0.5x0.5x1 mm: a bending cord (radius 4 mm) with brighter central grey matter (x`gm`),
    bright CSF around it, shading along the cord (end slice x`shading`), and one lesion `lesion_ratio` times
    the white matter, 10 slices long, off the centre. Returns (patch, cord, lesion, grey matter)."""
    n = 48
    z = np.arange(n)
    cx, cy = 24 + bend_vox * np.sin(z / 15.0), 24 + 0.5 * bend_vox * np.cos(z / 20.0)
    gx, gy = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    patch = np.zeros((n, n, n), np.float32)
    cord, lesion, grey = (np.zeros((n, n, n), bool) for _ in range(3))
    for k in z:
        r = np.hypot((gx - cx[k]) * 0.5, (gy - cy[k]) * 0.5)
        s = np.where(r < 4, 1.0, np.where(r < 6, 2.0, 0.3))
        grey[:, :, k] = r < 1.5
        s = np.where(grey[:, :, k], gm, s)
        cord[:, :, k] = r < 4
        if 20 <= k < 30:
            lesion[:, :, k] = np.hypot((gx - cx[k] - 4) * 0.5, (gy - cy[k]) * 0.5) < 1.2
        patch[:, :, k] = s * (1.0 + (shading - 1.0) * k / (n - 1))
    patch[lesion] *= lesion_ratio
    patch += np.random.default_rng(seed).normal(0, noise, patch.shape).astype(np.float32)
    return patch, cord, lesion, grey & ~lesion


def test_lesion_stands_out_and_grey_matter_and_shading_cancel():
    patch, cord, lesion, grey = cord_patch(shading=2.5)
    a = cord_anomaly(patch, centres_from_mask(cord))
    assert a.shape == patch.shape and a.dtype == np.float32
    # a 1.2x lesion reads about +1 (ANOMALY_GAIN 5 x 0.2); measured 1.0 inside its outline
    assert a[lesion].mean() > 0.8
    # grey matter 1.25x the white matter and 2.5x shading along the cord are the same on every slice
    assert abs(np.median(a[grey])) < 0.15
    assert abs(np.median(a[cord & ~lesion])) < 0.15
    # the plain image cannot tell them apart by brightness: grey matter is brighter than the lesion here
    assert patch[grey].mean() > patch[lesion].mean() * 0.9


def test_fainter_lesions_read_lower():
    reads = [cord_anomaly(p, centres_from_mask(c))[les].mean()
             for p, c, les, _ in (cord_patch(lesion_ratio=r) for r in (1.1, 1.2, 1.5))]
    assert reads[0] < reads[1] < reads[2]
    assert 0.3 < reads[0] < 0.8


def test_units_and_offsets_do_not_matter():
    patch, cord, _, _ = cord_patch()
    centres = centres_from_mask(cord)
    ref = cord_anomaly(patch, centres)
    np.testing.assert_allclose(cord_anomaly(patch * 1e6, centres), ref, atol=1e-3)
    np.testing.assert_allclose(cord_anomaly(patch * 1e-9, centres), ref, atol=1e-3)
    np.testing.assert_allclose(cord_anomaly(patch - 500.0, centres), ref, atol=2e-3)


def test_following_the_centerline_matters_on_a_bending_cord():
    """Straight 'centres' through a cord that bends by 4 voxels: its edges no longer line up along the cord,
    and the anomaly inside the lesion-free cord spreads."""
    patch, cord, lesion, _ = cord_patch(bend_vox=6.0)
    follow = cord_anomaly(patch, centres_from_mask(cord))
    straight = cord_anomaly(patch, np.tile([24.0, 24.0], (48, 1)))
    healthy = cord & ~lesion
    assert np.abs(follow[healthy]).mean() < 0.7 * np.abs(straight[healthy]).mean()


def test_centres_from_mask():
    m = np.zeros((10, 12, 6), bool)
    m[2:5, 3:6, 1] = True   # centre (3, 4)
    m[6:9, 7:10, 4] = True  # centre (7, 8)
    c = centres_from_mask(m)
    assert c.shape == (6, 2)
    np.testing.assert_allclose(c[1], [3, 4])
    np.testing.assert_allclose(c[4], [7, 8])
    np.testing.assert_allclose(c[0], [3, 4])   # before: constant
    np.testing.assert_allclose(c[5], [7, 8])   # after: constant
    np.testing.assert_allclose(c[2], [3 + 4 / 3, 4 + 4 / 3])  # between: linear
    np.testing.assert_allclose(centres_from_mask(np.zeros((10, 12, 3))), [[4.5, 5.5]] * 3)


def test_network_input():
    patch, cord, _, _ = cord_patch()
    batch = np.stack([patch, patch[::-1]])
    np.testing.assert_array_equal(network_input("zscore_stack", batch), zscore_stack(batch))
    centres = np.stack([centres_from_mask(cord), centres_from_mask(cord[::-1])])
    x = network_input("zscore_stack", batch, channels=("image", "cord_anomaly"), centres=centres)
    assert x.shape == batch.shape + (2,)
    np.testing.assert_array_equal(x[..., 0], zscore_stack(batch))
    np.testing.assert_allclose(x[1, ..., 1], cord_anomaly(patch[::-1], centres[1]))
    with pytest.raises(ModelError, match="centerline"):
        network_input("zscore_stack", batch, channels=("image", "cord_anomaly"))
    with pytest.raises(ModelError, match="unknown input channel"):
        network_input("zscore_stack", batch, channels=("image", "t1_map"), centres=centres)


def _channel_mean_onnx(path, shape, metadata):
    """A 'network' returning the mean of its input channels: (N, X, Y, Z, C) -> (N, X, Y, Z, 1)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[4], keepdims=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape, 1])
    model = helper.make_model(helper.make_graph([node], "channel_mean", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def two_channel_model(tmp_path):
    from conftest import BASE_METADATA

    meta = dict(BASE_METADATA["lesion"], cordseg_channels="image,cord_anomaly")
    return Model.open(_channel_mean_onnx(tmp_path / "two.onnx", (48, 48, 48), meta))


def test_two_channel_model_predicts_and_checks_its_channels(two_channel_model):
    m = two_channel_model
    assert m.channels == ("image", "cord_anomaly")
    x = np.random.default_rng(0).normal(size=(2, 48, 48, 48, 2)).astype(np.float32)
    y = m.predict(x, flip_average=True)
    assert y.shape == (2, 48, 48, 48)
    np.testing.assert_allclose(y, x.mean(axis=-1), atol=1e-6)
    with pytest.raises(ModelError, match="2 channels"):
        m.predict(x[..., :1])


def test_runtime_gives_each_patch_the_centerline_through_it(two_channel_model, monkeypatch):
    """Along a bending phantom cord, every slice of every patch gets a centre that lies inside the cord."""
    ph = make_phantom((64, 64, 60), (0.5, 0.5, 1.0), curvature=6.0, seed=3)
    rpi = to_rpi(ph.image)
    cord = to_rpi(ph.cord).data > 0.5
    seen = []
    plain = normalization.cord_anomaly

    def spy(patch, centres, zooms=(0.5, 0.5, 1.0)):
        seen.append((patch.copy(), np.asarray(centres).copy()))
        return plain(patch, centres, zooms)

    monkeypatch.setattr(normalization, "cord_anomaly", spy)
    zs = np.array([z for z in range(cord.shape[2]) if cord[:, :, z].any()])
    xs = np.array([np.nonzero(cord[:, :, z])[0].mean() for z in zs])
    ys = np.array([np.nonzero(cord[:, :, z])[1].mean() for z in zs])
    soft = segmentation.soft_segmentation(Centerline(zs, xs, ys, rpi), two_channel_model)
    assert soft.shape == rpi.shape and seen
    cord_level = float(np.median(rpi.data[cord]))
    inside = []
    for patch, centres in seen:
        assert centres.shape == (48, 2)
        for k, (x, y) in enumerate(centres):
            i, j = int(round(x)), int(round(y))
            if 0 <= i < 48 and 0 <= j < 48:
                inside.append(abs(patch[i, j, k] - cord_level) < 0.25 * abs(cord_level) + 0.2)
    assert np.mean(inside) > 0.95

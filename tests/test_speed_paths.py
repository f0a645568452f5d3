"""The cheaper paths of the runtime give the answers of the full ones.

CNN1's first pass only places the second look's windows: it looks at slices first_pass_mm apart without the
mirror image, and not at all where the windows span whole slices; OptiC's second pass runs in the windows'
bounding box; network calls are bounded in pixels. An identity "CNN1" (the heatmap is the normalised image)
lets the tests build images whose answer is known and count what the network is asked.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import cordseg
from cordseg import centerline
from cordseg.contract import FIRST_PASS_MM, ModelContract
from cordseg.inference import Model
from cordseg.orientation import to_rpi

CORD = (70, 90)


def wide_field(nz=24, slice_mm=2.0, size=300):
    """size x size mm slices: a 4 mm-radius bright cord drifting 1 voxel per 4 slices from CORD, on a dim
    background; at 300 mm wider than SPARSE_FIRST_PASS_WINDOWS windows of 56 mm, so the first pass is sparse."""
    data = np.full((size, size, nz), 0.1, np.float32)
    x, y = np.mgrid[:size, :size]
    for z in range(nz):
        cx = CORD[0] + z // 4
        data[..., z][(x - cx) ** 2 + (y - CORD[1]) ** 2 <= 16] = 1.0
    aff = np.diag([-1.0, 1.0, slice_mm, 1.0])
    return to_rpi(nib.Nifti1Image(data, aff))


class Recorder:
    """Wraps a Model's predict: (batch shape, flip_average) of every call."""

    def __init__(self, model):
        self.model, self.calls, self.depth = model, [], 0
        self._predict = model.predict

    def __call__(self, batch, *, flip_average=False):
        if not self.depth:  # a mirrored call makes two plain ones through the same attribute
            self.calls.append((batch.shape, flip_average))
        self.depth += 1
        try:
            return self._predict(batch, flip_average=flip_average)
        finally:
            self.depth -= 1


@pytest.fixture
def identity(tmp_path, tiny_onnx):
    def make(extra=None):
        return Model.open(tiny_onnx(tmp_path / f"ctr{len(list(tmp_path.iterdir()))}.onnx", task="centerline",
                                    extra=extra))
    return make


def recorded(model, monkeypatch):
    rec = Recorder(model)
    monkeypatch.setattr(model, "predict", rec)
    return rec


def test_first_pass_sees_sparse_slices_unmirrored_and_the_second_every_slice_mirrored(identity, monkeypatch):
    rpi = wide_field()
    model = identity()
    rec = recorded(model, monkeypatch)
    cl = centerline.detect(rpi, model)
    first = [c for c in rec.calls if not c[1]]
    second = [c for c in rec.calls if c[1]]
    n_first = sum(s[0] for s, _ in first)
    assert n_first == round(rpi.shape[2] * 2.0 / FIRST_PASS_MM)  # 48 mm of slices at 8 mm
    assert all(s[1:] == rpi.shape[:2] for s, _ in first)  # whole slices
    assert sum(s[0] for s, _ in second) == rpi.shape[2]  # every slice once, mirror-averaged
    assert all(s[1:] == (56, 56) for s, _ in second)
    np.testing.assert_array_equal(cl.z, np.arange(rpi.shape[2]))
    np.testing.assert_allclose(cl.x, CORD[0] + np.arange(rpi.shape[2]) // 4, atol=0.5)
    np.testing.assert_allclose(cl.y, CORD[1], atol=0.5)


def test_slices_a_few_windows_wide_keep_the_full_first_pass(identity, monkeypatch):
    rpi = wide_field(size=152)  # a multiple of 4: calls show unpadded slices
    model = identity()
    rec = recorded(model, monkeypatch)
    centerline.detect(rpi, model)
    whole = [s for s, flip in rec.calls if s[1:] == rpi.shape[:2]]
    assert all(flip for _, flip in rec.calls) and sum(s[0] for s in whole) == rpi.shape[2]


def test_the_answer_is_the_full_first_pass_answer(identity):
    """first_pass_mm 0 (every slice) and the default give the same centerline where the windows land alike."""
    rpi = wide_field()
    every = centerline.detect(rpi, identity({"cordseg_first_pass_mm": "0"}))
    sparse = centerline.detect(rpi, identity())
    np.testing.assert_array_equal(every.z, sparse.z)
    np.testing.assert_allclose(every.x, sparse.x, atol=1e-6)
    np.testing.assert_allclose(every.y, sparse.y, atol=1e-6)


def test_no_first_pass_where_windows_span_whole_slices(identity, monkeypatch):
    data = np.full((40, 40, 6), 0.1, np.float32)
    x, y = np.mgrid[:40, :40]
    data[(x - 20) ** 2 + (y - 18) ** 2 <= 16] = 1.0
    rpi = to_rpi(nib.Nifti1Image(data, np.diag([-1.0, 1, 2, 1])))
    model = identity()
    rec = recorded(model, monkeypatch)
    cl = centerline.detect(rpi, model)
    assert all(flip for _, flip in rec.calls) and sum(s[0] for s, _ in rec.calls) == 6  # one pass only
    np.testing.assert_allclose(cl.x, 20, atol=0.5)
    with pytest.raises(cordseg.NoCordError):  # nothing found: still an error, without a second try
        centerline.detect(to_rpi(nib.Nifti1Image(np.zeros_like(data), np.diag([-1.0, 1, 2, 1]))), model)


def test_a_sparse_first_pass_that_finds_nothing_is_redone_on_every_slice(identity, monkeypatch):
    """The cord on 3 slices of 24 only: between the sparse slices' planes, so only the full pass sees it."""
    rpi = wide_field()
    rpi.data[:] = np.where(np.arange(rpi.shape[2])[None, None] % 4 == 1, rpi.data, 0.1)
    rpi.data[..., 4:] = 0.1
    model = identity()
    rec = recorded(model, monkeypatch)
    try:
        centerline.detect(rpi, model)
    except cordseg.NoCordError:
        pass
    mirrored_whole = [s for s, flip in rec.calls if flip and s[1:] == rpi.shape[:2]]
    assert sum(s[0] for s in mirrored_whole) == rpi.shape[2]


def test_optic_in_the_windows_box_equals_optic_on_the_whole_grid(identity):
    """The second pass's OptiC on the bounding box of the windows gives the path it gives on the whole grid."""
    rng = np.random.default_rng(3)
    rpi = wide_field()
    model = identity()
    heat = np.zeros(rpi.shape, np.float32)
    lo_x = 40 + np.cumsum(rng.integers(-1, 2, rpi.shape[2]))
    for z, x0 in enumerate(lo_x):
        heat[x0:x0 + 56, 60:116, z] = rng.random((56, 56)) * 0.6
        heat[x0 + 20:x0 + 30, 80:92, z] += 0.5  # a cord-like blob inside each window
    box = (lo_x.min() - 1, lo_x.max() + 56 + 1), (59, 117)
    full = centerline._trace(heat, rpi.zooms, rpi, model, 1.0)
    cropped = centerline._trace(heat[box[0][0]:box[0][1], box[1][0]:box[1][1]], rpi.zooms, rpi, model, 1.0,
                                offset=(box[0][0], box[1][0]))
    np.testing.assert_array_equal(full.z, cropped.z)
    np.testing.assert_allclose(full.x, cropped.x, atol=1e-9)
    np.testing.assert_allclose(full.y, cropped.y, atol=1e-9)


def test_cnn1_calls_are_bounded_in_pixels(identity, monkeypatch):
    monkeypatch.setattr(centerline, "BATCH_PIXELS", 3 * 300 * 300)
    rpi = wide_field()
    model = identity({"cordseg_first_pass_mm": "0"})
    rec = recorded(model, monkeypatch)
    centerline.detect(rpi, model, window_mm=None)
    assert max(s[0] for s, _ in rec.calls) == 3 and sum(s[0] for s, _ in rec.calls) == rpi.shape[2]


def test_first_pass_mm_is_a_contract_key():
    meta = ModelContract(task="centerline", contrasts=("t2",), layout="NHWC", patch_shape=None,
                         voxel_size=(1.0, 1.0, None), normalisation="percentile_slices", threshold=0.5,
                         first_pass_mm=12.0).to_metadata()
    assert meta["cordseg_first_pass_mm"] == "12"
    assert ModelContract.from_metadata(meta).first_pass_mm == 12.0
    meta["cordseg_first_pass_mm"] = "-1"
    with pytest.raises(cordseg.ModelError, match="cordseg_first_pass_mm"):
        ModelContract.from_metadata(meta)


def test_sessions_return_their_memory(tmp_path, tiny_onnx):
    """No ONNX Runtime arena: a call's activations are not kept reserved after it (peak RSS)."""
    model = Model.open(tiny_onnx(tmp_path / "c.onnx", task="centerline"))
    opts = model.session().get_session_options()
    assert opts.enable_cpu_mem_arena is False and opts.enable_mem_pattern is False
    from cordseg.inference import release_memory

    release_memory()  # a no-op where libc has no malloc_trim; never an error


def test_largest_component_in_the_bounding_box_is_the_whole_volume_answer():
    from scipy import ndimage as ndi

    from cordseg.segmentation import keep_largest_component

    rng = np.random.default_rng(5)
    mask = np.zeros((60, 70, 40), np.uint8)
    mask[10:50, 20:40, 5:35] = ndi.binary_opening(rng.random((40, 20, 30)) > 0.45).astype(np.uint8)
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    assert n > 1
    sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
    expected = (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)
    np.testing.assert_array_equal(keep_largest_component(mask), expected)
    assert not keep_largest_component(np.zeros_like(mask)).any()


def test_oversized_slices_go_in_strips_that_add_up_to_the_slice(identity, monkeypatch):
    """The sparse first pass on slices over BATCH_PIXELS: strips along x, each call within the bound (plus its
    halo), stitched back in place (an identity network shows any misplaced row)."""
    monkeypatch.setattr(centerline, "BATCH_PIXELS", 100 * 100)
    model = identity()
    rec = recorded(model, monkeypatch)
    slices = np.random.default_rng(1).random((3, 150, 98)).astype(np.float32)
    heat = centerline._predict_strips(slices, model, None, (0, 1))
    np.testing.assert_array_equal(heat, slices)
    assert len(rec.calls) == 3 * 2 and all(not flip for _, flip in rec.calls)
    assert all(s[1] <= 75 + 2 * centerline.STRIP_HALO + 4 and s[2] == 100 for s, _ in rec.calls)

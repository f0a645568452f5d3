"""Growing lesion cores to the whole lesion: hysteresis on the network's map, and the image's half-maximum."""
import numpy as np

from cordseg.lesions import fill_to_edge, grow_lesions


def _blob(shape=(30, 30, 20), centre=(15, 15, 10), r=(3, 3, 6)):
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((a - c) / rr) ** 2 for a, c, rr in zip(g, centre, r))


def test_hysteresis_grows_cores_and_never_starts_a_lesion():
    d = _blob()
    prob = np.clip(1.2 - d, 0, 1).astype(np.float32)  # a lesion whose map is high only at its centre
    prob[2:5, 2:5, 2:5] = 0.4  # a faint region with no core: must not appear
    core = (prob >= 0.9).astype(np.uint8)
    grown = grow_lesions(core, prob, 0.3)
    assert grown.sum() == ((prob >= 0.3) & (d < 5)).sum()
    assert not grown[2:5, 2:5, 2:5].any()
    assert grown.sum() > 3 * core.sum()
    assert np.array_equal(grow_lesions(core, prob, 0.0), core)


def test_fill_to_edge_reaches_the_half_maximum_outline():
    d = _blob()
    cord = _blob(r=(8, 8, 30)) <= 1.0
    lesion = d <= 1.0
    image = np.where(cord, 100.0, 20.0)
    image[lesion] = 140.0  # lesion 1.4x the cord
    core = (d <= 0.3).astype(np.uint8)
    out = fill_to_edge(core, image, cord, fraction=0.5, reach_mm=3)
    assert np.array_equal(out.astype(bool), lesion | core.astype(bool))
    # no growth beyond the cord, and nothing where the image is not brighter
    flat = np.where(cord, 100.0, 20.0)
    assert np.array_equal(fill_to_edge(core, flat, cord), core)


def test_fill_to_edge_keeps_lesions_apart_from_bright_cord_elsewhere():
    d = _blob()
    cord = _blob(r=(8, 8, 30)) <= 1.0
    image = np.where(cord, 100.0, 20.0)
    image[d <= 1.0] = 150.0
    image[2:28, 2:28, 18:20] = np.where(cord[2:28, 2:28, 18:20], 150.0, 20.0)  # bright, but 3+ voxels away
    core = (d <= 1.0).astype(np.uint8)
    out = fill_to_edge(core, image, cord, fraction=0.5, reach_mm=2)
    assert not out[:, :, 18:].any()


def test_fill_to_edge_does_not_cross_thick_slices():
    d = _blob()
    cord = _blob(r=(8, 8, 30)) <= 1.0
    image = np.where(cord, 100.0, 20.0)
    image[d <= 1.0] = 150.0
    core = ((d <= 1.0) & (np.arange(20) == 10)[None, None, :]).astype(np.uint8)
    out = fill_to_edge(core, image, cord, fraction=0.5, zooms=(0.5, 0.5, 5.0), reach_mm=1.5)
    assert not out[:, :, :10].any() and not out[:, :, 11:].any()
    assert out[:, :, 10].sum() == (d[:, :, 10] <= 1.0).sum()  # in-plane, the whole section

"""cordseg.orientation: RPI by flips and transposes only, exact both ways, same scanner space."""
import itertools
import zlib

import nibabel as nib
import numpy as np
import pytest

from cordseg.datasets import shared_data
from cordseg.orientation import RPI_CODES, to_rpi

SHARED = shared_data()


def all_axcodes():
    """The 48 axis-code triples: 6 axis orders x 8 sign choices."""
    pairs = (("R", "L"), ("A", "P"), ("S", "I"))
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            yield tuple(pairs[p][s] for p, s in zip(perm, signs))


def affine_for(axcodes, zooms, offset, rotation=None):
    """Affine whose voxel axes point along `axcodes` (world RAS+), optionally slightly rotated."""
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    for axis, code in enumerate(axcodes):
        row, sign = world[code]
        aff[row, axis] = sign * zooms[axis]
    if rotation is not None:
        aff[:3, :3] = rotation @ aff[:3, :3]
    aff[:3, 3] = offset
    return aff


def small_rotation(deg=12.0):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]]) @ np.array(
        [[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]]
    )


def check_consistent(img, r, rng):
    """Reoriented voxels and affine describe the same scanner points as the native ones."""
    native = np.asanyarray(img.dataobj)
    assert nib.aff2axcodes(r.affine) == RPI_CODES
    assert r.data.dtype == np.float32 and r.data.flags.c_contiguous
    # Random native voxels: their scanner position, looked up on the RPI grid, is an
    # integer RPI voxel holding the same value.
    ijk = np.stack([rng.integers(0, n, 40) for n in native.shape], axis=1)
    world = nib.affines.apply_affine(img.affine, ijk)
    rpi_ijk = nib.affines.apply_affine(np.linalg.inv(r.affine), world)
    assert np.allclose(rpi_ijk, np.rint(rpi_ijk), atol=1e-6)
    rpi_ijk = np.rint(rpi_ijk).astype(int)
    assert np.array_equal(r.data[tuple(rpi_ijk.T)], native[tuple(ijk.T)])
    # The exact point maps agree with the affines.
    assert np.array_equal(r.points_from_native(ijk), rpi_ijk)
    assert np.array_equal(r.points_to_native(rpi_ijk), ijk)
    # Continuous (sub-voxel) points too.
    pts = rng.uniform(-0.5, 1, size=(25, 3)) * (np.array(r.shape) - 1)
    assert np.allclose(
        nib.affines.apply_affine(r.affine, pts),
        nib.affines.apply_affine(img.affine, r.points_to_native(pts)),
        atol=1e-6,
    )


@pytest.mark.parametrize("axcodes", list(all_axcodes()), ids="".join)
def test_round_trip_every_orientation(axcodes):
    rng = np.random.default_rng(zlib.crc32("".join(axcodes).encode()))  # deterministic per case
    shape = (5, 6, 7)
    data = rng.normal(size=shape).astype(np.float32)
    zooms = (0.5, 0.8, 3.0)
    img = nib.Nifti1Image(data, affine_for(axcodes, zooms, (10.0, -20.0, 5.0)))
    r = to_rpi(img)
    assert np.array_equal(r.to_native(r.data), data)  # voxel-exact round trip
    assert np.array_equal(r.from_native(data), r.data)
    # Zooms follow the axes to their RPI positions.
    expected = {c: z for c, z in zip(axcodes, zooms)}
    assert r.zooms == pytest.approx(
        [expected.get("L", expected.get("R")), expected.get("A", expected.get("P")),
         expected.get("S", expected.get("I"))]
    )
    assert r.native_shape == shape
    check_consistent(img, r, rng)


@pytest.mark.parametrize("axcodes", [("P", "S", "R"), ("R", "A", "S"), ("L", "P", "I"), ("S", "R", "A")])
def test_oblique_affine(axcodes):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 1000, size=(4, 9, 6)).astype(np.float32)
    img = nib.Nifti1Image(data, affine_for(axcodes, (1.0, 0.7, 2.5), (3.0, 4.0, -5.0), small_rotation()))
    r = to_rpi(img)
    assert np.array_equal(r.to_native(r.data), data)
    check_consistent(img, r, rng)


def test_to_native_of_other_arrays():
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine_for(("P", "I", "R"), (1, 2, 3), (0, 0, 0)))
    r = to_rpi(img)
    assert r.shape == (5, 3, 4)
    mask = np.zeros(r.shape, np.uint8)
    mask[4, 0, 1] = 1
    native = r.to_native(mask)
    assert native.dtype == np.uint8 and native.shape == (3, 4, 5)
    # RPI (4, 0, 1) -> native via the exact point map.
    i, j, k = r.points_to_native([[4, 0, 1]])[0].astype(int)
    assert native[i, j, k] == 1 and native.sum() == 1
    # Extra trailing axes (e.g. channels) are carried along.
    stacked = np.stack([mask, 2 * mask], axis=-1)
    assert r.to_native(stacked).shape == (3, 4, 5, 2)
    with pytest.raises(ValueError):
        r.to_native(np.zeros((3, 4, 5)))


def test_data_is_a_copy():
    data = np.ones((2, 3, 4), np.float32)
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 1.0, 1.0]))  # already LAS
    r = to_rpi(img)
    assert np.array_equal(r.affine, img.affine)
    r.data[0, 0, 0] = 7
    assert data[0, 0, 0] == 1


def test_real_psr_image():
    path = SHARED / "sct_testing" / "t2" / "t2.nii.gz"
    if not path.exists():
        pytest.skip(f"shared data file {path} is not available")
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    r = to_rpi(img)
    assert r.shape == (52, 60, 55)  # P,S,R axes of 60,55,52 -> L,A,S
    assert np.array_equal(r.to_native(r.data), img.get_fdata(dtype=np.float32))
    check_consistent(nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine), r, np.random.default_rng(0))

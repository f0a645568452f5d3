"""Reorientation to the working space and back.

The working space ("RPI" in the Spinal Cord Toolbox's naming) has nibabel
axis codes ('L', 'A', 'S'): axis 0 runs right->left, axis 1 posterior->anterior,
axis 2 inferior->superior, so axial slices are [:, :, z]. Only axis flips and
transposes are used (never interpolation), which makes the way back to the
native voxel order exact. Oblique images are mapped to the closest axes, as
nibabel's io_orientation decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

__all__ = ["RPI_CODES", "Reoriented", "to_rpi", "reorient_array", "rpi_transform"]

RPI_CODES = ("L", "A", "S")
_RPI_ORNT = axcodes2ornt(RPI_CODES)


def rpi_transform(affine) -> np.ndarray:
    """The nibabel orientation transform from a native voxel grid to RPI."""
    return ornt_transform(io_orientation(np.asarray(affine, dtype=float)), _RPI_ORNT)


def reorient_array(array, transform) -> np.ndarray:
    """Apply an orientation transform to the first three axes; C-contiguous result."""
    return np.ascontiguousarray(apply_orientation(np.asanyarray(array), transform))


@dataclass(frozen=True, eq=False)
class Reoriented:
    """An image in the RPI working space plus the exact way back.

    data: float32 (nx, ny, nz) in RPI voxel order (a copy, never a view of the input).
    affine: maps RPI voxel indices to the same scanner coordinates as the native affine.
    zooms: voxel sizes (sx, sy, sz) in mm along the RPI axes.
    native_shape, native_affine: the input grid.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple
    native_shape: tuple
    native_affine: np.ndarray
    transform: np.ndarray  # native -> RPI, nibabel ornt transform

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[:3])

    @property
    def inverse_transform(self) -> np.ndarray:
        return ornt_transform(_RPI_ORNT, io_orientation(self.native_affine))

    def to_native(self, array) -> np.ndarray:
        """Map an array on the RPI grid (extra trailing axes allowed) to the native voxel order."""
        array = np.asanyarray(array)
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array shape {array.shape[:3]} is not the RPI grid's {self.shape}")
        return reorient_array(array, self.inverse_transform)

    def from_native(self, array) -> np.ndarray:
        """Map an array on the native grid (e.g. a reference mask) to the RPI voxel order."""
        array = np.asanyarray(array)
        if tuple(array.shape[:3]) != tuple(self.native_shape):
            raise ValueError(f"array shape {array.shape[:3]} is not the native grid's {tuple(self.native_shape)}")
        return reorient_array(array, self.transform)

    def _rpi_to_native_matrix(self) -> np.ndarray:
        # A signed permutation plus offsets; rounding removes float noise so
        # integer voxel indices map to integer voxel indices exactly.
        return np.rint(np.linalg.inv(self.native_affine) @ self.affine)

    def points_to_native(self, ijk) -> np.ndarray:
        """RPI voxel coordinates (n, 3) -> native voxel coordinates (n, 3), exactly."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        m = self._rpi_to_native_matrix()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def points_from_native(self, ijk) -> np.ndarray:
        """Native voxel coordinates (n, 3) -> RPI voxel coordinates (n, 3), exactly."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        m = np.rint(np.linalg.inv(self._rpi_to_native_matrix()))
        return ijk @ m[:3, :3].T + m[:3, 3]


def to_rpi(img) -> Reoriented:
    """Reorient a 3D nibabel image to RPI by flips and transposes only."""
    native_affine = np.asarray(img.affine, dtype=float)
    native_shape = tuple(int(n) for n in img.shape[:3])
    if len(img.shape) != 3:
        raise ValueError(f"to_rpi needs a 3D image, got shape {img.shape}")
    transform = rpi_transform(native_affine)
    data = np.asanyarray(img.dataobj)
    data = np.array(apply_orientation(data, transform), dtype=np.float32, order="C", copy=True)
    affine = native_affine @ inv_ornt_aff(transform, native_shape)
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Reoriented(
        data=data,
        affine=affine,
        zooms=zooms,
        native_shape=native_shape,
        native_affine=native_affine,
        transform=transform,
    )

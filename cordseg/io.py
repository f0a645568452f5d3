"""Reading and writing NIfTI images.

Everything a user can get wrong about an input file ends here as an
`InputError` whose message is one sentence naming the file and the problem;
everything that goes wrong while writing ends as an `OutputError`. Outputs are
written on the input's grid (shape, affine, qform/sform and their codes) and
atomically, so a failed run never leaves a partial file behind.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import CordsegWarning, InputError, OutputError

__all__ = ["load_image", "save_like", "default_output_path", "nifti_stem", "staged_outputs", "same_file", "file_key"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_FORM_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}

# What one image may claim before anything is allocated. A spinal cord scan has a few million voxels
# (384x384x52 is 7.7 million) and a field of view well under a metre; an image beyond these limits would take
# gigabytes in the working copies the pipeline makes, so it is refused with a sentence instead.
MAX_VOXELS = 2**27  # per volume: 512 MB as float32
MAX_FOV_MM = 1200.0  # along any axis
_NAME_MAX = 255  # bytes in one file name on the usual file systems


@contextmanager
def quiet_nibabel():
    """nibabel's header-repair log lines (\"sizeof_hdr should be 348\"...) silenced: the checks here say what
    matters, in cordseg's own words."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def nifti_stem(path) -> str:
    """File name without .nii.gz / .nii (any case); other names lose nothing."""
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_suffix(path) -> str | None:
    name = Path(path).name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


# --------------------------------------------------------------------------- load


def load_image(src, *, volume: int | None = None) -> nib.Nifti1Image:
    """Read and validate one 3D image.

    `src` is a path (str / os.PathLike) or a nibabel image. `volume` is the
    0-based index of the volume to take from a 4D image, or "mean" for the mean
    of its volumes (see mean_volumes: a diffusion series gives its mean
    diffusion-weighted image); a 4D image with several volumes and no `volume`
    is refused (the message gives the count).
    A 2D image is taken as a single axial slice (a third axis of length 1).

    Returns a NIfTI image (Nifti2 stays Nifti2) whose data is float32 with
    scl_slope/scl_inter applied, NaN/Inf replaced by 0 (with a CordsegWarning),
    and whose header is the input's, so qform/sform and their codes survive.

    Orientation headers: when one of qform/sform is broken (an invalid
    quaternion, a singular or non-finite matrix) and the other one is valid
    and coded, the valid one is used, the broken one is rewritten from it
    (keeping its code) and a CordsegWarning says so; when no usable
    orientation is left, InputError.
    """
    with quiet_nibabel():
        return _load_image(src, volume)


def _load_image(src, volume):
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        img = _read_path(Path(src), name)
    elif isinstance(src, nib.spatialimages.SpatialImage):
        name = img_name(src)
        img = src
    else:
        raise InputError(f"expected a NIfTI file path or a nibabel image, not {type(src).__name__}")

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        if isinstance(src, nib.spatialimages.SpatialImage):
            # In-memory images of other formats (MGH, Analyze...) carry a usable affine.
            img = _as_nifti(img, name)
        else:
            raise InputError(f"{name}: not a NIfTI image (found {type(img).__name__}).")

    _check_dtype(img, name)
    shape, vol_index = _check_shape(img, name, volume)
    header = img.header.copy()
    affine = _checked_affine(header, name)
    _check_extent(shape, affine, name)
    if vol_index == "mean":
        data, used = _mean_data(img, name, src)
    else:
        data, used = _read_data(img, name, vol_index), None
    data = data.reshape(shape)
    data = _finite(data, name)

    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)  # data already scaled
    # outputs take the input's own shape back (a 2D slice stays 2D, a one-volume 4D stays 4D)
    kept = tuple(int(n) for n in input_shape(img))  # (an image read here before keeps its file's shape)
    extra = {"cordseg_shape": kept if np.prod(kept) == data.size else shape}
    if used is not None:
        extra["cordseg_volumes"] = used
    out = type(img)(data, affine, header, extra=extra)
    # The header's own forms were kept (or repaired) above; make sure nibabel
    # did not replace them because of float round-off in its comparison.
    _copy_forms(header, out.header)
    return out


def input_shape(img) -> tuple:
    """The shape of the file `img` was read from by load_image (2D, 3D, or 4D with one volume): outputs are
    written back in it. Images not read by load_image: their own shape."""
    extra = getattr(img, "extra", None) or {}
    return tuple(extra.get("cordseg_shape", img.shape))


def _check_extent(shape, affine, name: str) -> None:
    """Refuse, before any voxel is read, what would need memory out of proportion to a scan."""
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_VOXELS:
        raise InputError(
            f"{name}: the header claims {'x'.join(map(str, shape))} voxels ({n:,}, {_size(4 * n)} as float32); "
            f"cordseg reads at most {MAX_VOXELS:,} voxels per volume. Crop the image around the spinal cord."
        )
    zooms = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    fov = zooms * np.asarray(shape, float)
    if np.any(fov > MAX_FOV_MM):
        axis = int(np.argmax(fov))
        raise InputError(
            f"{name}: a field of view of {fov[axis]:.0f} mm along axis {axis} ({shape[axis]} voxels of "
            f"{zooms[axis]:g} mm) is implausible for a scan (at most {MAX_FOV_MM:.0f} mm); check the voxel sizes "
            "in the header."
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


def img_name(img, default: str = "the input image") -> str:
    """A name for an image (or a path) in messages: its file name if it has one, else `default`."""
    if isinstance(img, (str, os.PathLike)):
        return str(img)
    try:
        filename = img.get_filename()
    except Exception:  # noqa: BLE001 - images without a file map
        filename = None
    return str(filename) if filename else default


def _read_path(path: Path, name: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{name}: file not found.") from None
    except OSError as exc:  # a symbolic link loop, a name too long, a folder we may not enter...
        raise InputError(f"{name}: cannot be read ({exc.strerror or _short(exc)}).") from None
    except ValueError as exc:  # an embedded NUL byte
        raise InputError(f"{name}: not a valid file name ({_short(exc)}).") from None
    if os.path.isdir(path):
        raise InputError(f"{name}: is a folder, not a NIfTI file.")
    size = st.st_size
    if size == 0:
        raise InputError(f"{name}: the file is empty (0 bytes).")
    if _nifti_suffix(path) is None:
        raise InputError(f"{name}: not a NIfTI file (expected a name ending in .nii or .nii.gz).")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: permission denied, the file cannot be read.")
    try:
        with warnings.catch_warnings():
            # nibabel's own header grumbles are not the user's business here;
            # the real problems are checked below.
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            raw = _raw_header(img, path)
    except MemoryError:
        raise InputError(f"{name}: not enough memory to read the header.") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input
        raise InputError(f"{name}: not a readable NIfTI file ({_short(exc)}).") from exc
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        _check_raw_zooms(raw, name)
        _check_data_size(img, path, size, name)
    return img


def _raw_header(img, path: Path):
    """The header as stored, before nibabel's repairs (which, e.g., turn a voxel size of 0 into 1)."""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return None
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path), "rb") as fobj:
        return type(img).header_class.from_fileobj(fobj, check=False)


def _check_raw_zooms(raw, name: str) -> None:
    if raw is None:
        return
    ndim = int(raw["dim"][0])
    zooms = np.asarray(raw["pixdim"][1:1 + min(max(ndim, 1), 3)], float)
    if np.all(np.isfinite(zooms) & (zooms != 0)):
        return
    if int(raw["sform_code"]) > 0 and _affine_ok(raw.get_sform()):
        return  # the sform gives the grid on its own
    raise InputError(f"{name}: the voxel sizes in the header are zero or invalid "
                     f"({', '.join(f'{z:g}' for z in zooms)} mm) and no sform gives them.")


def _check_data_size(img, path: Path, size: int, name: str) -> None:
    """The voxel data the header claims, against what the file holds (read in a bounded way for gzip)."""
    shape = tuple(int(n) for n in img.shape)
    per_volume = int(np.prod(shape[:3], dtype=np.int64))
    if per_volume > MAX_VOXELS:
        raise InputError(
            f"{name}: the header claims {'x'.join(map(str, shape))} voxels ({per_volume:,} per volume, "
            f"{_size(4 * per_volume)} as float32); cordseg reads at most {MAX_VOXELS:,} voxels per volume. "
            "Crop the image around the spinal cord."
        )
    need = int(img.header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * img.get_data_dtype().itemsize
    if _nifti_suffix(path) == ".nii.gz":
        held = _gzip_size_at_least(path, need)
    else:
        held = size
    if held < need:
        unpacked = " once uncompressed" if _nifti_suffix(path) == ".nii.gz" else ""
        raise InputError(f"{name}: the file is truncated: the header claims {_size(need)} of header and voxels, "
                         f"the file holds {_size(held)}{unpacked}.")


def _gzip_size_at_least(path: Path, need: int, chunk: int = 1 << 20) -> int:
    """`need` if the gzip file inflates to at least `need` bytes, else how much it inflates to. The trailer's
    length is trusted when it says enough; otherwise the stream is inflated in bounded pieces and counted."""
    count = 0
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if need < 2**32 and int.from_bytes(fh.read(4), "little") >= need:
                return need
            fh.seek(0)
            d, data = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
            while count < need:
                if not data:
                    data = fh.read(chunk)
                    if not data:
                        break
                count += len(d.decompress(data, chunk))
                data = d.unconsumed_tail
                if d.eof:  # another gzip member may follow
                    data, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
    except (OSError, zlib.error, EOFError):
        pass
    return min(count, need)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _as_nifti(img, name: str):
    try:
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=float)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{name}: cannot read the image data ({_short(exc)}).") from exc
    out = nib.Nifti1Image(data, affine)
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    return out


def _check_dtype(img, name: str) -> None:
    dtypes = [img.get_data_dtype()]
    dataobj = img.dataobj
    if isinstance(dataobj, np.ndarray):
        dtypes.append(dataobj.dtype)
    for dt in dtypes:
        dt = np.dtype(dt)
        if dt.fields is not None or dt.kind == "V":
            raise InputError(
                f"{name}: colour (RGB) voxels are not supported; convert the image to a greyscale scalar image."
            )
        if dt.kind == "c":
            raise InputError(f"{name}: complex voxels are not supported; give the magnitude image instead.")
        if dt.kind not in "biuf":
            raise InputError(f"{name}: voxel type {dt} is not a real numeric type.")


def _check_shape(img, name: str, volume):
    """Return the 3D shape the data takes and the 4th-axis index to read (or None)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 2:
        raise InputError(f"{name}: has {len(shape)} dimension(s); a 3D image is needed.")
    if any(n == 0 for n in shape):
        raise InputError(f"{name}: has a zero-length dimension (shape {'x'.join(map(str, shape))}).")
    if len(shape) > 4:
        if any(n != 1 for n in shape[4:]):
            raise InputError(
                f"{name}: has {len(shape)} dimensions (shape {'x'.join(map(str, shape))}); a 3D image is needed."
            )
        shape = shape[:4]
    if volume == "mean":
        if len(shape) == 4:
            return shape[:3], "mean"
        return (shape + (1,), None) if len(shape) == 2 else (shape, None)  # a 3D image is its own mean
    if volume is not None:
        if isinstance(volume, bool) or not isinstance(volume, (int, np.integer)):
            raise InputError(f"{name}: the volume index must be an integer or 'mean', not {volume!r}.")
        volume = int(volume)
    if len(shape) == 4:
        n_vol = shape[3]
        if volume is None:
            if n_vol == 1:
                return shape[:3], 0
            raise InputError(
                f"{name}: is a 4D image with {n_vol} volumes; choose one with the volume option "
                f"(0-based, 0 to {n_vol - 1}, or 'mean')."
            )
        if not 0 <= volume < n_vol:
            raise InputError(
                f"{name}: volume {volume} does not exist; the image has {n_vol} volumes (0-based, 0 to {n_vol - 1})."
            )
        return shape[:3], volume
    if volume not in (None, 0):
        raise InputError(f"{name}: volume {volume} does not exist; the image is 3D (only volume 0).")
    if len(shape) == 2:
        return shape + (1,), None
    return shape, None


def _affine_ok(affine) -> bool:
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        return False
    rzs = a[:3, :3]
    norms = np.sqrt((rzs**2).sum(axis=0))
    if np.any(norms < 1e-6):
        return False
    # Degenerate (coplanar) axes: the determinant is tiny relative to the zooms.
    return abs(np.linalg.det(rzs)) > 1e-6 * float(np.prod(norms))


def _qform_ok(header):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = header.get_qform()
    except Exception:  # noqa: BLE001 - nibabel raises ValueError for b²+c²+d² > 1
        return None
    return q if _affine_ok(q) else None


def _checked_affine(header, name: str) -> np.ndarray:
    """Validate (and if possible repair, in place) the header's orientation; return the affine to use."""
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    qform = _qform_ok(header)
    sform = header.get_sform()
    sform = sform if _affine_ok(sform) else None

    if scode > 0 and sform is not None:
        if qform is None:
            # Rewrite the broken quaternion from the sform so that outputs
            # written on this grid carry two consistent, valid forms.
            header.set_qform(sform, code=qcode)
            if qcode > 0:
                warnings.warn(
                    f"{name}: the qform header is invalid (broken quaternion); using the sform "
                    f"(code {scode}, {_FORM_CODES.get(scode, '?')}) and rewriting the qform from it.",
                    CordsegWarning,
                    stacklevel=3,
                )
        return sform
    if scode > 0:  # sform coded but unusable
        if qcode > 0 and qform is not None:
            header.set_sform(qform, code=scode)
            warnings.warn(
                f"{name}: the sform header is invalid (singular or not finite); using the qform instead.",
                CordsegWarning,
                stacklevel=3,
            )
            return qform
        raise InputError(f"{name}: the orientation header is broken (neither the sform nor the qform is usable).")
    if qcode > 0:
        if qform is not None:
            return qform
        raise InputError(
            f"{name}: the orientation header is broken (invalid qform quaternion and no sform to fall back on)."
        )
    # Neither form coded: nibabel falls back on the voxel sizes alone.
    base = header.get_base_affine()
    if not _affine_ok(base):
        raise InputError(f"{name}: the voxel sizes in the header are zero or invalid.")
    if qform is None:
        header.set_qform(base, code=0)
    warnings.warn(
        f"{name}: the header has no orientation (qform and sform codes are 0); assuming the voxel axes are "
        "left-right, posterior-anterior, inferior-superior.",
        CordsegWarning,
        stacklevel=3,
    )
    return base


def _read_data(img, name: str, vol_index) -> np.ndarray:
    try:
        if vol_index is None:
            data = np.asanyarray(img.dataobj)
        else:
            dataobj = img.dataobj
            index = (slice(None),) * 3 + (vol_index,) + (0,) * (len(img.shape) - 4)
            data = np.asanyarray(dataobj[index])
    except MemoryError:
        raise InputError(f"{name}: not enough memory to read the image data.") from None
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data blocks
        raise InputError(f"{name}: the image data cannot be read; the file may be truncated ({_short(exc)}).") from exc
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            # Always a copy: the caller's in-memory array must never be modified or shared.
            return np.array(data, dtype=np.float32)
    except MemoryError:
        raise InputError(f"{name}: not enough memory to read the image data.") from None


# Without b-values, the volumes of a diffusion series brighter than this times the median volume are its
# b = 0 images (about twice as bright as the diffusion-weighted ones); other series' volumes are alike.
B0_BRIGHTNESS = 1.5


def mean_volumes(means, bvals=None) -> tuple[np.ndarray, str]:
    """Which volumes of a 4D series enter its mean, and why: (boolean mask, one-line description).

    With b-values (one per volume), those above 50 s/mm² (the diffusion-weighted images); else the volumes
    whose mean brightness is at most B0_BRIGHTNESS times the median volume's (a diffusion series' b = 0
    images are left out, every volume of a series without such outliers is kept)."""
    means = np.asarray(means, float)
    n = means.size
    if bvals is not None and len(bvals) == n and (np.asarray(bvals) > 50).any():
        keep = np.asarray(bvals) > 50
        return keep, f"mean of the {int(keep.sum())} of {n} volumes with b > 50 (from the .bval file)"
    keep = means <= B0_BRIGHTNESS * np.median(means)
    if keep.all():
        return keep, f"mean of all {n} volumes"
    return keep, (f"mean of {int(keep.sum())} of {n} volumes (the {n - int(keep.sum())} more than "
                  f"{B0_BRIGHTNESS:g} times brighter than the median volume taken for b = 0 images)")


def _read_bvals(src, n):
    """The b-values in the .bval file beside `src` (a path), or None."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    path = Path(src).with_name(nifti_stem(src) + ".bval")
    try:
        values = np.array(path.read_text().split(), float)
    except (OSError, ValueError):
        return None
    return values if values.size == n else None


def _mean_data(img, name, src):
    """(the mean of a 4D image's chosen volumes, what was averaged)."""
    data = _read_data(img, name, None)
    data = _finite(data.reshape(data.shape[:4]), name)  # zeroed in place (a copy already), with the warning
    keep, used = mean_volumes(data.mean(axis=(0, 1, 2)), _read_bvals(src, data.shape[3]))
    return data[..., keep].mean(axis=3, dtype=np.float64).astype(np.float32), used


def _finite(data: np.ndarray, name: str) -> np.ndarray:
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        data[bad] = 0.0
        warnings.warn(
            f"{name}: {n_bad} voxel(s) were NaN or infinite and were set to 0.", CordsegWarning, stacklevel=3
        )
    return np.ascontiguousarray(data, dtype=np.float32)


def _copy_forms(src_hdr, dst_hdr) -> None:
    """Copy the raw qform/sform fields (exact bits, both codes)."""
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        dst_hdr[key] = src_hdr[key]
    pixdim = dst_hdr["pixdim"].copy()
    pixdim[:4] = src_hdr["pixdim"][:4]  # qfac and the three zooms
    dst_hdr["pixdim"] = pixdim


# --------------------------------------------------------------------------- save


def save_like(data, reference_img, path, *, dtype=np.uint8) -> Path:
    """Write `data` on `reference_img`'s grid to `path`, atomically.

    The output has the reference's shape, affine, qform and sform with their
    codes. `dtype` is the stored type: np.uint8 for masks (values are rounded
    and must fit), np.float32 for soft maps; scaling is reset so the values
    are stored as given. The file is written to a temporary name in the target
    folder and renamed into place; on any failure no file is left and an
    OutputError is raised. Returns the path written.
    """
    path = Path(path)
    arr, suffix = _checked_output(data, reference_img, path, dtype)
    _atomic_write(image_like(arr, reference_img), path, suffix)
    return path


def _checked_output(data, reference_img, path: Path, dtype):
    """(data cast to `dtype`, the name's NIfTI suffix), or OutputError before anything is written."""
    check_output_name(path)
    ref_shape = tuple(int(n) for n in reference_img.shape)
    arr = np.asanyarray(data)
    if arr.shape != ref_shape:
        raise OutputError(
            f"{path}: the data to write has shape {arr.shape}, not the reference grid's {ref_shape}."
        )
    suffix = _nifti_suffix(path)
    if suffix is None:
        raise OutputError(f"{path}: the output file name must end in .nii or .nii.gz.")
    arr = _cast(arr, np.dtype(dtype), path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the output folder {folder} does not exist.")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give an output file name.")
    return arr, suffix


GRID_ATOL_MM = 1e-3  # affines closer than this are the same grid (float32 header round-off)


def same_grid(a_affine, a_shape, b_affine, b_shape) -> bool:
    """True when two images share one voxel grid: same shape and the same affine up to header round-off."""
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, atol=GRID_ATOL_MM, rtol=0)


def image_like(arr: np.ndarray, reference_img):
    """An in-memory image of `arr` (stored as its own dtype) on `reference_img`'s grid: same affine, qform
    and sform with their codes (exact header bits); scaling reset so values are stored as given."""
    with quiet_nibabel():
        return _image_like(arr, reference_img)


def _image_like(arr, reference_img):
    ref_hdr = reference_img.header
    cls = nib.Nifti2Image if isinstance(reference_img, nib.Nifti2Image) else nib.Nifti1Image
    if isinstance(reference_img, (nib.Nifti1Image, nib.Nifti2Image)):
        header = cls.header_class.from_header(ref_hdr)
    else:
        header = None
    img = cls(arr, np.asarray(reference_img.affine, dtype=float), header)
    hdr = img.header
    if header is not None:
        _copy_forms(ref_hdr, hdr)
    hdr.set_data_dtype(arr.dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr.set_intent("none")
    hdr["descrip"] = b"cordseg"
    return img


def _cast(arr: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    if dtype.kind in "iu":
        values = np.asarray(arr)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)):
                raise OutputError(f"{path}: the data holds NaN or infinite values and cannot be stored as {dtype}.")
            values = np.rint(values)
        if values.size:
            info = np.iinfo(dtype)
            lo, hi = values.min(), values.max()
            if lo < info.min or hi > info.max:
                raise OutputError(f"{path}: values {lo}..{hi} do not fit the output type {dtype}.")
        return np.ascontiguousarray(values, dtype=dtype)
    if dtype.kind == "f":
        return np.ascontiguousarray(arr, dtype=dtype)
    raise OutputError(f"{path}: cannot write voxels of type {dtype}.")


def write_bytes_atomic(data: bytes, path) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename (never a partial
    file); permissions 0644. Errors -> OutputError."""
    path = Path(path)
    _replace_atomically(path, ".tmp", lambda tmp: _write_file(tmp, data))
    return path


def _write_file(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)


def _atomic_write(img, path: Path, suffix: str) -> None:
    # nibabel picks the compression from the name, so the temporary file keeps the output's suffix
    _replace_atomically(path, suffix, lambda tmp: nib.save(img, str(tmp)))


def _temp_name(path: Path, suffix: str) -> Path:
    """A new hidden name beside `path` for its temporary file, no longer than a file name may be (the
    output's own name is shortened in it when needed, so a name of 240 characters can still be written)."""
    tail = f".{secrets.token_hex(4)}.tmp{suffix}"
    room = _NAME_MAX - 1 - len(tail.encode())
    base = path.name.encode()[:room].decode("utf-8", "ignore")
    return path.parent / f".{base}{tail}"


def _new_temp(path: Path, suffix: str) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    for _ in range(100):
        candidate = _temp_name(path, suffix)
        try:
            # O_EXCL: never clobber someone else's file; mode 0o666 lets the
            # umask decide the final permissions as for a normal file.
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise OutputError(f"{path}: cannot create a temporary file in {folder}.")  # pragma: no cover


@contextmanager
def _output_errors(path: Path):
    """Any failure while writing `path` as an OutputError naming it."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        yield
    except OutputError:
        raise
    except PermissionError as exc:
        raise OutputError(f"{path}: permission denied, cannot write in {folder}.") from exc
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or _short(exc)}).") from exc
    except Exception as exc:  # noqa: BLE001 - nibabel errors while encoding
        raise OutputError(f"{path}: cannot be written ({_short(exc)}).") from exc


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _replace_atomically(path: Path, suffix: str, write) -> None:
    """`write(tmp)` to a new temporary file beside `path`, then rename it onto `path`; on any failure (an
    interruption included) the temporary file is removed, `path` is untouched and an OutputError is raised."""
    with staged_outputs() as stage:
        stage.write(path, suffix, write)


class Staged:
    """Outputs written to temporary files beside their targets, renamed into place together by commit():
    either every output of a run appears, or none (see staged_outputs)."""

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []  # (temporary file, target)
        self._temps: list[Path] = []

    def write(self, path, suffix: str, write) -> Path:
        """`write(tmp)` to a new temporary file for `path` (`suffix`: the name's end that writers read the
        format from, e.g. ".nii.gz", ".png"); renamed onto `path` at commit()."""
        path = Path(path)
        with _output_errors(path):
            tmp = None
            try:
                tmp = _new_temp(path, suffix)
                self._temps.append(tmp)
                write(tmp)
            except BaseException:
                if tmp is not None:
                    _remove(tmp)
                raise
        self._pending.append((tmp, path))
        return path

    def image(self, data, reference_img, path, *, dtype=np.uint8) -> Path:
        """save_like(), staged."""
        path = Path(path)
        arr, suffix = _checked_output(data, reference_img, path, dtype)
        img = image_like(arr, reference_img)
        return self.write(path, suffix, lambda tmp: nib.save(img, str(tmp)))

    def bytes(self, data: bytes, path) -> Path:
        """write_bytes_atomic(), staged."""
        return self.write(path, ".tmp", lambda tmp: _write_file(tmp, data))

    def commit(self) -> None:
        done = []
        try:
            for tmp, target in self._pending:
                with _output_errors(target):
                    os.replace(tmp, target)
                done.append(target)
        except BaseException:
            for target in done:  # all or nothing: what this run already put in place goes too
                _remove(target)
            raise
        finally:
            self.discard()

    def discard(self) -> None:
        for tmp in self._temps:
            _remove(tmp)
        self._temps, self._pending = [], []


@contextmanager
def staged_outputs():
    """A Staged set of outputs: committed when the block ends normally; on any exception (an interruption
    included) every temporary file is removed and no target is touched."""
    stage = Staged()
    try:
        yield stage
    except BaseException:
        stage.discard()
        raise
    stage.commit()


# --------------------------------------------------------------------------- paths


def default_output_path(input_path, out, suffix) -> Path:
    """Where an output goes.

    out None -> ./<stem><suffix>.nii.gz in the current folder; out an existing
    folder -> <folder>/<stem><suffix>.nii.gz; otherwise `out` as given.
    `stem` is the input's file name without .nii.gz/.nii. Refuses (OutputError)
    a path that is the input file itself.
    """
    stem = nifti_stem(input_path) if input_path is not None else "image"
    name = f"{stem}{suffix}.nii.gz"
    if out is None:
        target = Path.cwd() / name
    else:
        out = check_output_name(out)
        target = out / name if os.path.isdir(out) else out
    check_output_name(target)
    if input_path is not None and same_file(input_path, target):
        raise OutputError(f"{target}: refusing to overwrite the input image; choose another output name.")
    return target


def same_file(a, b) -> bool:
    """True when paths `a` and `b` name one file: the same inode when both exist (hard links, symbolic links,
    case-insensitive file systems), else the same resolved path. Never raises."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def file_key(path) -> list:
    """Keys under which `path` is the same file as another: its (device, inode) when it exists, and its
    resolved path (for files still to be written). Never raises."""
    keys = []
    try:
        st = os.stat(path)
        keys.append(("inode", st.st_dev, st.st_ino))
    except (OSError, ValueError):
        pass
    try:
        keys.append(("path", os.path.normcase(os.path.realpath(path))))
    except (OSError, ValueError, RuntimeError):
        keys.append(("path", os.path.normcase(os.path.abspath(path))))
    return keys


def check_output_name(path) -> Path:
    """OutputError unless `path` is a name a file can be written under: each part at most 255 bytes, not a
    symbolic link loop."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise OutputError(f"{str(path)[:60]}...: a file or folder name is longer than {_NAME_MAX} bytes.")
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise OutputError(f"{path}: cannot be written ({exc.strerror}).") from None
    except ValueError as exc:
        raise OutputError(f"{path}: not a valid file name ({_short(exc)}).") from None
    return path

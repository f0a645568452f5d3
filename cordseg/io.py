"""Reading and writing NIfTI images.

Everything a user can get wrong about an input file ends here as an
`InputError` whose message is one sentence naming the file and the problem;
everything that goes wrong while writing ends as an `OutputError`. Outputs are
written on the input's grid (shape, affine, qform/sform and their codes) and
atomically, so a failed run never leaves a partial file behind.
"""
from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import CordsegWarning, InputError, OutputError

__all__ = ["load_image", "save_like", "default_output_path", "nifti_stem"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_FORM_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}


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
    0-based index of the volume to take from a 4D image; a 4D image with
    several volumes and no `volume` is refused (the message gives the count).
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
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        img = _read_path(Path(src), name)
    elif isinstance(src, nib.spatialimages.SpatialImage):
        name = img_name(src)
        img = src
    else:
        raise TypeError(f"load_image expects a file path or a nibabel image, not {type(src).__name__}")

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
    data = _read_data(img, name, vol_index)
    data = data.reshape(shape)
    data = _finite(data, name)

    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)  # data already scaled
    out = type(img)(data, affine, header)
    # The header's own forms were kept (or repaired) above; make sure nibabel
    # did not replace them because of float round-off in its comparison.
    _copy_forms(header, out.header)
    return out


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
    if not path.exists():
        raise InputError(f"{name}: file not found.")
    if path.is_dir():
        raise InputError(f"{name}: is a folder, not a NIfTI file.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc}).") from exc
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
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input
        raise InputError(f"{name}: not a readable NIfTI file ({_short(exc)}).") from exc
    return img


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
    if volume is not None:
        if isinstance(volume, bool) or not isinstance(volume, (int, np.integer)):
            raise InputError(f"{name}: the volume index must be an integer, not {volume!r}.")
        volume = int(volume)
    if len(shape) == 4:
        n_vol = shape[3]
        if volume is None:
            if n_vol == 1:
                return shape[:3], 0
            raise InputError(
                f"{name}: is a 4D image with {n_vol} volumes; choose one with the volume option "
                f"(0-based, 0 to {n_vol - 1})."
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
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data blocks
        raise InputError(f"{name}: the image data cannot be read; the file may be truncated ({_short(exc)}).") from exc
    with np.errstate(over="ignore", invalid="ignore"):
        # Always a copy: the caller's in-memory array must never be modified or shared.
        return np.array(data, dtype=np.float32)


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

    _atomic_write(image_like(arr, reference_img), path, suffix)
    return path


GRID_ATOL_MM = 1e-3  # affines closer than this are the same grid (float32 header round-off)


def same_grid(a_affine, a_shape, b_affine, b_shape) -> bool:
    """True when two images share one voxel grid: same shape and the same affine up to header round-off."""
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, atol=GRID_ATOL_MM, rtol=0)


def image_like(arr: np.ndarray, reference_img):
    """An in-memory image of `arr` (stored as its own dtype) on `reference_img`'s grid: same affine, qform
    and sform with their codes (exact header bits); scaling reset so values are stored as given."""
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

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)

    _replace_atomically(path, ".tmp", write)
    return path


def _atomic_write(img, path: Path, suffix: str) -> None:
    # nibabel picks the compression from the name, so the temporary file keeps the output's suffix
    _replace_atomically(path, suffix, lambda tmp: nib.save(img, str(tmp)))


def _replace_atomically(path: Path, suffix: str, write) -> None:
    """`write(tmp)` to a new temporary file beside `path`, then rename it onto `path`; on any failure the
    temporary file is removed, `path` is untouched and an OutputError is raised."""
    folder = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        for _ in range(100):
            candidate = folder / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
            try:
                # O_EXCL: never clobber someone else's file; mode 0o666 lets the
                # umask decide the final permissions as for a normal file.
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            os.close(fd)
            tmp = candidate
            break
        else:  # pragma: no cover - 100 random collisions
            raise OutputError(f"{path}: cannot create a temporary file in {folder}.")
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OutputError:
        raise
    except PermissionError as exc:
        raise OutputError(f"{path}: permission denied, cannot write in {folder}.") from exc
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or _short(exc)}).") from exc
    except Exception as exc:  # noqa: BLE001 - nibabel errors while encoding
        raise OutputError(f"{path}: cannot be written ({_short(exc)}).") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
        out = Path(out)
        target = out / name if out.is_dir() else out
    if input_path is not None and _same_file(Path(input_path), target):
        raise OutputError(f"{target}: refusing to overwrite the input image; choose another output name.")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve()

"""Labelled volumes from a BIDS dataset: images with their manual cord and lesion masks.

Layout read (the spine-generic / BIDS derivatives convention):
    ROOT/sub-*/[ses-*/]anat/sub-*_{T1w,T2w,T2star,dwi}.nii.gz
    ROOT/derivatives/labels/sub-*/[ses-*/]anat/<image stem>_seg-manual.nii.gz      (cord)
    ROOT/derivatives/labels/sub-*/[ses-*/]anat/<image stem>_lesion-manual.nii.gz   (lesions)
Masks may also sit beside the image. Images without any mask are skipped by `find_labelled`;
`find_lesion_free` takes the T2w/T2star/MTS images whose lesion mask is absent or empty (lesion carving
backgrounds: healthy controls), with their cord mask where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cordseg.io import nifti_stem

SUFFIX_TO_CONTRAST = {"T1w": "t1", "T2w": "t2", "T2star": "t2s", "dwi": "dwi"}
# backgrounds for T2/T2*-weighted lesions (hyper-intense): MT-weighted gradient echo reads as t2s
BACKGROUND_SUFFIXES = {"T2w": "t2", "T2star": "t2s", "MTS": "t2s"}


@dataclass(frozen=True)
class LabelledVolume:
    image: Path
    contrast: str
    cord: Path | None
    lesion: Path | None
    subject: str


def _find_mask(root: Path, image: Path, label: str) -> Path | None:
    rel = image.parent.relative_to(root)
    for folder in (root / "derivatives" / "labels" / rel, image.parent):
        for ext in (".nii.gz", ".nii"):
            cand = folder / f"{nifti_stem(image)}_{label}{ext}"
            if cand.is_file():
                return cand
    return None


def _anat_images(root: Path, suffixes: dict):
    """(image, contrast, subject) for every image under ROOT/sub-*/.../anat/ whose BIDS suffix `suffixes` maps
    to a contrast."""
    for image in sorted(root.glob("sub-*/**/anat/*.nii*")):
        stem = nifti_stem(image)
        contrast = suffixes.get(stem.rsplit("_", 1)[-1])
        if contrast is not None:
            yield image, contrast, stem.split("_", 1)[0]


def find_labelled(root, contrasts=None) -> list[LabelledVolume]:
    """Every image under ROOT/sub-*/ whose BIDS suffix is known and that has a cord or lesion mask."""
    root = Path(root)
    found = []
    for image, contrast, subject in _anat_images(root, SUFFIX_TO_CONTRAST):
        if contrasts and contrast not in contrasts:
            continue
        cord = _find_mask(root, image, "seg-manual")
        lesion = _find_mask(root, image, "lesion-manual")
        if cord is None and lesion is None:
            continue
        found.append(LabelledVolume(image, contrast, cord, lesion, subject))
    return found


def _marks_anything(path: Path) -> bool:
    import nibabel as nib
    import numpy as np

    return bool(np.any(np.asarray(nib.load(str(path)).dataobj)))


def find_lesion_free(root) -> list[LabelledVolume]:
    """Every T2w, T2star or MTS image under ROOT/sub-*/ whose lesion mask is absent or marks nothing (its cord
    mask where one exists; `lesion` is None). Point it at scans known to be lesion-free: an MS scan nobody
    labelled would pass as a background."""
    root = Path(root)
    found = []
    for image, contrast, subject in _anat_images(root, BACKGROUND_SUFFIXES):
        lesion = _find_mask(root, image, "lesion-manual")
        if lesion is not None and _marks_anything(lesion):
            continue
        found.append(LabelledVolume(image, contrast, _find_mask(root, image, "seg-manual"), None, subject))
    return found

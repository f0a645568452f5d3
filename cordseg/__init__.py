"""cordseg: spinal cord and MS lesion segmentation in MRI, on a CPU, in seconds.

    import cordseg
    cord = cordseg.segment_cord("t2.nii.gz")                 # nibabel image on the input grid
    lesions = cordseg.segment_lesions(img, contrast="t2s")
    mask, centerline = cordseg.detect_centerline(img, contrast="t2")
    cordseg.qc.write_qc(img, {"cord": cord}, "t2_seg_qc.png")  # axial views with the outline, PNG

    seg = cordseg.Segmenter("t2")                            # models opened once, for many images
    cords = [seg.cord(path) for path in paths]
"""
from .errors import CordsegError, CordsegWarning, InputError, ModelError, NoCordError, OutputError

__version__ = "0.1.0"


def __getattr__(name):  # heavy modules load on first use, not at import
    if name in ("detect_centerline", "centerline_from_mask", "segment_cord", "segment_lesions", "lesion_table",
                "guess_contrast", "Segmenter"):
        from . import api

        return getattr(api, name)
    if name == "qc":  # (import_module: `from . import qc` would ask this hook for "qc" again)
        import importlib

        return importlib.import_module(".qc", __name__)
    raise AttributeError(f"module 'cordseg' has no attribute {name!r}")


__all__ = ["Segmenter", "detect_centerline", "centerline_from_mask", "segment_cord", "segment_lesions",
           "lesion_table", "guess_contrast", "qc", "CordsegError", "CordsegWarning", "InputError", "ModelError",
           "NoCordError", "OutputError"]

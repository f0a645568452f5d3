"""Where the cord ends below: the conus medullaris, told apart from the nerve roots of the cauda equina.

Below the conus the nerve roots run on in the dural sac; on T1/T2 images they look enough like cord that
CNN1 and OptiC follow them, and CNN2 outlines them as cord. A second CNN2, trained with a dural sac and
roots below the template's conus ("conus" task), marks the cord and not the roots. It runs on the lowest
stretch of the centerline only, and only the slice where its cord ends is used: the centerline (and so
every mask made along it) is cut there when that is clearly above where the centerline ends. The outline
stays the cord model's: the conus network is trained for the end, not for the cord's edge.
"""
from __future__ import annotations

import numpy as np

from .centerline import Centerline
from .segmentation import keep_largest_component, soft_segmentation

REACH_MM = 120.0  # the lowest stretch of the centerline the conus network looks at
MARGIN_MM = 5.0  # cut only where its cord ends at least this far above the centerline's lower end


def cord_extent(cl: Centerline, model, reach_mm: float = REACH_MM, progress=None,
                on_stage=None) -> tuple[int, int, int] | None:
    """(lowest, highest slice of the conus network's cord (its largest component), top slice looked at),
    along the lowest `reach_mm` of the centerline; None where it marks no cord there."""
    dz = float(cl.rpi.zooms[2])
    low = cl.part(cl.z <= cl.z.min() + max(1, int(round(reach_mm / dz))))
    prob = soft_segmentation(low, model, progress, stage="conus", on_stage=on_stage)
    cord = keep_largest_component((prob >= model.threshold).astype(np.uint8))
    zs = np.nonzero(cord.any(axis=(0, 1)))[0]
    return (int(zs.min()), int(zs.max()), int(low.z.max())) if len(zs) else None


def end_at_conus(cl: Centerline, model, *, reach_mm: float = REACH_MM, margin_mm: float = MARGIN_MM,
                 progress=None, on_stage=None) -> Centerline:
    """`cl` without the slices below where the conus network's cord ends, when that is at least `margin_mm`
    above the centerline's lower end; else `cl` itself.

    The whole reach is looked at at once: seen alone, the lowest patch of a scan that runs into the roots
    may hold nothing but roots, which the network then takes for cord; over 120 mm the roots are the smaller
    piece. A cord that does not run up to the top of the reach is not one the network is sure of (the cord
    goes on above the conus): no cut then either."""
    extent = cord_extent(cl, model, reach_mm, progress, on_stage)
    if extent is None:
        return cl
    dz = float(cl.rpi.zooms[2])
    end, top, reach_top = extent
    if (end - int(cl.z.min())) * dz < margin_mm or (reach_top - top) * dz > margin_mm:
        return cl
    return cl.part(cl.z >= end)

"""cordseg.conus: the centerline cut where the conus network's cord ends (known answers on made-up maps)."""
from __future__ import annotations

import numpy as np
import pytest

from cordseg import conus
from cordseg.centerline import Centerline
from cordseg.orientation import to_rpi


def _centerline(nz=80, dz=1.0):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((20, 20, nz), np.float32), np.diag([1.0, 1.0, dz, 1.0]))
    rpi = to_rpi(img)
    z = np.arange(nz)
    return Centerline(z, np.full(nz, 10.0), np.full(nz, 10.0), rpi)


class _Model:
    threshold = 0.5


@pytest.fixture
def cord_from(monkeypatch):
    """Make the conus network's map a cord from slice `first` up (None: no cord); records the slices it saw."""
    seen = {}

    def install(first):
        def fake(cl, model, progress=None, stage="", on_stage=None):
            seen["z"] = (int(cl.z.min()), int(cl.z.max()))
            prob = np.zeros(cl.rpi.shape, np.float32)
            if first is not None:
                lo = max(first, int(cl.z.min()))
                prob[8:12, 8:12, lo:int(cl.z.max()) + 1] = 0.9
            return prob
        monkeypatch.setattr(conus, "soft_segmentation", fake)
        return seen
    return install


def test_cut_where_the_conus_network_cord_ends(cord_from):
    cl = _centerline()
    seen = cord_from(30)
    out = conus.end_at_conus(cl, _Model())
    assert out.z.min() == 30 and out.z.max() == 79
    assert np.array_equal(out.x, cl.x[30:]) and out.rpi is cl.rpi
    assert seen["z"] == (0, 79)  # 80 mm: all of it within the reach


def test_no_cut_within_the_margin_or_without_evidence(cord_from):
    cl = _centerline()
    cord_from(4)  # 4 mm above the centerline's end: under the 5 mm margin
    assert conus.end_at_conus(cl, _Model()) is cl
    cord_from(None)  # the network marks no cord: nothing to go by
    assert conus.end_at_conus(cl, _Model()) is cl


def test_margin_and_reach_in_millimetres(cord_from):
    cl = _centerline(nz=100, dz=2.0)  # 2 mm slices
    seen = cord_from(3)  # 6 mm above the end
    assert conus.end_at_conus(cl, _Model()).z.min() == 3
    assert seen["z"] == (0, 60)  # the lowest 120 mm = 60 slices of 2 mm
    cord_from(2)  # 4 mm
    assert conus.end_at_conus(cl, _Model()) is cl


def test_only_the_largest_cord_counts(cord_from, monkeypatch):
    cl = _centerline()

    def fake(c, model, progress=None, stage="", on_stage=None):
        prob = np.zeros(c.rpi.shape, np.float32)
        prob[8:12, 8:12, 40:80] = 0.9  # the cord
        prob[2:4, 2:4, 5:8] = 0.9  # a stray blob below it
        return prob
    monkeypatch.setattr(conus, "soft_segmentation", fake)
    assert conus.end_at_conus(cl, _Model()).z.min() == 40


def test_no_cut_where_the_cord_does_not_run_up_the_reach(monkeypatch):
    """A network that marks a piece of cord in the middle only is not trusted with the end."""
    cl = _centerline()

    def fake(c, model, progress=None, stage="", on_stage=None):
        prob = np.zeros(c.rpi.shape, np.float32)
        prob[8:12, 8:12, 30:60] = 0.9  # ends 19 slices under the top of the reach (79)
        return prob
    monkeypatch.setattr(conus, "soft_segmentation", fake)
    assert conus.end_at_conus(cl, _Model()) is cl


def test_segmenter_asks_the_conus_model_for_t1_and_t2_only(monkeypatch):
    import cordseg
    from cordseg.phantom import make_phantom

    calls = []

    def fake(cl, model, **kwargs):
        calls.append(model.task)
        return cl
    monkeypatch.setattr(conus, "end_at_conus", fake)
    img = make_phantom((40, 40, 30), seed=1).image
    cordseg.Segmenter("t2").centerline(img)
    assert calls == ["conus"]  # the installed conus model serves t1 and t2
    cordseg.Segmenter("t2s").centerline(img)
    cordseg.Segmenter("t2", conus=False).centerline(img)
    assert calls == ["conus"]


def test_segmenter_refuses_a_conus_flag_that_is_not_a_bool():
    import cordseg
    from cordseg.errors import InputError

    with pytest.raises(InputError, match="conus must be True or False"):
        cordseg.Segmenter("t2", conus="no")

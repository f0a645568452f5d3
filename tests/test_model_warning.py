"""A model file can carry a caveat (cordseg_warning) that the runtime shows to users."""
import warnings

import cordseg
from cordseg.inference import Model
from cordseg.phantom import make_phantom


def test_warning_read_from_metadata_and_raised_by_the_api(tmp_path, tiny_onnx):
    flagged = tiny_onnx(tmp_path / "flagged.onnx", task="lesion", input_shape=("N", 48, 48, 48, 1),
                        extra={"cordseg_warning": "not validated"})
    plain = tiny_onnx(tmp_path / "plain.onnx", task="lesion", input_shape=("N", 48, 48, 48, 1))
    assert Model.open(flagged).warning == "not validated"
    assert "WARNING: not validated" in Model.open(flagged).describe()
    assert Model.open(plain).warning is None
    phantom = make_phantom(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cordseg.segment_lesions(phantom.image, contrast="t2", model=flagged)
    assert any(issubclass(w.category, cordseg.CordsegWarning) and "not validated" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cordseg.CordsegWarning)
        cordseg.segment_lesions(phantom.image, contrast="t2", model=plain)

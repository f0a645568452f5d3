"""cordseg.datasets: one place says where the shared real data is; $CORDSEG_SHARED_DATA overrides it."""
from cordseg import datasets


def test_environment_variable_overrides_the_location(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.setenv(datasets.ENV, str(tmp_path / "data"))
    assert datasets.shared_data_dir() == tmp_path / "data"
    assert datasets.shared_data("sct_testing", "t2") == tmp_path / "data" / "sct_testing" / "t2"
    assert datasets.shared_anchors("t2_ctr.h5") == tmp_path / "anchors" / "t2_ctr.h5"


def test_a_missing_folder_is_none_but_paths_still_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV, str(tmp_path / "nowhere"))
    assert datasets.shared_data_dir() is None
    path = datasets.shared_data("README.md")
    assert path == tmp_path / "nowhere" / "README.md" and not path.exists()


def test_default_is_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    found = datasets.shared_data_dir()
    expected = datasets._CHECKOUT.parent / "shared" / "data"
    assert found == (expected if expected.is_dir() else None)

"""Include/exclude lists: plain text and the YAML the QC page exports, one reader."""
import pytest

from cordseg.errors import InputError
from cordseg.selection import parse_selection, read_selection

IMAGES = [
    ("sub-01", None, "sub-01/anat/sub-01_T2w.nii.gz"),
    ("sub-01", None, "sub-01/anat/sub-01_T1w.nii.gz"),
    ("sub-02", "ses-01", "sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz"),
    ("sub-02", "ses-02", "sub-02/ses-02/anat/sub-02_ses-02_T2w.nii.gz"),
    ("sub-03", None, "sub-03/anat/sub-03_acq-MTon_MTS.nii.gz"),
]


def chosen(sel):
    return [rel for sub, ses, rel in IMAGES if sel.matches(sub, ses, rel)]


def test_plain_text_entries_of_every_form():
    sel = parse_selection("# people to leave out\nsub-03\n\nsub-02/ses-02   # moved\nsub-01_T1w.nii.gz\n")
    assert chosen(sel) == [IMAGES[1][2], IMAGES[3][2], IMAGES[4][2]]
    assert len(sel) == 3


def test_relative_and_absolute_paths_and_stems():
    sel = parse_selection("./sub-01/anat/sub-01_T2w.nii.gz\n/data/study/sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz\n"
                          "sub-03_acq-MTon_MTS\n")
    assert chosen(sel) == [IMAGES[0][2], IMAGES[2][2], IMAGES[4][2]]


def test_a_path_elsewhere_does_not_match_by_name():
    sel = parse_selection("sub-09/anat/sub-01_T2w.nii.gz\n")
    assert chosen(sel) == []


def test_yaml_as_the_qc_page_exports_it():
    text = ('# cordseg QC: images marked fail or artifact\n'
            'files:\n'
            '  - sub-01/anat/sub-01_T2w.nii.gz   # fail: cord cut at C3\n'
            '  - "sub-02/ses-02/anat/sub-02_ses-02_T2w.nii.gz"  # artifact: motion\n')
    assert chosen(parse_selection(text)) == [IMAGES[0][2], IMAGES[3][2]]


def test_yaml_keys_flow_lists_and_subject_session_labels():
    text = "subjects:\n- sub-03\nfail: [sub-01_T1w.nii.gz, 'sub-02_ses-01']\nartifact:\n"
    assert chosen(parse_selection(text)) == [IMAGES[1][2], IMAGES[2][2], IMAGES[4][2]]


def test_labels_given_without_prefix_to_matches():
    sel = parse_selection("sub-02/ses-01\n")
    assert sel.matches("02", "01", "sub-02/ses-01/anat/x.nii.gz")
    assert not sel.matches("02", "02", "sub-02/ses-02/anat/x.nii.gz")


def test_read_selection_from_files(tmp_path):
    (tmp_path / "keep.txt").write_text("sub-01\n")
    (tmp_path / "drop.yml").write_text("FILES_SEG:\n- sub-02_ses-01_T2w.nii.gz\n")
    assert chosen(read_selection(tmp_path / "keep.txt")) == [IMAGES[0][2], IMAGES[1][2]]
    assert chosen(read_selection(tmp_path / "drop.yml")) == [IMAGES[2][2]]
    with pytest.raises(InputError, match="not found"):
        read_selection(tmp_path / "missing.yml")


def test_empty_list_selects_nothing():
    sel = parse_selection("# nothing yet\nfiles:\n")
    assert len(sel) == 0 and chosen(sel) == []

"""Whole studies: BIDS trees of synthetic phantoms in tmp_path, run through cordseg.study.

The fast tests use tiny one-node ONNX models (CORDSEG_MODEL_DIR, found before the shipped ones) so that
an image takes ~0.1 s: they check the plumbing (names, sidecars, table, resume, failures, selection, the
process pool); the shipped models run in the slow and real-data tests.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import time

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cordseg.errors import InputError, OutputError
from cordseg.phantom import make_phantom
from cordseg.study import (LESION_COLUMNS, RESULT_COLUMNS, bids_check, find_images, output_path, run_study,
                           sidecar_path)

from conftest import build_onnx

MODEL_FILES = {"centerline": "tiny_centerline.onnx", "sc": "tiny_sc.onnx", "lesion": "tiny_lesion.onnx"}
SHAPE, ZOOMS = (40, 40, 16), (1.0, 1.0, 2.0)


def write_models(folder, sc_threshold=0.5):
    pytest.importorskip("onnx")
    build_onnx(folder / MODEL_FILES["centerline"], op="sigmoid", task="centerline")
    build_onnx(folder / MODEL_FILES["sc"], op="sigmoid", task="sc", input_shape=("N", "X", "Y", "Z", 1),
               extra={"cordseg_threshold": str(sc_threshold)})
    build_onnx(folder / MODEL_FILES["lesion"], op="sigmoid", task="lesion", input_shape=("N", "X", "Y", "Z", 1))


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    write_models(folder)
    monkeypatch.setenv("CORDSEG_MODEL_DIR", str(folder))
    return folder


def rgb_image():
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nib.Nifti1Image(rgb, np.eye(4))


def put(root, rel, img):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


IMAGES = {
    "sub-01/anat/sub-01_T2w.nii.gz": ("t2", 1),
    "sub-01/anat/sub-01_T1w.nii.gz": ("t1", 2),
    "sub-02/ses-01/anat/sub-02_ses-01_T2star.nii.gz": ("t2", 3),
    "sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz": ("t2", 4),
}
RGB = "sub-03/anat/sub-03_T2w.nii.gz"


@pytest.fixture
def bids(tmp_path):
    root = tmp_path / "bids"
    for rel, (contrast, seed) in IMAGES.items():
        ph = make_phantom(SHAPE, ZOOMS, n_lesions=1, seed=seed, contrast="t1" if contrast == "t1" else "t2",
                          axcodes=("P", "S", "R") if seed == 3 else ("L", "A", "S"))
        put(root, rel, ph.image)
    put(root, RGB, rgb_image())
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    (root / "sub-01" / "anat" / "notes.txt").write_text("not an image")
    (root / "sub-01" / "anat" / "badname.nii.gz").write_bytes(b"")
    return root


def read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def by_image(rows):
    return {r["image"]: r for r in rows}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*_seg.*")}


# --------------------------------------------------------------------------- finding images


def test_find_images_entities_contrasts_and_selection(bids):
    put(bids, "sub-04/anat/sub-04_acq-MTon_MTS.nii.gz", make_phantom((8, 8, 4)).image)
    put(bids, "sub-04/anat/sub-04_acq-T1w_MTS.nii.gz", make_phantom((8, 8, 4)).image)
    put(bids, "sub-04/dwi/sub-04_dwi.nii.gz", make_phantom((8, 8, 4)).image)
    put(bids, "sub-04/anat/sub-05_T2w.nii.gz", make_phantom((8, 8, 4)).image)  # another subject's name
    found = {i.relpath: i for i in find_images(bids)}
    assert set(found) == set(IMAGES) | {RGB, "sub-04/anat/sub-04_acq-MTon_MTS.nii.gz",
                                        "sub-04/anat/sub-04_acq-T1w_MTS.nii.gz", "sub-04/dwi/sub-04_dwi.nii.gz"}
    contrast = {k: v.contrast for k, v in found.items()}
    assert contrast["sub-01/anat/sub-01_T1w.nii.gz"] == "t1"
    assert contrast["sub-02/ses-01/anat/sub-02_ses-01_T2star.nii.gz"] == "t2s"
    assert contrast["sub-04/anat/sub-04_acq-MTon_MTS.nii.gz"] == "t2s"
    assert contrast["sub-04/anat/sub-04_acq-T1w_MTS.nii.gz"] == "t1"
    assert contrast["sub-04/dwi/sub-04_dwi.nii.gz"] == "dwi"
    assert contrast["sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz"] is None
    ses = found["sub-02/ses-01/anat/sub-02_ses-01_T2star.nii.gz"]
    assert (ses.subject, ses.session, ses.datatype, ses.suffix) == ("sub-02", "ses-01", "anat", "T2star")
    assert {i.subject for i in find_images(bids, participant_labels=["02", "sub-03"])} == {"sub-02", "sub-03"}
    with pytest.raises(InputError, match="no images for participant"):
        find_images(bids, participant_labels=["99"])


# --------------------------------------------------------------------------- one run


def test_layout_sidecars_and_table(bids, models):
    result = run_study(bids, tasks="centerline,sc,lesion")
    out = bids / "derivatives" / "cordseg"
    assert result.out_dir == out
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "cordseg"
    assert (out / desc["DatasetLinks"]["raw"]).resolve() == bids.resolve()

    rows = by_image(read_tsv(out / "results.tsv"))
    assert list(read_tsv(out / "results.tsv")[0]) == RESULT_COLUMNS
    assert set(rows) == set(IMAGES) | {RGB}
    t2 = rows["sub-01/anat/sub-01_T2w.nii.gz"]
    assert (t2["status"], t2["contrast"], t2["tasks"]) == ("ok", "t2", "centerline,sc,lesion")
    t1 = rows["sub-01/anat/sub-01_T1w.nii.gz"]
    assert (t1["status"], t1["tasks"]) == ("ok", "centerline,sc")
    assert "lesion skipped: no lesion model for t1" in t1["reason"]
    flair = rows["sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz"]
    assert flair["status"] == "skipped" and "FLAIR" in flair["reason"]
    rgb = rows[RGB]
    assert rgb["status"] == "failed" and "RGB" in rgb["reason"] and "\n" not in rgb["reason"]
    assert not list((out / "sub-03").rglob("*")) or not list((out / "sub-03").rglob("*.nii.gz"))

    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert names == sorted([
        "sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz", "sub-01/anat/sub-01_T2w_label-lesion_seg.nii.gz",
        "sub-01/anat/sub-01_T2w_label-centerline_seg.nii.gz",
        "sub-01/anat/sub-01_T1w_label-SC_seg.nii.gz", "sub-01/anat/sub-01_T1w_label-centerline_seg.nii.gz",
        "sub-02/ses-01/anat/sub-02_ses-01_T2star_label-SC_seg.nii.gz",
        "sub-02/ses-01/anat/sub-02_ses-01_T2star_label-lesion_seg.nii.gz",
        "sub-02/ses-01/anat/sub-02_ses-01_T2star_label-centerline_seg.nii.gz"])

    for rel in ("sub-01/anat/sub-01_T2w.nii.gz", "sub-02/ses-01/anat/sub-02_ses-01_T2star.nii.gz"):
        src = nib.load(str(bids / rel))
        row = rows[rel]
        for task in ("centerline", "sc", "lesion"):
            mask_path = output_path(out, next(i for i in find_images(bids) if i.relpath == rel), task)
            mask = nib.load(str(mask_path))
            assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
            assert int(mask.header["sform_code"]) == int(src.header["sform_code"])
            side = json.loads(sidecar_path(mask_path).read_text())
            gen = side["GeneratedBy"][0]
            assert gen["Model"] == MODEL_FILES[task]
            assert gen["ModelSHA256"] == sha256(models / MODEL_FILES[task])
            assert {m["Task"]: m["SHA256"] for m in gen["Models"]}["centerline"] == sha256(
                models / MODEL_FILES["centerline"])
            assert side["Sources"] == [f"bids:raw:{rel}"]
            assert gen["Command"].startswith("cordseg")
        cord = np.asanyarray(nib.load(str(mask_path.with_name(mask_path.name.replace("lesion", "SC")))).dataobj)
        assert float(row["cord_volume_mm3"]) == pytest.approx(cord.sum() * np.prod(ZOOMS), abs=0.01)
        assert float(row["mean_csa_mm2"]) > 0 and float(row["cord_length_mm"]) > 0
        centerline = np.asanyarray(nib.load(str(output_path(
            out, next(i for i in find_images(bids) if i.relpath == rel), "centerline"))).dataobj)
        assert int(row["centerline_slices"]) == int(centerline.sum())
    lesions = read_tsv(out / "lesions.tsv")
    assert list(lesions[0]) == LESION_COLUMNS
    # brightness over the cord, as `cordseg lesion --csv` gives it: a number, or n/a where there is no cord to
    # compare with (the local one also where no slice above or below has cord)
    for les in lesions:
        assert all(les[k] == "n/a" or float(les[k]) > 0 for k in ("contrast", "local_contrast"))
    for rel, row in rows.items():
        assert row["lesion_count"] == "n/a" or int(row["lesion_count"]) == sum(les["image"] == rel for les in lesions)
    assert result.counts == {"ok": 3, "failed": 1, "skipped": 1, "reused": 0}
    assert not (out / ".cordseg-study.lock").exists()


def test_real_rgb_file_named_t2w_gets_a_row_and_no_output(tmp_path, models, shared_data):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    shutil.copy(shared_data / "bad_input" / "rgb.nii.gz", root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    result = run_study(root, tasks="sc")
    (row,) = result.rows
    assert row["status"] == "failed" and "colour (RGB)" in row["reason"]
    assert not list((root / "derivatives" / "cordseg").rglob("*.nii.gz"))


# --------------------------------------------------------------------------- resume


def test_second_run_skips_and_changed_options_or_models_rerun(bids, models):
    out = bids / "derivatives" / "cordseg"
    run_study(bids, tasks="centerline,sc,lesion")
    first = mtimes(out)
    again = run_study(bids, tasks="centerline,sc,lesion")
    assert mtimes(out) == first
    assert again.counts["reused"] == 3
    rows = by_image(again.rows)
    assert rows["sub-01/anat/sub-01_T2w.nii.gz"]["reused"] == "centerline,sc,lesion"
    assert rows["sub-01/anat/sub-01_T2w.nii.gz"]["cord_volume_mm3"] != "n/a"  # read back from the sidecar
    assert rows[RGB]["status"] == "failed"  # failures are tried again

    # a lesion option: only the lesion masks are computed again
    run_study(bids, tasks="centerline,sc,lesion", lesion_threshold=0.6)
    now = mtimes(out)
    changed = {p.name for p in now if now[p] != first[p]}
    assert changed and all("label-lesion" in n for n in changed)
    side = json.loads((out / "sub-01/anat/sub-01_T2w_label-lesion_seg.json").read_text())
    assert side["GeneratedBy"][0]["Options"]["threshold"] == 0.6

    # another cord model file: cord and lesion outputs (lesion screening uses it) re-run, centerline kept
    before = mtimes(out)
    time.sleep(0.01)
    write_models(models, sc_threshold=0.55)
    run_study(bids, tasks="centerline,sc,lesion", lesion_threshold=0.6)
    now = mtimes(out)
    changed = {p.name for p in now if now[p] != before[p]}
    assert any("label-SC" in n for n in changed) and not any("centerline" in n for n in changed)
    side = json.loads((out / "sub-01/anat/sub-01_T2w_label-SC_seg.json").read_text())
    assert side["GeneratedBy"][0]["ModelSHA256"] == sha256(models / MODEL_FILES["sc"])

    # without the conus model: every t1/t2 output is computed again, its sidecar says so and leaves the
    # conus model out of the models it names
    before = mtimes(out)
    time.sleep(0.01)
    run_study(bids, tasks="centerline,sc,lesion", lesion_threshold=0.6, conus=False)
    sc = out / "sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    assert mtimes(out)[sc] != before[sc]
    side = json.loads((out / "sub-01/anat/sub-01_T2w_label-SC_seg.json").read_text())
    assert side["GeneratedBy"][0]["Options"]["conus"] is False
    assert "conus" not in {m["Task"] for m in side["GeneratedBy"][0]["Models"]}
    run_study(bids, tasks="centerline,sc,lesion", lesion_threshold=0.6)

    # a task added later runs alone
    (out / "sub-01/anat/sub-01_T1w_label-centerline_seg.json").unlink()
    result = run_study(bids, tasks="centerline,sc,lesion", lesion_threshold=0.6)
    row = by_image(result.rows)["sub-01/anat/sub-01_T1w.nii.gz"]
    assert row["reused"] == "sc" and row["tasks"] == "centerline,sc"


def test_interrupted_study_leaves_whole_files_and_carries_on(bids, models):
    out = bids / "derivatives" / "cordseg"
    seen = []

    def stop_after_first(row, result):
        if result is not None and result["done"]:
            seen.append(row["image"])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(bids, tasks="sc", on_result=stop_after_first)
    written = read_tsv(out / "results.tsv")
    assert [r["image"] for r in written if r["status"] != "skipped"] == seen  # skipped: nothing to compute
    assert not [p for p in out.rglob(".*") if p.name != ".bidsignore"]  # no temporary files, lock released
    result = run_study(bids, tasks="sc")
    rows = by_image(result.rows)
    assert rows[seen[0]]["reused"] == "sc"
    assert all(r["status"] in ("ok", "skipped") for k, r in rows.items() if k != RGB)


def test_stale_temporary_files_are_removed_and_one_study_per_folder(bids, models):
    out = bids / "derivatives" / "cordseg" / "sub-01" / "anat"
    out.mkdir(parents=True)
    stale = out / ".sub-01_T2w_label-SC_seg.nii.gz.0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"half a file")
    keep = out / "my_notes.txt"
    keep.write_text("mine")
    result = run_study(bids, tasks="sc", participant_labels=["01"])
    assert not stale.exists() and keep.exists()
    assert any("temporary" in n for n in result.notes)

    lock = bids / "derivatives" / "cordseg" / ".cordseg-study.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process that is not this one
    with pytest.raises(OutputError, match="another study"):
        run_study(bids, tasks="sc")
    lock.write_text("999999999\n")  # a dead one: taken over
    run_study(bids, tasks="sc", participant_labels=["01"])
    assert not lock.exists()


def test_failed_task_removes_its_earlier_output(bids, models):
    out = bids / "derivatives" / "cordseg"
    run_study(bids, tasks="sc", participant_labels=["01"])
    mask = out / "sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    assert mask.exists()
    img = nib.load(str(bids / "sub-01/anat/sub-01_T2w.nii.gz"))
    series = np.zeros(img.shape + (3,), np.float32)  # now a 4D series: no longer a usable T2w image
    nib.save(nib.Nifti1Image(series, img.affine), str(bids / "sub-01/anat/sub-01_T2w.nii.gz"))
    result = run_study(bids, tasks="sc", participant_labels=["01"])
    row = by_image(result.rows)["sub-01/anat/sub-01_T2w.nii.gz"]
    assert row["status"] == "failed" and "3 volumes" in row["reason"]
    assert not mask.exists() and not sidecar_path(mask).exists()


# --------------------------------------------------------------------------- selection


def test_include_exclude_files(bids, models, tmp_path):
    inc = tmp_path / "keep.txt"
    inc.write_text("sub-01\nsub-02/ses-01\n")
    exc = tmp_path / "qc_exclude.yml"
    exc.write_text("files:\n  - sub-01/anat/sub-01_T1w.nii.gz  # fail: no cord\n  - sub-02_ses-01_FLAIR.nii.gz\n")
    result = run_study(bids, tasks="sc", include=inc, exclude=exc)
    assert [r["image"] for r in result.rows] == ["sub-01/anat/sub-01_T2w.nii.gz",
                                                  "sub-02/ses-01/anat/sub-02_ses-01_T2star.nii.gz"]
    nothing = tmp_path / "none.txt"
    nothing.write_text("sub-99\n")
    with pytest.raises(InputError, match="no images found"):
        run_study(bids, tasks="sc", include=nothing)


# --------------------------------------------------------------------------- local processes


def test_two_local_jobs_give_the_serial_answer(bids, models, tmp_path):
    serial = run_study(bids, tmp_path / "serial", tasks="sc,lesion")
    pooled = run_study(bids, tmp_path / "pooled", tasks="sc,lesion", jobs=2)
    a, b = by_image(serial.rows), by_image(pooled.rows)
    for key in a:
        for col in ("status", "cord_volume_mm3", "lesion_count", "lesion_volume_mm3", "reason"):
            assert a[key][col] == b[key][col], (key, col)
    workers = {r["worker"] for r in pooled.rows if r["worker"] != "n/a"}
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers)
    for mask in (tmp_path / "serial").rglob("*.nii.gz"):
        other = tmp_path / "pooled" / mask.relative_to(tmp_path / "serial")
        assert np.array_equal(np.asanyarray(nib.load(str(mask)).dataobj), np.asanyarray(nib.load(str(other)).dataobj))


@pytest.mark.slow
def test_killed_local_worker_the_study_still_finishes(bids, models):
    for i in range(4):  # more images than workers, so some are in flight or queued when one dies
        put(bids, f"sub-1{i}/anat/sub-1{i}_T2w.nii.gz", make_phantom(SHAPE, ZOOMS, seed=10 + i).image)
    killed = []

    def kill_first_worker(row, result):
        if not killed and result is not None and result["pid"]:
            killed.append(result["pid"])
            os.kill(result["pid"], signal.SIGKILL)

    result = run_study(bids, tasks="sc", jobs=2, on_result=kill_first_worker)
    rows = by_image(result.rows)
    assert killed
    others = (RGB, "sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz")
    assert all(r["status"] == "ok" for k, r in rows.items() if k not in others)
    out = bids / "derivatives" / "cordseg"
    assert not [p for p in out.rglob(".*") if p.name != ".bidsignore"]
    for rel in rows:
        if rows[rel]["status"] == "ok":
            mask = out / rel.replace(".nii.gz", "_label-SC_seg.nii.gz")
            nib.load(str(mask)).get_fdata()  # whole files only


# --------------------------------------------------------------------------- BIDS validity, QC, CLI


def test_bids_validator_on_the_output(bids, models):
    bv = pytest.importorskip("bids_validator")
    run_study(bids, tasks="centerline,sc,lesion")
    out = bids / "derivatives" / "cordseg"
    report = bids_check(out)
    assert report["problems"] == [] and report["checked"] == 8
    # the raw dataset stays valid with the derivatives inside it: nothing was written outside derivatives/
    validator = bv.BIDSValidator()
    written = [p for p in bids.rglob("*") if p.is_file() and p.name not in ("notes.txt", "badname.nii.gz")]
    assert all(validator.is_bids("/" + p.relative_to(bids).as_posix()) for p in written)
    # and the check can fail: a sidecar naming a missing source, a non-BIDS source name
    side = out / "sub-01/anat/sub-01_T2w_label-SC_seg.json"
    meta = json.loads(side.read_text())
    meta["Sources"] = ["bids:raw:sub-01/anat/sub-01_T3w.nii.gz"]
    side.write_text(json.dumps(meta))
    anat = out / "sub-01/anat"
    shutil.copy(anat / "sub-01_T2w_label-SC_seg.nii.gz", anat / "sub-01_T2w_foo_label-SC_seg.nii.gz")
    problems = bids_check(out)["problems"]
    assert any("T3w" in p for p in problems) and any("_foo" in p for p in problems)


@pytest.mark.slow
def test_qc_report_on_the_study_output(bids, models):
    import cordseg.qc as qc

    if not hasattr(qc, "write_report"):
        pytest.skip("this cordseg has no QC report page")
    result = run_study(bids, tasks="sc,lesion", qc=True)
    out = bids / "derivatives" / "cordseg"
    assert result.qc_report is not None and (out / "qc" / "index.html").is_file()
    page = (out / "qc" / "index.html").read_text()
    assert "sub-01_T2w" in page and "sub-03_T2w" in page  # the failed image has its row too
    assert bids_check(out)["problems"] == []  # .bidsignore keeps qc/ out of the validator's way


def test_qc_report_when_available(bids, models, monkeypatch):
    import cordseg.qc as qc

    calls = []
    monkeypatch.setattr(qc, "write_report", lambda out, dest: calls.append((out, dest)) or dest, raising=False)
    result = run_study(bids, tasks="sc", participant_labels=["01"], qc=True)
    out = bids / "derivatives" / "cordseg"
    assert calls == [(out, out / "qc")] and result.qc_report == out / "qc"
    monkeypatch.delattr(qc, "write_report")
    result = run_study(bids, tasks="sc", participant_labels=["01"], qc=True)
    assert result.qc_report is None and any("unavailable" in n for n in result.notes)


def test_cli(bids, models, tmp_path):
    from cordseg.cli_study import study

    runner = CliRunner()
    args = [str(bids), "-o", str(tmp_path / "out"), "--tasks", "sc", "--participant-label"]
    res = runner.invoke(study, args + ["01,03"])
    assert res.exit_code == 0, res.output
    assert "3 image(s): 2 ok (0 up to date), 1 failed" in res.output
    side = json.loads((tmp_path / "out/sub-01/anat/sub-01_T2w_label-SC_seg.json").read_text())
    assert side["GeneratedBy"][0]["Command"] == (f"cordseg study {bids} --output {tmp_path / 'out'} --tasks sc "
                                                 "--participant-label 01,03")
    res = runner.invoke(study, args + ["01"])
    assert res.exit_code == 0 and "2 ok (2 up to date)" in res.output
    for args in ([str(tmp_path / "missing")], [str(bids), "--tasks", "sc,nose"], [str(bids), "--sc-threshold", "2"]):
        res = runner.invoke(study, args)
        assert res.exit_code == 2
        lines = [line for line in res.output.splitlines() if line.startswith("cordseg: error:")]
        assert len(lines) == 1, res.output


def test_dwi_series_is_averaged_over_its_weighted_volumes(tmp_path, models):
    ph = make_phantom(SHAPE, ZOOMS, seed=5)
    base = ph.image.get_fdata(dtype=np.float32)
    series = np.stack([base * 5, base, base, base], axis=3)  # a bright b=0 volume first
    root = tmp_path / "bids"
    put(root, "sub-01/dwi/sub-01_dwi.nii.gz", nib.Nifti1Image(series, ph.image.affine, ph.image.header))
    (root / "sub-01/dwi/sub-01_dwi.bval").write_text("0 800 800 800\n")
    result = run_study(root, tasks="centerline,sc")
    (row,) = result.rows
    assert row["status"] == "ok" and row["tasks"] == "centerline,sc"  # the shipped cord model serves dwi
    assert "mean of the 3 of 4 volumes with b > 50" in row["notes"]
    for name in ("label-centerline_seg", "label-SC_seg"):
        mask = nib.load(str(root / f"derivatives/cordseg/sub-01/dwi/sub-01_dwi_{name}.nii.gz"))
        assert mask.shape == base.shape and np.allclose(mask.affine, ph.image.affine)  # the series' 3D grid


# --------------------------------------------------------------------------- Dask


@pytest.mark.slow
def test_dask_local_cluster_with_a_worker_killed_mid_study(bids, models):
    distributed = pytest.importorskip("distributed")
    for i in range(6):
        put(bids, f"sub-2{i}/anat/sub-2{i}_T2w.nii.gz", make_phantom(SHAPE, ZOOMS, seed=20 + i).image)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        killed = []

        def kill_one_worker(row, result):
            if not killed and result is not None and result["pid"]:
                pids = client.run(os.getpid)
                victim = next(pid for pid in pids.values() if pid != result["pid"]) if len(pids) > 1 else result["pid"]
                killed.append(victim)
                os.kill(victim, signal.SIGKILL)

        result = run_study(bids, tasks="sc", dask=client, on_result=kill_one_worker)
        assert killed
        rows = by_image(result.rows)
        expected_ok = [k for k in rows if k not in (RGB, "sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz")]
        assert all(rows[k]["status"] == "ok" for k in expected_ok), [rows[k]["reason"] for k in expected_ok]
        assert rows[RGB]["status"] == "failed"
        assert killed[0] not in client.run(os.getpid).values()  # the nanny started a new worker process
        # each worker keeps one Segmenter per contrast (models opened once), in its plugin
        kept = client.run(lambda dask_worker: sorted(
            k[1] for c in dask_worker.plugins["cordseg-segmenters"].caches.values() for k in c if k[0] == "segmenter"))
        assert kept and all(len(v) == len(set(v)) for v in kept.values())
        assert set().union(*kept.values()) <= {"t1", "t2", "t2s"}
        out = bids / "derivatives" / "cordseg"
        assert not [p for p in out.rglob(".*") if p.name != ".bidsignore"]
        again = run_study(bids, tasks="sc", dask=cluster.scheduler_address)
        assert again.counts["reused"] == len(expected_ok)


# --------------------------------------------------------------------------- real scans, shipped models


@pytest.mark.slow
@pytest.mark.realdata
def test_real_scans_with_the_shipped_models(tmp_path, shared_data, monkeypatch):
    monkeypatch.delenv("CORDSEG_MODEL_DIR", raising=False)
    root = tmp_path / "bids"
    links = {"sub-t2/anat/sub-t2_T2w.nii.gz": "sct_testing/t2/t2.nii.gz",
             "sub-mt/anat/sub-mt_acq-MTon_MTS.nii.gz": "sct_testing/mt/mt0.nii.gz",
             "sub-rgb/anat/sub-rgb_T2w.nii.gz": "bad_input/rgb.nii.gz"}
    for rel, src in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(shared_data / src, root / rel)
    result = run_study(root, tasks="sc,lesion", jobs=2)
    rows = by_image(result.rows)
    assert rows["sub-rgb/anat/sub-rgb_T2w.nii.gz"]["status"] == "failed"
    t2 = rows["sub-t2/anat/sub-t2_T2w.nii.gz"]
    assert t2["status"] == "ok", t2["reason"]
    out = root / "derivatives" / "cordseg"
    pred = np.asanyarray(nib.load(str(out / "sub-t2/anat/sub-t2_T2w_label-SC_seg.nii.gz")).dataobj) > 0
    ref = np.asanyarray(nib.load(str(shared_data / "sct_testing/t2/t2_seg-manual.nii.gz")).dataobj) > 0
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice > 0.8
    assert float(t2["cord_volume_mm3"]) == pytest.approx(pred.sum() * 1.0, rel=1e-3)  # 1 mm voxels
    assert 40 < float(t2["mean_csa_mm2"]) < 120  # an adult cervical cord
    side = json.loads((out / "sub-t2/anat/sub-t2_T2w_label-SC_seg.json").read_text())
    from cordseg.inference import find_model
    assert side["GeneratedBy"][0]["ModelSHA256"] == sha256(find_model("sc", "t2").path)


# --------------------------------------------------------------------------- signals, as a batch system sends them


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["group", "parent"])
def test_sigterm_leaves_whole_files_and_the_next_run_carries_on(tmp_path, models, whom):
    import glob
    import subprocess

    exe = shutil.which("cordseg")
    if exe is None:
        pytest.skip("the cordseg program is not installed")
    root = tmp_path / "bids"
    for i in range(24):
        put(root, f"sub-{i:02d}/anat/sub-{i:02d}_T2w.nii.gz", make_phantom((64, 64, 24), ZOOMS, seed=i).image)
    out = root / "derivatives" / "cordseg"
    proc = subprocess.Popen([exe, "study", str(root), "--jobs", "2", "--tasks", "sc,lesion", "-q"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(glob.glob(str(out / "sub-*/anat/*_seg.json"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    if whom == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, text
    assert "terminated (SIGTERM)" in text and "Traceback" not in text
    assert not [p for p in out.rglob(".*") if p.name != ".bidsignore"]  # no temporary file, no lock
    masks = sorted(out.rglob("*_seg.nii.gz"))
    for mask in masks:
        nib.load(str(mask)).get_fdata()  # whole files
    result = run_study(root, tasks="sc,lesion")
    assert all(r["status"] == "ok" for r in result.rows)
    assert sum(r["reused"] == "sc,lesion" for r in result.rows) >= 3

"""The study's QC report: what write_report finds and draws (no browser), and the page itself in headless
Chromium (Debian's chromium and chromium-driver, driven by Selenium; `bash .ci/browser.sh` installs them).

Screenshots of the index and of one image's view go to the test's temporary folder; with
CORDSEG_QC_SCREENSHOT=<path> the index's is also copied there (the README's picture:
`CORDSEG_QC_SCREENSHOT=docs/img/qc_report.png python -m pytest -q tests/test_qc_report.py -k browser`)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pngread import read_png
from click.testing import CliRunner

from cordseg import qc
from cordseg.cli_qc import qc as qc_command
from cordseg.errors import InputError
from cordseg.phantom import make_phantom

# (subject, session, suffix, phantom keywords, masks written); sub-03 failed in the study: no masks
STUDY = [
    ("sub-01", "", "T2w", dict(shape=(64, 64, 40), n_lesions=2, seed=1), ("SC", "lesion")),
    ("sub-02", "ses-01", "T2w", dict(shape=(64, 64, 30), axcodes=("P", "S", "R"), seed=2), ("SC",)),
    ("sub-02", "ses-02", "T2starw", dict(shape=(96, 96, 12), zooms=(0.5, 0.5, 5.0), n_lesions=1, seed=3),
     ("SC", "lesion")),
    ("sub-03", "", "T1w", None, ()),
]
SUB01_CORD_FROM_RESULTS = 1234.5  # results.tsv's value wins over the mask's


def _rel(sub, ses, suffix):
    folder = f"{sub}/{ses}/anat" if ses else f"{sub}/anat"
    return folder, "_".join([p for p in (sub, ses) if p] + [suffix])


def build_study(root: Path) -> dict:
    """A BIDS folder with phantom scans and the derivatives the study command writes: masks with sidecars
    (one naming its source by absolute path), dataset_description.json and results.tsv."""
    bids = root / "bids"
    deriv = bids / "derivatives" / "cordseg"
    deriv.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "phantom study", "BIDSVersion": "1.9.0"}))
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "cordseg", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "DatasetLinks": {"raw": "../.."}}))
    phantoms, results = {}, []
    for sub, ses, suffix, kw, masks in STUDY:
        folder, stem = _rel(sub, ses, suffix)
        image = f"{folder}/{stem}.nii.gz"
        # as the study command writes it: n/a where a value does not apply, the model's contrast beside the suffix
        row = {"image": image, "subject": sub, "session": ses or "n/a", "suffix": suffix,
               "contrast": {"T2w": "t2", "T2starw": "t2s", "T1w": "t1"}[suffix],
               "tasks": "centerline,sc,lesion" if "lesion" in masks else "centerline,sc", "status": "ok",
               "reason": "n/a", "cord_volume_mm3": "n/a", "lesion_count": "n/a", "lesion_volume_mm3": "n/a"}
        if kw is None:
            row.update(status="failed", reason="no cord found", tasks="n/a")
            results.append(row)
            continue
        ph = make_phantom(**kw)
        phantoms[image] = ph
        (bids / folder).mkdir(parents=True, exist_ok=True)
        (deriv / folder).mkdir(parents=True, exist_ok=True)
        nib.save(ph.image, bids / image)
        for label in masks:
            nib.save(ph.cord if label == "SC" else ph.lesions, deriv / folder / f"{stem}_label-{label}_seg.nii.gz")
            source = str((bids / image).resolve()) if ses == "ses-02" else f"bids:raw:{image}"
            (deriv / folder / f"{stem}_label-{label}_seg.json").write_text(json.dumps(
                {"GeneratedBy": [{"Name": "cordseg"}], "Sources": [source]}))
        if sub == "sub-01":
            row["cord_volume_mm3"] = str(SUB01_CORD_FROM_RESULTS)
        results.append(row)
    with open(deriv / "results.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(results[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(results)
    return {"bids": bids, "deriv": deriv, "phantoms": phantoms}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    index = qc.write_report(study["deriv"], out, workers=2)
    return index


def page_data(index: Path) -> dict:
    text = index.read_text(encoding="utf-8")
    found = re.search(r'<script id="qc-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "no data in the page"
    return json.loads(found.group(1))


# --------------------------------------------------------------------------- without a browser


def test_grey_and_outline_png_round_trip():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    assert np.array_equal(read_png(qc.grey_png_bytes(grey))[0], grey)
    data = qc.grey_png_bytes(grey)
    assert zlib.decompress(data[data.index(b"IDAT") + 4:-16])[::10][:5] == bytes([2] * 5)  # rows filtered Up
    labels = rng.integers(0, 4, (6, 7), dtype=np.uint8)
    pixels, palette, alpha = read_png(qc.outline_png_bytes(labels))
    assert np.array_equal(pixels, labels)
    for name, value in qc.LABELS.items():
        assert tuple(palette[value]) == qc.COLOURS[name]
    assert alpha == bytes([0, 255, 255, 255])  # 0: transparent, every outline opaque
    with pytest.raises(ValueError):
        qc.outline_png_bytes(np.full((2, 2), 9, np.uint8))


def test_one_row_per_image_with_results_and_mask_values(study, report):
    data = page_data(report)
    rows = {r["image"]: r for r in data["images"]}
    assert sorted(rows) == sorted(f"{_rel(s, ss, x)[0]}/{_rel(s, ss, x)[1]}.nii.gz" for s, ss, x, _, _ in STUDY)
    sub01 = rows["sub-01/anat/sub-01_T2w.nii.gz"]
    assert sub01["cord_volume_mm3"] == SUB01_CORD_FROM_RESULTS  # from results.tsv
    ph = study["phantoms"]["sub-01/anat/sub-01_T2w.nii.gz"]
    assert sub01["lesion_count"] == ph.n_lesions == 2  # computed from the mask (empty in results.tsv)
    assert sub01["lesion_volume_mm3"] == pytest.approx(float(np.asarray(ph.lesions.dataobj).sum()))
    assert (sub01["subject"], sub01["session"], sub01["contrast"], sub01["task"]) == (
        "sub-01", "", "T2w (t2)", "centerline+sc+lesion")
    ses01 = rows["sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz"]
    ph = study["phantoms"]["sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz"]
    assert ses01["cord_volume_mm3"] == pytest.approx(float(np.asarray(ph.cord.dataobj).sum()))
    assert ses01["lesion_count"] is None and ses01["session"] == "ses-01"
    ses02 = rows["sub-02/ses-02/anat/sub-02_ses-02_T2starw.nii.gz"]  # its sidecars name the source by absolute path
    ph = study["phantoms"]["sub-02/ses-02/anat/sub-02_ses-02_T2starw.nii.gz"]
    assert ses02["cord_volume_mm3"] == pytest.approx(float(np.asarray(ph.cord.dataobj).sum()) * 0.5 * 0.5 * 5.0)
    assert ses02["picture"] is not None and ses02["error"] == ""
    failed = rows["sub-03/anat/sub-03_T1w.nii.gz"]
    assert failed["status"] == "failed" and failed["reason"] == "no cord found" and failed["picture"] is None
    assert data["title"] == "cordseg QC: phantom study"


def test_pictures_at_four_pixels_per_mm_with_both_outlines_on_lesion_results(study, report):
    data = page_data(report)
    for row in data["images"]:
        pic = row["picture"]
        if pic is None:
            continue
        assert pic["view"] / qc.VIEW_MM >= 4  # pixels per mm
        base, _, _ = read_png((report.parent / pic["mosaic"]).read_bytes())
        outline, _, alpha = read_png((report.parent / pic["mosaic_outline"]).read_bytes())
        assert base.shape == outline.shape == tuple(pic["mosaic_size"][::-1])
        strip, _, _ = read_png((report.parent / pic["strip"]).read_bytes())
        strip_outline, _, _ = read_png((report.parent / pic["strip_outline"]).read_bytes())
        assert strip.shape == strip_outline.shape == tuple(pic["strip_size"][::-1]) and strip.shape[0] == pic["view"]
        # the strip is not squeezed: the cord's length at the same pixel size
        ph = study["phantoms"][row["image"]]
        length_mm = len(ph.cord_slices) * ph.image.header.get_zooms()[:3][int(np.argmax(
            np.abs(ph.image.affine[:3, :3])[2]))]
        assert abs(strip.shape[1] - length_mm * 4) <= 1
        n_views = len(pic["slices"])
        assert n_views == len(ph.cord_slices) and pic["slices"] == sorted(pic["slices"], reverse=True)
        assert (outline == qc.LABELS["cord"]).any()  # the cord outlined on every result, lesion ones too
        if "lesion" in row["masks"]:
            assert (outline == qc.LABELS["lesion"]).any() and (strip_outline == qc.LABELS["lesion"]).any()
            assert pic["lesion_slices"] and set(pic["lesion_slices"]) <= set(pic["slices"])
        # outlines, not filled masks: few pixels
        assert 0 < (outline > 0).mean() < 0.1


def test_lesion_mask_alone_is_drawn_along_itself(tmp_path):
    ph = make_phantom((48, 48, 20), n_lesions=1, seed=4)
    deriv = tmp_path / "deriv"
    (deriv / "sub-09" / "anat").mkdir(parents=True)
    nib.save(ph.image, tmp_path / "sub-09_T2w.nii.gz")
    nib.save(ph.lesions, deriv / "sub-09" / "anat" / "sub-09_T2w_label-lesion_seg.nii.gz")
    (deriv / "sub-09" / "anat" / "sub-09_T2w_label-lesion_seg.json").write_text(
        json.dumps({"Sources": [str(tmp_path / "sub-09_T2w.nii.gz")]}))
    row = page_data(qc.write_report(deriv, tmp_path / "out", workers=1))["images"][0]
    assert row["image"] == "sub-09/anat/sub-09_T2w.nii.gz"  # source outside any raw dataset: its place here
    assert row["picture"] is not None and row["lesion_count"] == 1 and row["cord_volume_mm3"] is None


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        qc.write_report(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no cordseg results"):
        qc.write_report(tmp_path / "empty", tmp_path / "out")
    ph = make_phantom((32, 32, 10), seed=0)
    folder = tmp_path / "d" / "sub-05" / "anat"
    folder.mkdir(parents=True)
    nib.save(ph.cord, folder / "sub-05_T2w_label-SC_seg.nii.gz")  # no sidecar, no raw image anywhere
    row = page_data(qc.write_report(tmp_path / "d", tmp_path / "out", workers=1))["images"][0]
    assert row["picture"] is None and "source image not found" in row["error"] and row["status"] == "error"


def test_cli(study, tmp_path):
    runner = CliRunner()
    result = runner.invoke(qc_command, [str(study["deriv"]), "-o", str(tmp_path / "r"), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").is_file() and "QC report ->" in result.output
    result = runner.invoke(qc_command, [str(tmp_path / "nowhere"), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cordseg: error: ") and "not a folder" in lines[0]


# --------------------------------------------------------------------------- in a browser


def _browser_or_skip():
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (bash .ci/browser.sh installs it with chromium)")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no chromium / chromedriver on PATH (bash .ci/browser.sh installs Debian's chromium and "
                    "chromium-driver)")
    return binary, driver


@pytest.fixture
def browser(tmp_path):
    binary, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--force-device-scale-factor=1", "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # an explicit driver: no network
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _keys(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    for k in keys:
        ActionChains(driver).send_keys(k).perform()


def _current(driver) -> str:
    return driver.execute_script(
        "const tr = document.querySelector('#rows tr.current'); return tr ? tr.dataset.image : null;")


def _stable(read):
    """read(), or None while the rows it reads are being redrawn."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return read()
    except StaleElementReferenceException:
        return None


def _wait(condition, timeout=15.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


_IMAGES_STATE = """
return Array.from(document.querySelectorAll('#viewer img')).filter(
    (img) => img.closest('.figure').style.display !== 'none').map(
    (img) => ({src: img.getAttribute('src'), complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
               shown: img.getBoundingClientRect().width}));"""


@pytest.mark.slow
def test_browser_navigation_pictures_and_outline(study, report, browser, tmp_path):
    driver = browser
    driver.get(report.as_uri())
    data = page_data(report)
    order = [r["image"] for r in data["images"]]
    assert driver.title == data["title"]
    assert len(driver.find_elements("css selector", "#rows tr")) == len(order)
    assert _current(driver) == order[0]
    screenshot_index = tmp_path / "qc_index.png"
    seen = []
    for k, image in enumerate(order):  # every image, by the keyboard; every picture it shows loads in full
        assert _current(driver) == image
        assert driver.find_element("id", "path").text == image
        row = data["images"][k]
        if row["picture"] is None:
            assert "No picture" in driver.find_element("id", "problem").text
            assert _wait(lambda: driver.execute_script(_IMAGES_STATE) == [], what="the pictures to hide")
        else:
            state = _wait(lambda: (lambda s: s if s and all(i["complete"] for i in s) else None)(
                driver.execute_script(_IMAGES_STATE)), what=f"{image}'s pictures")
            assert len(state) == 4 and all(i["w"] > 0 and i["h"] > 0 for i in state), state
            sizes = {tuple(row["picture"]["strip_size"]), tuple(row["picture"]["mosaic_size"])}
            assert {(i["w"], i["h"]) for i in state} == sizes
            assert all(abs(i["shown"] - i["w"]) < 1 for i in state)  # full resolution: a pixel per screen pixel
            seen.append(image)
        if k == 0:
            driver.save_screenshot(str(screenshot_index))
        _keys(driver, "\ue015")  # arrow down
    assert len(seen) == 3
    _keys(driver, "\ue015")  # past the last row: stays there
    assert _current(driver) == order[-1]
    _keys(driver, "\ue013", "\ue013")  # arrow up twice
    assert _current(driver) == order[-3]

    # the outline layer: a key hides and shows it
    outlines = ("return Array.from(document.querySelectorAll('#viewer img.outline'))"
                ".map((i) => getComputedStyle(i).visibility);")
    assert set(driver.execute_script(outlines)) == {"visible"}
    _keys(driver, "o")
    assert set(driver.execute_script(outlines)) == {"hidden"}
    _keys(driver, "o")
    assert set(driver.execute_script(outlines)) == {"visible"}

    # zoom: + doubles nothing silently, it scales both layers; 1 is full resolution again
    width = "return document.getElementById('mosaic-stack').getBoundingClientRect().width;"
    natural = driver.execute_script("return document.getElementById('mosaic-img').naturalWidth;")
    _keys(driver, "+")
    assert driver.execute_script(width) == pytest.approx(natural * 1.5, abs=1)
    _keys(driver, "1")
    assert driver.execute_script(width) == pytest.approx(natural, abs=1)

    # sort by cord volume (descending on a second click), filter by a word
    driver.find_element("css selector", "#head th[data-key='cord_volume_mm3']").click()
    driver.find_element("css selector", "#head th[data-key='cord_volume_mm3']").click()
    shown = [tr.get_attribute("data-image") for tr in driver.find_elements("css selector", "#rows tr")]
    volumes = [next(r["cord_volume_mm3"] for r in data["images"] if r["image"] == i) for i in shown]
    numbers = [v for v in volumes if v is not None]
    assert numbers == sorted(numbers, reverse=True) and volumes[-1] is None  # empty cells last
    box = driver.find_element("id", "filter")
    box.send_keys("t2s")
    assert [tr.get_attribute("data-image") for tr in driver.find_elements("css selector", "#rows tr")] == [
        "sub-02/ses-02/anat/sub-02_ses-02_T2starw.nii.gz"]
    box.clear()
    box.send_keys(" ")  # an 'input' event with no term: everything again
    assert len(driver.find_elements("css selector", "#rows tr")) == len(order)

    driver.find_element("css selector", f"#rows tr[data-image='{order[0]}']").click()
    assert _current(driver) == order[0]
    driver.find_element("id", "viewer").screenshot(str(tmp_path / "qc_image.png"))
    for shot in (screenshot_index, tmp_path / "qc_image.png"):
        assert shot.stat().st_size > 10_000
    if os.environ.get("CORDSEG_QC_SCREENSHOT"):
        target = Path(os.environ["CORDSEG_QC_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot_index, target)


def _study_reader():
    try:
        from cordseg.selection import read_selection
    except ImportError as exc:
        return None, exc
    return read_selection, None


@pytest.mark.slow
def test_browser_marks_survive_a_reload_and_export(study, report, browser):
    driver = browser
    driver.get(report.as_uri())
    data = page_data(report)
    order = [r["image"] for r in data["images"]]
    rows = {r["image"]: r for r in data["images"]}
    _keys(driver, "f", "n")  # the first image fails, with a note
    note = driver.find_element("id", "note")
    assert driver.switch_to.active_element == note
    note.send_keys("cord leaks into CSF: C3 # edge", "\ue007")  # Enter keeps it
    _keys(driver, "\ue015", "\ue015", "a")  # the third: artifact
    _keys(driver, "\ue013", "p")  # the second: pass
    _keys(driver, "\ue015", "\ue015", "p", "p")  # the fourth: the same key twice takes the mark off
    expected = {order[0]: ("fail", "cord leaks into CSF: C3 # edge"), order[2]: ("artifact", ""),
                order[1]: ("pass", "")}

    def marks_in_table():
        return {tr.get_attribute("data-image"): tr.find_elements("css selector", "td")[-2].text.lower()
                for tr in driver.find_elements("css selector", "#rows tr")}

    table = marks_in_table()
    assert {k: v for k, v in table.items() if v} == {k: v[0] for k, v in expected.items()}

    # the page stores every mark at once
    key = "cordseg-qc/" + data["report_id"]
    saved = driver.execute_script("return window.localStorage.getItem(arguments[0]);", key)
    assert saved and {k: v["mark"] for k, v in json.loads(saved).items() if v.get("mark")} == \
        {k: v[0] for k, v in expected.items()}
    # and a reload restores them. Headless Chromium commits local storage to its browser process in batches
    # and now and then drops the last one on an immediate reload; then the stored state is put back as the
    # page left it, so that what is checked is the page's restoring, not the browser's timing
    for _ in range(3):
        time.sleep(2.0)
        driver.refresh()
        if driver.execute_script("return window.localStorage.getItem(arguments[0]);", key) == saved:
            break
        driver.execute_script("window.localStorage.setItem(arguments[0], arguments[1]);", key, saved)
    _wait(lambda: _stable(marks_in_table) == table, what=lambda: f"the kept marks (table: {marks_in_table()})")
    _keys(driver, "\ue015")
    assert driver.find_element("id", "badge").text.lower() == "pass"

    for button in ("export-tsv-button", "export-yml-button"):
        driver.find_element("id", button).click()
    tsv, yml = driver.downloads / "qc_marks.tsv", driver.downloads / "qc_exclude.yml"
    # a download is written as .crdownload and renamed when complete
    _wait(lambda: tsv.is_file() and yml.is_file() and not list(driver.downloads.glob("*.crdownload")),
          what=lambda: f"both exports; the downloads folder holds {sorted(os.listdir(driver.downloads))}")
    with open(tsv, newline="") as fh:
        exported = list(csv.DictReader(fh, delimiter="\t"))
    assert [list(r) for r in exported[:1]] == [["image", "subject", "session", "task", "mark", "note"]]
    assert {r["image"]: (r["mark"], r["note"]) for r in exported} == expected
    for r in exported:
        want = rows[r["image"]]
        assert (r["subject"], r["session"], r["task"]) == (want["subject"], want["session"], want["task"])
    text = yml.read_text()
    hidden = driver.find_element("id", "export-yml").get_attribute("textContent")
    assert text.splitlines()[1:] == hidden.splitlines()[1:]  # the same export (the first line is a time)
    listed = re.findall(r"^  - (.+)$", text, re.M)
    assert sorted(listed) == sorted([order[0], order[2]]) and "# fail: cord leaks into CSF: C3 # edge" in text

    # `u`: the next unmarked image (the fourth, whose mark was taken off), from the first
    driver.find_element("css selector", f"#rows tr[data-image='{order[0]}']").click()
    _keys(driver, "u")
    assert _current(driver) == order[3]

    # the exported TSV loads back into a browser that has no marks
    driver.execute_script("window.localStorage.clear();")
    time.sleep(2.0)  # the clearing committed first (see above)
    driver.refresh()
    assert not any(marks_in_table().values())
    driver.find_element("id", "load-file").send_keys(str(tsv))
    _wait(lambda: marks_in_table() == table, what=lambda: f"the loaded marks (table: {marks_in_table()})")

    read_selection, missing = _study_reader()
    if read_selection is None:
        pytest.skip(f"the study command's selection reader is not there yet (cordseg.selection: {missing})")
    selection = read_selection(yml)
    for image, row in rows.items():
        excluded = image in (order[0], order[2])
        assert selection.matches(row["subject"], row["session"], image) == excluded, image

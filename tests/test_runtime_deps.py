"""`pip install cordseg` installs numpy, scipy, nibabel, onnxruntime and click only: the runtime must work
without the packages that the `train` and `test` extras add (CI installs those extras, so without this
test an import of one of them in runtime code would go unnoticed)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EXTRAS_ONLY = ("onnx", "tensorflow", "keras", "tf2onnx", "jax", "torch", "pytest")

SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    import nibabel as nib
    from cordseg.cli import main
    from cordseg.phantom import make_phantom

    out = sys.argv[1]
    nib.save(make_phantom(seed=3).image, out + "/phantom.nii.gz")
    for args in (["models"], ["sc", out + "/phantom.nii.gz", "-c", "t2", "-o", out + "/seg.nii.gz", "--qc"],
                 ["lesion", out + "/phantom.nii.gz", "-c", "t2", "-o", out + "/les.nii.gz", "--qc"]):
        try:
            main(args, standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    for args in (["train", "sc", "--out", out + "/run"], ["import-keras", "x.h5", "--task", "sc"]):
        try:
            main(args, standalone_mode=False)
        except SystemExit as exc:
            assert exc.code == 2, exc.code
    print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}))
    """
)


@pytest.mark.slow
def test_cli_runs_without_training_or_test_packages(tmp_path):
    script = SCRIPT.format(blocked=set(EXTRAS_ONLY))
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "ok []"
    assert (tmp_path / "seg.nii.gz").is_file() and (tmp_path / "les.nii.gz").is_file()
    assert (tmp_path / "seg_qc.png").is_file() and (tmp_path / "les_qc.png").is_file()
    # the training commands, without their extra: one line naming what to install, no traceback
    refusals = [line for line in run.stderr.splitlines() if "needs the training extra" in line]
    assert len(refusals) == 2 and "pip install 'cordseg[train]'" in refusals[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr

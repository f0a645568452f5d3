"""`cordseg train TASK --recipe shipped`: stages chain through their snapshots and a stopped recipe resumes."""
from __future__ import annotations

import numpy as np
import pytest

from cordseg.training import recipes
from cordseg.training.recipes import Soup, Stage


def _fake_run(calls):
    """Stand-in for train.run: records its arguments and writes the snapshot a real run would."""
    def run(task, out, *, labelmaps, workers, init_weights, log, steps, **kw):
        calls.append(dict(task=task, out=out, labelmaps=labelmaps, init=init_weights, steps=steps, **kw))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"ema_{steps:06d}.weights.h5").write_text("w")
    return run


def test_stages_chain_and_pick_their_label_maps(tmp_path):
    maps = tmp_path / "labelmaps"
    (maps / "PAM50").mkdir(parents=True)
    plan = {"sc": [Stage("PAM50", dict(steps=3, learning_rate=1e-3)), Stage("all", dict(steps=5, pos_weight=2.0))]}
    calls = []
    weights, total = recipes.run_recipe("sc", tmp_path / "out", maps, recipes=plan, run=_fake_run(calls),
                                        log=lambda m: None)
    assert [c["labelmaps"] for c in calls] == [maps / "PAM50", maps]
    assert calls[0]["init"] is None and calls[1]["init"] == tmp_path / "out/stage1/ema_000003.weights.h5"
    assert calls[1]["pos_weight"] == 2.0 and calls[0]["learning_rate"] == 1e-3
    assert weights == tmp_path / "out/stage2/ema_000005.weights.h5" and total == 8
    # run again: both stages are done and nothing trains
    calls.clear()
    assert recipes.run_recipe("sc", tmp_path / "out", maps, recipes=plan, run=_fake_run(calls),
                              log=lambda m: None) == (weights, 8)
    assert calls == []


def test_a_widened_input_carries_through_later_stages(tmp_path):
    wide = ("image", "cord_anomaly")
    plan = {"lesion": [Stage("all", dict(steps=2)), Stage("all", dict(steps=3, channels=wide)),
                       Stage("all", dict(steps=4))]}
    calls = []
    recipes.run_recipe("lesion", tmp_path / "out", tmp_path, recipes=plan, run=_fake_run(calls), log=lambda m: None)
    assert [c.get("channels") for c in calls] == [None, wide, wide]
    assert recipes.final_channels("lesion", plan) == wide
    assert recipes.final_channels("sc", {"sc": [Stage("all", dict(steps=2))]}) == ("image",)
    assert recipes.final_channels("lesion") == recipes.ANOMALY_CHANNELS  # the shipped lesion model's


def test_a_wider_network_carries_through_later_stages_and_soups(tmp_path):
    wide = {"base_filters": 16}
    plan = {"sc": [Stage("all", dict(steps=2)), Stage("all", dict(steps=3, network=wide)),
                   Soup((Stage("all", dict(steps=2, seed=1)), Stage("all", dict(steps=2, seed=2))), ((2,), (2,)))]}
    calls, averaged = [], []
    recipes.run_recipe("sc", tmp_path / "out", tmp_path, recipes=plan, run=_fake_run(calls), log=lambda m: None,
                       average=lambda paths, out, shape, weights: averaged.append(shape) or out.write_text("w"))
    assert [c.get("network") for c in calls] == [None, wide, wide, wide]
    assert averaged == [{"network": wide}]
    assert recipes.final_shape("sc", plan) == {"network": wide}


def test_the_conus_recipe_is_the_cord_recipe_then_one_stage_with_the_roots(tmp_path):
    calls = []
    recipes.run_recipe("conus", tmp_path / "out", tmp_path, run=_fake_run(calls), log=lambda m: None)
    sc = [st.options for st in recipes.RECIPES["sc"]]
    assert len(calls) == len(sc) + 1 and all(c["task"] == "conus" for c in calls)
    for call, options in zip(calls, sc):  # the cord stages as they are: no roots there
        assert {k: call[k] for k in options} == options and not call.get("cauda_equina")
    assert calls[-1]["cauda_equina"] == "bundle"
    assert calls[-1]["init"].parent == tmp_path / f"out/stage{len(sc)}"  # from the cord recipe's last snapshot


def test_a_stage_without_snapshot_is_an_error(tmp_path):
    plan = {"sc": [Stage("all", dict(steps=3))]}
    with pytest.raises(RuntimeError, match="wrote no snapshot"):
        recipes.run_recipe("sc", tmp_path, tmp_path, recipes=plan, run=lambda *a, **k: None, log=lambda m: None)


def test_shipped_recipes_cover_every_task_with_known_options():
    import inspect

    from cordseg.training.train import run

    allowed = set(inspect.signature(run).parameters)
    assert set(recipes.RECIPES) == {"centerline", "sc", "conus", "lesion"}
    for stages in recipes.RECIPES.values():
        assert stages
        for stage in stages:
            branches = stage.branches if isinstance(stage, Soup) else (stage,)
            if isinstance(stage, Soup):  # each branch's named snapshots are ones it writes
                assert len(stage.snapshots) == len(branches)
                for b, keep in zip(branches, stage.snapshots):
                    last = b.options.get("stop_at", b.options["steps"])
                    every = b.options.get("snapshot_every", 1000)
                    assert all(k == last or (k % every == 0 and k < last) for k in keep)
            assert all(b.labelmaps in ("PAM50", "all") and set(b.options) <= allowed for b in branches)


def test_a_soup_stage_averages_named_snapshots_of_branches_from_one_start(tmp_path):
    calls, averaged = [], []

    def run(task, out, *, labelmaps, workers, init_weights, log, steps, snapshot_every=1000, **kw):
        calls.append(dict(out=out, init=init_weights, steps=steps))
        out.mkdir(parents=True, exist_ok=True)
        for k in list(range(snapshot_every, steps, snapshot_every)) + [steps]:
            (out / f"ema_{k:06d}.weights.h5").write_text("w")

    def average(paths, out_path, shape, weights):
        averaged.append((list(paths), out_path, shape, weights))
        out_path.write_text("mean")

    plan = {"lesion": [Stage("all", dict(steps=4)),
                       Soup((Stage("all", dict(steps=6, snapshot_every=2)), Stage("all", dict(steps=5))),
                            ((4, 6), (5,))),
                       Soup((Stage("all", dict(steps=2)), Stage("all", dict(steps=2))), ((2,), (2,)),
                            start_share=0.5)]}
    out = tmp_path / "out"
    weights, total = recipes.run_recipe("lesion", out, tmp_path, recipes=plan, run=run, average=average,
                                        log=lambda m: None)
    start = out / "stage1/ema_000004.weights.h5"
    soup = out / "stage2/ema_000011.weights.h5"
    assert [c["init"] for c in calls] == [None, start, start, soup, soup]  # branches start from the stage before
    third = 1 / 3
    assert averaged[0] == ([out / "stage2/branch1/ema_000004.weights.h5", out / "stage2/branch1/ema_000006.weights.h5",
                            out / "stage2/branch2/ema_000005.weights.h5"], soup, {}, [third, third, third])
    # start_share: the starting weights enter the mean with that share, the branches share the rest
    assert averaged[1] == ([soup, out / "stage3/branch1/ema_000002.weights.h5",
                            out / "stage3/branch2/ema_000002.weights.h5"],
                           out / "stage3/ema_000004.weights.h5", {}, [0.5, 0.25, 0.25])
    assert weights == out / "stage3/ema_000004.weights.h5" and total == 4 + 11 + 4
    calls.clear(), averaged.clear()
    assert recipes.run_recipe("lesion", out, tmp_path, recipes=plan, run=run, average=average,
                              log=lambda m: None) == (weights, 19)
    assert calls == [] and averaged == []


@pytest.mark.training
def test_tiny_recipe_trains_end_to_end(tmp_path):
    """Two real stages of CNN1 (a few steps each) on a hand-made anatomy: the second starts from the first."""
    pytest.importorskip("keras")
    from cordseg.training import synth
    from cordseg.training.train import run

    n, nz = 60, 80
    x, y = np.meshgrid(np.arange(n) - 29.5, np.arange(n) - 29.5, indexing="ij")
    sl = np.where(np.hypot(x, y) * 0.5 <= 3, synth.WM, np.where(np.hypot(x, y) * 0.5 <= 5, synth.CSF, 0))
    anat = synth.Anatomy(np.repeat(sl[:, :, None], nz, 2).astype(np.uint8), np.full((nz, 2), 29.5, np.float32),
                         (0, nz - 1))
    anat.save(tmp_path / "a.npz")
    tiny = dict(batch_size=2, network={"filters": (4, 8, 8)}, patch_shape=None)
    plan = {"centerline": [Stage("all", dict(steps=2, **tiny)), Stage("all", dict(steps=3, **tiny)),
                           Soup((Stage("all", dict(steps=2, seed=1, **tiny)),
                                 Stage("all", dict(steps=3, seed=2, **tiny))),
                                ((2,), (3,)))]}
    weights, total = recipes.run_recipe("centerline", tmp_path / "out", tmp_path / "a.npz", recipes=plan,
                                        run=run, log=lambda m: None)
    assert weights == tmp_path / "out/stage3/ema_000005.weights.h5" and total == 2 + 3 + 5
    assert (tmp_path / "out/stage1/done").read_text().strip() == "2"
    # the soup is the mean of its branches' last snapshots, in the tiny network's shape
    from cordseg.training.networks import build_cnn1

    nets = []
    for f in ("stage3/branch1/ema_000002.weights.h5", "stage3/branch2/ema_000003.weights.h5", weights.name):
        net = build_cnn1(filters=(4, 8, 8))
        net.load_weights(str(tmp_path / "out" / (f if "/" in f else f"stage3/{f}")))
        nets.append(net.get_weights())
    for a, b, mean in zip(*nets):
        np.testing.assert_allclose(mean, (a.astype(np.float64) + b) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.training
def test_export_after_jax_training_runs_in_a_tensorflow_process(tmp_path, monkeypatch):
    """tf2onnx needs TensorFlow: a run on the JAX backend hands the export to a fresh TensorFlow process."""
    keras = pytest.importorskip("keras")
    import argparse
    import subprocess

    from cordseg.training import train

    seen = {}
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(subprocess, "run", lambda cmd, env, check: seen.update(cmd=cmd, env=env))
    a = argparse.Namespace(task="lesion", contrast=None, export=str(tmp_path / "m.onnx"))
    train._export(a, tmp_path / "ema_000010.weights.h5", 10, "summary")
    assert seen["env"]["KERAS_BACKEND"] == "tensorflow"
    assert seen["cmd"][1:4] == ["-m", "cordseg.training.export", "lesion"]
    assert seen["cmd"][-6:] == ["--contrast", "t2,t2s", "--summary", "summary", "--steps", "10"]

"""The training stages each shipped model went through, so that one command reproduces it:
`cordseg train TASK --recipe shipped --out DIR [--export FILE]`.

Each stage trains from the previous stage's last EMA snapshot, in its own folder under DIR (a stopped
recipe resumes: finished stages are skipped, the interrupted one resumes from its checkpoint). A `Soup` stage
trains several branches from that snapshot (stageN/branchK) and averages named snapshots of them. Label maps:
"PAM50" is the template alone, "all" adds the spine-generic manual masks (synth.load_anatomies).

A rerun follows the shipped recipe with today's generator, not bit for bit the shipped weights: the
generator has gained since (stage notes below; sagittal acquisitions, 25% of samples, and the gradient-echo
contrast family came before CNN1's stages 3-4 and after every other shipped stage), and batches depend on the
number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .loop import last_snapshot, snapshot_path, snapshot_step


@dataclass(frozen=True)
class Stage:
    labelmaps: str  # "PAM50" | "all"
    options: dict = field(default_factory=dict)  # keyword arguments of train.run
    note: str = ""


@dataclass(frozen=True)
class Soup:
    """Branches that each train from the previous stage's weights; the stage's result is the mean of the
    named snapshots of every branch (weight averaging: one network, no cost at run time)."""
    branches: tuple  # of Stage
    snapshots: tuple  # per branch, the snapshot steps that enter the mean
    note: str = ""
    start_share: float = 0.0  # weight of the starting weights themselves in the mean (the rest: the snapshots)


STAGE5_STOP = 500  # the lesion recipe's fifth stage: where the shipped run was stopped
STAGE7_STOP = 1000  # the lesion recipe's last stage: the snapshot chosen on the lesion choosing set
ANOMALY_CHANNELS = ("image", "cord_anomaly")
SC_STAGE2_STOP = 400  # the cord recipe's second stage: the snapshot chosen on the choosing scans


RECIPES = {
    "centerline": [
        Stage("PAM50", dict(steps=1500, batch_size=32, learning_rate=2e-3, max_minutes=11.3),
              "shipped run: stopped by its 11.3-minute limit at step 1,298 (one GPU, 5 workers), with the "
              "smallest cord/CSF intensity gap then fixed at 0.15 (now drawn from 0.06-0.15)"),
        Stage("all", dict(steps=1100, batch_size=32, learning_rate=1e-3, seed=3)),
        Stage("all", dict(steps=1500, batch_size=32, learning_rate=5e-4, seed=11, snapshot_every=250),
              "shipped run: two CPU cores, 1 worker, 80 minutes; the first with the gradient-echo contrast family"),
        Stage("all", dict(steps=1000, batch_size=32, learning_rate=3e-4, seed=13, max_minutes=45, snapshot_every=250),
              "shipped run: two CPU cores, 1 worker, stopped by its 45-minute limit at step 836"),
        Stage("all", dict(steps=600, batch_size=32, learning_rate=3e-4, seed=19, snapshot_every=150,
                          cauda_equina=True),
              "shipped run: two CPU cores, 1 worker, 25 minutes; the template with a dural sac and nerve roots "
              "below the conus, 12% of its slices drawn around the conus"),
        Stage("all", dict(steps=600, batch_size=32, learning_rate=2e-4, seed=23, snapshot_every=150,
                          cauda_equina=True),
              "shipped run: two CPU cores, 1 worker, 25 minutes; stage 5 continued at a lower learning rate"),
    ],
    "sc": [
        Stage("PAM50", dict(steps=3000, batch_size=8, learning_rate=2e-3, max_minutes=11.3),
              "shipped run: stopped by its 11.3-minute limit at step 2,096 (one GPU, 5 workers), with the "
              "smallest cord/CSF intensity gap then fixed at 0.15 (now drawn from 0.06-0.15)"),
        Stage("PAM50", dict(steps=800, stop_at=SC_STAGE2_STOP, batch_size=4, learning_rate=3e-4, seed=81,
                            snapshot_every=100, sagittal_share=0.5),
              "shipped run: two CPU cores, 1 worker, 22 minutes for 800 steps, from stage 1's weights as recovered "
              "from its ONNX file (training/onnx_weights.py); today's generator (sagittal acquisitions, "
              "gradient-echo family), half of the patches sagittal"),
    ],
    "lesion": [
        Stage("all", dict(steps=4000, batch_size=8, learning_rate=2e-3, pos_weight=2.0, seed=1),
              "shipped run: one GPU, 4 workers; its cosine decay ran over 3,500 steps and the last 500 at the "
              "floor (it was resumed with more steps)"),
        Soup((Stage("all", dict(steps=2800, stop_at=2299, batch_size=8, learning_rate=5e-4, pos_weight=2.0,
                                seed=41, snapshot_every=700)),
              Stage("all", dict(steps=2800, stop_at=2393, batch_size=8, learning_rate=5e-4, pos_weight=2.0,
                                seed=42, snapshot_every=700, lesion_style="faint"))),
             ((2100, 2299), (2100, 2393)),
             "shipped runs: one GPU, 4 workers each, four networks at once; both were stopped by their 8.2-minute "
             "limit (at steps 2,299 and 2,393 of a 2,800-step cosine decay)"),
        Soup(tuple(Stage("all", dict(steps=700, batch_size=8, learning_rate=2e-4, pos_weight=2.0, seed=seed,
                                     snapshot_every=350, **style))
                   for seed, style in ((51, dict(lesion_style="faint")), (52, {}),
                                       (53, dict(lesion_style="faint")), (54, {}))),
             ((700,),) * 4,
             "shipped runs: one GPU, 4 workers each, four networks at once, 2.2 minutes; the result weighs the "
             "starting weights 1/2 and each branch 1/8", start_share=0.5),
        Stage("all", dict(steps=600, batch_size=4, learning_rate=2e-4, seed=71, snapshot_every=100,
                          lesion_style="hard", real_backgrounds=True),
              "shipped run: two CPU cores, 1 worker, 24 minutes, from stage 3's weights as recovered from its ONNX "
              "file (training/onnx_weights.py); half of the patches carved from real lesion-free scans"),
        Stage("all", dict(steps=1500, stop_at=STAGE5_STOP, batch_size=4, learning_rate=2e-4, seed=72,
                          snapshot_every=250, lesion_style="hard", real_backgrounds=True),
              "shipped run: two CPU cores shared with other jobs, 1 worker; stopped at the snapshot chosen on the "
              "lesion choosing set"),
        Stage("all", dict(steps=900, batch_size=4, learning_rate=3e-4, seed=91, snapshot_every=150,
                          lesion_style="hard", real_backgrounds=True, channels=ANOMALY_CHANNELS),
              "shipped run: two CPU cores, 1 worker, 15 minutes; the network widened with the cord-anomaly input "
              "channel (its first convolution's new weights start at zero)"),
        Stage("all", dict(steps=1500, stop_at=STAGE7_STOP, batch_size=4, learning_rate=2e-4, seed=92,
                          snapshot_every=250, lesion_style="hard", real_backgrounds=True, channels=ANOMALY_CHANNELS),
              "shipped run: two CPU cores shared with the evaluation of stage 6, 1 worker, 28 minutes for 1,500 "
              "steps; the snapshot at step 1,000 was chosen on the lesion choosing set"),
    ],
}


# the cord recipe, then one stage with the cauda equina (cordseg.conus)
RECIPES["conus"] = RECIPES["sc"] + [
    Stage("PAM50", dict(steps=600, batch_size=4, learning_rate=3e-4, seed=141, snapshot_every=150, sagittal_share=0.5,
                        cauda_equina="bundle"),
          "shipped run: two CPU cores shared with another run, 1 worker, 21 minutes; from the cord recipe's last "
          "snapshot, 12% of the patches around the template's conus with a dural sac and a clump of nerve roots "
          "below it"),
]

CARRIED = ("channels", "network")  # a network's shape: once a stage widens it, the later stages keep it


def _carry(options, shape):
    """`options` with the network shape set by earlier stages (`shape`, updated in place by this stage's)."""
    shape.update({k: options[k] for k in CARRIED if options.get(k)})
    return dict(options, **shape)


def final_shape(task, recipes=None) -> dict:
    """{"channels": ..., "network": ...} of the network the recipe's last stage trains, where a stage set them
    (stages widen the network, never narrow it)."""
    shape = {}
    for stage in (recipes or RECIPES)[task]:
        for st in (stage.branches if isinstance(stage, Soup) else (stage,)):
            _carry(st.options, shape)
    return shape


def final_channels(task, recipes=None) -> tuple:
    """The input channels of the network the recipe's last stage trains."""
    return tuple(final_shape(task, recipes).get("channels", ("image",)))


def run_recipe(task, out, labelmaps_root, *, run, workers=0, log=print, recipes=None,
               average=None) -> tuple[Path, int]:
    """Run every stage of `task`'s recipe with `run` (training.train.run, or a stand-in); returns (the last EMA
    snapshot, total steps over all stages).

    A soup's snapshot is named after the steps its branches trained together, so the total counts them all."""
    if average is None:
        average = _average_for(task)
    stages = (recipes or RECIPES)[task]
    root, out = Path(labelmaps_root), Path(out)

    shape = {}

    def train_stage(stage, folder, init, label):
        options = _carry(stage.options, shape)
        done = (folder / "done").exists()
        if not done:
            log(f"{label}: {options}" + (f" ({stage.note})" if stage.note else ""))
            maps = root / "PAM50" if stage.labelmaps == "PAM50" and (root / "PAM50").is_dir() else root
            run(task, folder, labelmaps=maps, workers=workers, init_weights=init, log=log, **options)
        last = last_snapshot(folder)
        if last is None:
            raise RuntimeError(f"{label} of the {task} recipe wrote no snapshot in {folder}")
        if not done:  # finished, or stopped by its time or step limit: either way a rerun moves on
            (folder / "done").write_text(f"{snapshot_step(last)}\n")
        return last

    prev, total = None, 0
    for i, stage in enumerate(stages, start=1):
        folder = out / f"stage{i}"
        label = f"stage {i}/{len(stages)}"
        if isinstance(stage, Soup):
            ingredients, steps = [], 0
            for b, (branch, keep) in enumerate(zip(stage.branches, stage.snapshots), start=1):
                sub = folder / f"branch{b}"
                steps += snapshot_step(train_stage(branch, sub, prev, f"{label}, branch {b}"))
                ingredients += [snapshot_path(sub, k) for k in keep]
            shares = [(1.0 - stage.start_share) / len(ingredients)] * len(ingredients)
            if stage.start_share:
                ingredients, shares = [prev] + ingredients, [stage.start_share] + shares
            prev = snapshot_path(folder, steps)
            if not prev.exists():
                log(f"{label}: the mean of {len(ingredients)} snapshots" + (f" ({stage.note})" if stage.note else ""))
                branch_shape = dict(shape)
                _carry(stage.branches[0].options, branch_shape)
                average(ingredients, prev, branch_shape, shares)
        else:
            prev = train_stage(stage, folder, prev, label)
            steps = snapshot_step(prev)
        total += steps
    return prev, total


def _average_for(task):
    def average(paths, out_path, shape=None, weights=None):
        """The weighted mean of `paths`, snapshots of the network `shape` (recipe options) describes."""
        from . import tasks
        from .loop import average_snapshots

        shape = shape or {}
        cfg = tasks.with_network(tasks.TASKS[task], shape.get("network"), shape.get("channels"))
        return average_snapshots(lambda: tasks.build_model(cfg), paths, out_path, weights)
    return average

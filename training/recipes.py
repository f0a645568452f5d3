"""The training stages each shipped model went through, so that one command reproduces it:
`cordseg train TASK --recipe shipped --out DIR [--export FILE]`.

Each stage trains from the previous stage's last EMA snapshot, in its own folder under DIR (a stopped
recipe resumes: finished stages are skipped, the interrupted one resumes from its checkpoint). Label maps:
"PAM50" is the template alone, "all" adds the spine-generic manual masks (synth.load_anatomies).

A rerun follows the shipped recipe with today's generator, not bit for bit the shipped weights: the
generator has gained since (stage notes below; sagittal acquisitions, 25% of samples, and the gradient-echo
contrast family came before CNN1's stages 3-4 and after every other shipped stage), and batches depend on the
number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .loop import last_snapshot, snapshot_step


@dataclass(frozen=True)
class Stage:
    labelmaps: str  # "PAM50" | "all"
    options: dict = field(default_factory=dict)  # keyword arguments of train.run
    note: str = ""


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
    ],
    "sc": [
        Stage("PAM50", dict(steps=3000, batch_size=8, learning_rate=2e-3, max_minutes=11.3),
              "shipped run: stopped by its 11.3-minute limit at step 2,096 (one GPU, 5 workers), with the "
              "smallest cord/CSF intensity gap then fixed at 0.15 (now drawn from 0.06-0.15)"),
    ],
    "lesion": [
        Stage("all", dict(steps=4000, batch_size=8, learning_rate=2e-3, pos_weight=2.0, seed=1),
              "shipped run: one GPU, 4 workers; its cosine decay ran over 3,500 steps and the last 500 at the "
              "floor (it was resumed with more steps)"),
    ],
}


def run_recipe(task, out, labelmaps_root, *, workers=0, log=print, recipes=None, run=None) -> tuple[Path, int]:
    """Run every stage of `task`'s recipe; returns (the last EMA snapshot, total steps over all stages)."""
    if run is None:
        from .train import run
    stages = (recipes or RECIPES)[task]
    root, out = Path(labelmaps_root), Path(out)
    prev, total = None, 0
    for i, stage in enumerate(stages, start=1):
        folder = out / f"stage{i}"
        done = (folder / "done").exists()
        if not done:
            log(f"stage {i}/{len(stages)}: {stage.options}" + (f" ({stage.note})" if stage.note else ""))
            maps = root / "PAM50" if stage.labelmaps == "PAM50" and (root / "PAM50").is_dir() else root
            run(task, folder, labelmaps=maps, workers=workers, init_weights=prev, log=log, **stage.options)
        prev = last_snapshot(folder)
        if prev is None:
            raise RuntimeError(f"stage {i} of the {task} recipe wrote no snapshot in {folder}")
        steps = snapshot_step(prev)
        if not done:  # finished, or stopped by its time limit: either way a rerun moves on
            (folder / "done").write_text(f"{steps}\n")
        total += steps
    return prev, total

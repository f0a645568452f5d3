"""Training loop: batches made in a background thread, checkpoints with optimiser state, resumption.

`train_on_batch` in a plain loop keeps checkpoint/resume logic simple and explicit: the checkpoint holds the
model with its optimiser (and the optimiser's moving average of the weights, which is what gets exported),
and `state.json` holds the step count.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np


def _producer(sample_batch, seed, start_step, q, stop, workers=0):
    if workers > 0:  # a process pool, for machines with many cores (each worker builds its own sampler)
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no fork: the training framework runs threads
        with ctx.Pool(workers, initializer=_pool_init, initargs=(sample_batch,)) as pool:
            for batch in pool.imap(_pool_batch, ((seed, s) for s in range(start_step, 1 << 40)), chunksize=2):
                if not _put(q, batch, stop):
                    return
        return
    step = start_step
    while not stop.is_set():
        rng = np.random.default_rng([seed, step])
        batch = sample_batch(rng)
        if not _put(q, batch, stop):
            return
        step += 1


_POOL_SAMPLER = None


def _pool_init(sample_batch):
    global _POOL_SAMPLER
    _POOL_SAMPLER = sample_batch


def _pool_batch(seed_step):
    return _POOL_SAMPLER(np.random.default_rng(list(seed_step)))


def _put(q, batch, stop):
    while not stop.is_set():
        try:
            q.put(batch, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def snapshot_path(out_dir, step: int) -> Path:
    """Where `train` saves the EMA weights after `step` steps."""
    return Path(out_dir) / f"ema_{step:06d}.weights.h5"


def snapshot_step(path) -> int | None:
    """The step of a snapshot written by `train` (ema_001500.weights.h5 -> 1500), None for other names."""
    digits = Path(path).name.split(".")[0].rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else None


def last_snapshot(out_dir) -> Path | None:
    """The latest EMA snapshot in a training folder, or None."""
    snaps = sorted(Path(out_dir).glob("ema_*.weights.h5"))
    return snaps[-1] if snaps else None


def save_atomically(save, path) -> Path:
    """`save(name)` into a temporary file beside `path`, then rename: a run killed while writing never leaves
    a half-written checkpoint or snapshot under the real name. The prefix keeps Keras's required suffix and
    keeps the temporary file out of `last_snapshot`'s pattern."""
    path = Path(path)
    tmp = path.with_name("tmp_" + path.name)
    save(str(tmp))
    os.replace(tmp, path)
    return path


def average_snapshots(build_model, paths, out_path, weights=None) -> Path:
    """One weights file holding the mean of several snapshots (all variables, batch-norm statistics included),
    equal or `weights`-weighted. Checkpoints of one run swing on real images; their mean is steadier. Runs
    fine-tuned from one starting point average too (a "model soup"): one network, no cost at run time."""
    shares = np.full(len(paths), 1.0 / len(paths)) if weights is None else np.asarray(weights, float)
    if len(shares) != len(paths) or np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"weights must be {len(paths)} non-negative shares summing to 1, got {weights}")
    model = build_model()
    total = None
    for p, share in zip(paths, shares):
        model.load_weights(str(p))
        w = [share * np.asarray(v, np.float64) for v in model.get_weights()]
        total = w if total is None else [t + x for t, x in zip(total, w)]
    model.set_weights(total)
    return save_atomically(model.save_weights, out_path)


def ema_weights(model):
    """The optimiser's moving average of the trainable weights (the model's own where there is none)."""
    opt = model.optimizer
    avg = getattr(opt, "_model_variables_moving_average", None) if opt is not None else None
    if not avg:
        return None
    return [np.asarray(v) for v in avg]


def save_snapshot(model, path):
    """Save weights with the moving average swapped in (training weights left as they were)."""
    avg = ema_weights(model)
    current = [np.asarray(v) for v in model.trainable_variables]
    if avg is not None:
        for v, a in zip(model.trainable_variables, avg):
            v.assign(a)
    save_atomically(model.save_weights, path)
    if avg is not None:
        for v, c in zip(model.trainable_variables, current):
            v.assign(c)


def train(build_model, loss, sample_batch, *, out_dir, steps, learning_rate, seed=0, checkpoint_every=250,
          snapshot_every=1000, log=print, lr_schedule="cosine", workers=0, max_seconds=None, stop_at=None):
    """Train `build_model()` on batches from `sample_batch(rng)` for `steps` steps, resuming if possible.

    `stop_at` ends the run early at that step while the learning-rate schedule still spans `steps`: a recipe
    uses it to repeat a run that its time limit stopped, on hardware of any speed."""
    import keras

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, state_file = out / "checkpoint.keras", out / "state.json"
    step = 0
    if ckpt.exists() and state_file.exists():
        model = keras.models.load_model(str(ckpt), compile=True, custom_objects={loss.__name__: loss})
        step = json.loads(state_file.read_text())["step"]
        log(f"resumed from step {step}")
    else:
        model = build_model()
        if lr_schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps, alpha=0.05,
                                                        warmup_target=None)
        else:
            lr = learning_rate
        model.compile(optimizer=keras.optimizers.Adam(lr, use_ema=True, ema_momentum=0.995), loss=loss)
    q: queue.Queue = queue.Queue(maxsize=6 + 2 * workers)
    stop = threading.Event()
    worker = threading.Thread(target=_producer, args=(sample_batch, seed, step, q, stop, workers), daemon=True)
    worker.start()
    t0, losses = time.time(), []
    logfile = open(out / "log.csv", "a")
    try:
        last = steps if stop_at is None else min(steps, stop_at)
        while step < last:
            x, y = q.get()
            losses.append(float(model.train_on_batch(x, y)))
            step += 1
            if step % 50 == 0 or step == last:
                msg = f"{step},{np.mean(losses):.5f},{time.time() - t0:.1f}"
                logfile.write(msg + "\n")
                logfile.flush()
                log(f"step {step} loss {np.mean(losses):.4f} ({time.time() - t0:.0f} s)")
                losses = []
            out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
            stopping = out_of_time or step == last < steps
            if step % checkpoint_every == 0 or step == steps or stopping:
                save_atomically(model.save, ckpt)
                state_file.write_text(json.dumps({"step": step}))
            if step % snapshot_every == 0 or step == steps or stopping:
                save_snapshot(model, snapshot_path(out, step))
            if stopping:
                log(f"stopping at step {step}: " + (f"time budget of {max_seconds:.0f} s spent" if out_of_time
                                                     else f"stop_at {stop_at}"))
                break
    finally:
        stop.set()
        logfile.close()
    return model

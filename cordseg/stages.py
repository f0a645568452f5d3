"""Stage events: how long each step of a run took, for whoever asks (a benchmark, a verbose CLI).

A run given `on_stage` calls it once per finished stage with a StageEvent. Names are stable and dotted:
a stage's parts carry its name as prefix ("centerline.cnn1" is part of "centerline"), so a consumer sums
the top-level names for the whole run and reads the parts for detail. A stage that runs twice (a second
CNN1 pass, a second screened slab) sends two events.

    load, reorient, models        reading the image, to RPI, finding models and opening their sessions
    centerline                    CNN1 and OptiC; parts: .resample .cnn1 .second_look .optic
    cord, lesions                 CNN2's soft map; parts: .resample .normalise .cnn2 .back
    screening                     the lesion screening (its cord CNN2 runs as screening.cord.*)
    mask, output                  thresholding (largest component), back to the input's grid
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, NamedTuple


class StageEvent(NamedTuple):
    stage: str
    seconds: float  # wall time
    cpu_seconds: float  # process CPU time, all threads


OnStage = Callable[[StageEvent], None]


@contextmanager
def timed(on_stage: OnStage | None, stage: str):
    """Send `stage`'s wall and CPU time to `on_stage` when the block finishes without error."""
    if on_stage is None:
        yield
        return
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    on_stage(StageEvent(stage, time.perf_counter() - t0, time.process_time() - c0))

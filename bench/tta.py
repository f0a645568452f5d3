"""Test-time augmentation for measuring it: a network averaged over flips beyond the runtime's mirror."""
from __future__ import annotations

import itertools

import numpy as np

HELP = ("average the {task} network over every combination of flips along these axes (x: left-right, the "
        "runtime's mirror; y: antero-posterior; z: along the cord), e.g. xz")


def flip_tta(axes: str, task: str):
    """A Model.predict that averages `task`'s network over every combination of flips along `axes`; other
    networks, and calls without the mirror, run as they do at run time."""
    from cordseg.inference import Model

    plain = Model.predict
    dims = [" xyz".index(a) for a in axes]

    def predict(self, batch, *, flip_average=False):
        if not flip_average or self.task != task:
            return plain(self, batch, flip_average=flip_average)
        outs = []
        for k in range(len(dims) + 1):
            for combo in itertools.combinations(dims, k):
                flipped = np.ascontiguousarray(np.flip(batch, combo)) if combo else batch
                y = plain(self, flipped)
                outs.append(np.flip(y, combo) if combo else y)
        return np.mean(outs, axis=0)

    return predict


def install(axes: str, task: str) -> None:
    """Patch Model.predict for this process (a bench's --tta); nothing where `axes` is empty."""
    if axes:
        if set(axes) - set("xyz"):
            raise SystemExit(f"--tta: axes are x, y and z, not {axes!r}")
        from cordseg.inference import Model

        Model.predict = flip_tta(axes, task)

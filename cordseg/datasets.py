"""Where the real scans used by the tests, benchmarks and training live: ../shared/data beside the checkout
(or beside the working folder), or the folder $CORDSEG_SHARED_DATA names. Read-only; never part of the
package."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "CORDSEG_SHARED_DATA"
_CHECKOUT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared data folder when there is one, else None."""
    env = os.environ.get(ENV)
    if env:
        return Path(env) if Path(env).is_dir() else None
    for base in (_CHECKOUT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def shared_data(*parts) -> Path:
    """A path in the shared data folder; where there is none, in the place it is looked for first (so that
    `.exists()` is False and messages say where it was expected)."""
    env = os.environ.get(ENV)
    root = shared_data_dir() or (Path(env) if env else _CHECKOUT.parent / "shared" / "data")
    return root.joinpath(*map(str, parts))


def shared_anchors(*parts) -> Path:
    """The published models beside the data folder (../shared/anchors)."""
    return shared_data().parent.joinpath("anchors", *map(str, parts))

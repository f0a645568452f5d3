"""ONNX models: finding the file for a (task, contrast), reading its metadata, running it.

Every per-model number (grid, patch shape, normalisation, threshold) comes from the file's metadata;
nothing model-specific is hard-coded here. onnxruntime is imported only when a model is first opened.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError

from .contract import CONTRASTS, REQUIRED_KEYS, TASKS, ModelContract  # noqa: F401 (re-exported)


def model_dirs() -> list[Path]:
    """Where models are looked for: $CORDSEG_MODEL_DIR first, then the installed package's models."""
    dirs = []
    env = os.environ.get("CORDSEG_MODEL_DIR")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    try:
        from . import models as _pkg  # installed wheel: cordseg/models

        dirs.extend(Path(p) for p in _pkg.__path__)
    except ImportError:
        pass
    source_models = Path(__file__).resolve().parent.parent / "models"  # running from a source checkout
    if source_models.is_dir():
        dirs.append(source_models)
    seen, unique = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


# ONNX files are protobuf ModelProto messages (onnx/onnx.proto): field 1 ir_version, 7 graph, 14 metadata_props,
# each entry a StringStringEntryProto (1 key, 2 value). Reading these few fields here keeps the `onnx` package out
# of the runtime's dependencies (onnxruntime exposes metadata only through a full session).
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _protobuf_fields(buf):
    """(field number, value) for each field of one protobuf message; length-delimited values are
    memoryview slices, fixed-width ones are skipped (None)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield number, value


def read_metadata(path) -> dict:
    """metadata_props of an ONNX file, read straight from its protobuf bytes (no weights loaded)."""
    try:
        buf = memoryview(Path(path).read_bytes())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        meta, seen = {}, set()
        for number, value in _protobuf_fields(buf):
            seen.add(number)
            if number == _METADATA_PROPS and isinstance(value, memoryview):  # a length-delimited entry
                entry = {n: bytes(v).decode("utf-8") for n, v in _protobuf_fields(value) if n in (1, 2)}
                meta[entry.get(1, "")] = entry.get(2, "")
        if not {_IR_VERSION, _GRAPH} <= seen:
            raise ValueError("no graph")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None
    return meta


@dataclass
class Model:
    """An ONNX model and its contract (parsed and checked when the model is made: a bad value is a
    ModelError naming its key). The session is created on first use and reused."""

    path: Path
    metadata: dict
    threads: int | None = None
    _session: object = field(default=None, repr=False)
    contract: ModelContract = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.contract is None:
            self.contract = ModelContract.from_metadata(self.metadata, Path(self.path).name)

    @classmethod
    def open(cls, path, threads: int | None = None) -> "Model":
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        return cls.from_metadata(path, read_metadata(path), threads)

    @classmethod
    def from_metadata(cls, path: Path, meta: dict, threads: int | None = None) -> "Model":
        """A model whose metadata was already read; refuses files that lack or break the runtime's contract."""
        return cls(path, meta, threads)

    # --- the contract, parsed ---
    @property
    def task(self) -> str:
        return self.contract.task

    @property
    def contrasts(self) -> tuple:
        return self.contract.contrasts

    @property
    def layout(self) -> str:
        return self.contract.layout

    @property
    def patch_shape(self) -> tuple | None:
        return self.contract.patch_shape

    @property
    def voxel_size(self) -> tuple:
        return self.contract.voxel_size

    @property
    def normalisation(self) -> str:
        return self.contract.normalisation

    @property
    def normalisation_params(self) -> str | None:
        return self.contract.normalisation_params

    @property
    def threshold(self) -> float:
        return self.contract.threshold

    def threshold_for(self, contrast: str | None) -> float:
        """The threshold for images of `contrast`: the model's own for it, if it names one, else `threshold`."""
        return dict(self.contract.contrast_thresholds).get(contrast, self.contract.threshold)

    @property
    def min_lesion_contrast(self) -> float:
        """Lesion models: the least lesion/cord intensity ratio a reported lesion has (0: no check)."""
        return self.contract.min_lesion_contrast

    @property
    def size_multiple(self) -> int:
        return self.contract.size_multiple

    @property
    def warning(self) -> str | None:
        """A caveat the model's authors wrote into the file (e.g. not validated), shown to users."""
        return self.contract.warning

    def describe(self) -> str:
        return (f"{self.path.name}: task {self.task}, contrasts {','.join(self.contrasts)}, "
                f"patch {self.metadata['cordseg_patch_shape']}, voxel {self.metadata['cordseg_voxel_size']} mm, "
                f"threshold {self.threshold:g}"
                + "".join(f" ({c} {t:g})" for c, t in self.contract.contrast_thresholds) + ", "
                + self._screening()
                + (f"input channels {','.join(self.channels)}, " if len(self.channels) > 1 else "")
                + f"{self.metadata.get('cordseg_training', '')}"
                + (f" WARNING: {self.warning}" if self.warning else ""))

    def _screening(self) -> str:
        c = self.contract
        if not self.min_lesion_contrast:
            return ""
        if c.lesion_contrast == "adaptive":
            text = (f"lesion screening: the scan's own bar (at least {c.lesion_contrast_floor:g}; "
                    f"{self.min_lesion_contrast:g} where it sets none)")
        else:
            text = f"lesion screening min contrast {self.min_lesion_contrast:g} ({c.lesion_contrast})"
        edge = f", grown to the local edge {':'.join(f'{v:g}' for v in c.lesion_edge)}" if c.lesion_edge else ""
        return text + edge + ", "

    # --- running ---
    def session(self):
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                # a signal during the import: its C extension reports the handler's interrupt as an ImportError
                behind = exc
                while behind is not None and not isinstance(behind, KeyboardInterrupt):
                    behind = behind.__cause__ or behind.__context__
                if behind is not None:
                    raise behind from None
                raise ModelError("onnxruntime is not installed") from None
            ort.set_default_logger_severity(3)  # its environment's own lines (thread affinity...) too: errors only
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = int(self.threads)
            # no arena: each call's activations go back to the system when it returns, instead of the largest
            # call's staying reserved for the process's life (peak RSS of a whole-slice CNN1 pass: about half);
            # no memory pattern: its one block for all of a call's tensors set the peak of the CNN2 passes
            # (`cordseg lesion` on a 384 x 384 x 52 scan: 400 -> 350 MB, same speed)
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
            # threads wait for work asleep, not spinning: next to other jobs on the same cores a spinning
            # thread takes the time its partner needs (measured on a loaded 2-core machine: a quarter to
            # a half less wall time per call)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                     providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise ModelError(f"{self.path.name}: onnxruntime cannot load it ({exc})") from None
        return self._session

    @property
    def channels(self) -> tuple:
        """CNN2's input channels ("image" first); predict takes a last axis of this size when there are more."""
        return tuple(self.contract.channels)

    def predict(self, batch: np.ndarray, *, flip_average: bool = False) -> np.ndarray:
        """batch: (N, *spatial) float32 -> probabilities of the same shape; (N, *spatial, C) for a model
        with C > 1 input channels -> (N, *spatial).

        flip_average: also run the left-right mirror image and average (the cord is nearly symmetric, so this
        cancels part of the network's own asymmetric errors at twice the cost).
        """
        if flip_average:
            direct = self.predict(batch)
            mirrored = self.predict(np.ascontiguousarray(batch[:, ::-1]))[:, ::-1]
            return 0.5 * (direct + mirrored)
        sess = self.session()
        x = np.asarray(batch, np.float32)
        spatial = batch.shape
        if len(self.channels) > 1:
            spatial = batch.shape[:-1]
            if batch.shape[-1] != len(self.channels):
                raise ModelError(f"{self.path.name}: the model takes {len(self.channels)} channels "
                                 f"({','.join(self.channels)}), got {batch.shape[-1]}")
        elif self.layout in ("NHWC", "NXYZC"):
            x = x[..., None]
        elif self.layout in ("NCHW", "NCXYZ"):
            x = x[:, None]
        else:
            raise ModelError(f"{self.path.name}: unknown layout '{self.layout}'")
        name = sess.get_inputs()[0].name
        try:
            y = sess.run(None, {name: x})[0]
            return y.reshape(spatial).astype(np.float32)
        except Exception as exc:  # onnxruntime's errors, or an output of another shape
            raise ModelError(f"{self.path.name}: the model does not accept its metadata's input "
                             f"({self.layout}, {x.shape}): {str(exc).splitlines()[0][:200]}") from None


def release_memory() -> None:
    """Give the heap's free pages back to the system after a network pass (glibc only; elsewhere nothing).

    ONNX Runtime's worker threads allocate activations from their own malloc arenas, and glibc keeps what they
    free for reuse: after CNN1 the process would hold ~90 MB of free heap through the rest of the run, on top
    of which CNN2's own activations set the peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def find_model(task: str, contrast: str | None, path=None, threads: int | None = None,
               optional: bool = False) -> Model | None:
    """The model file for `task` and `contrast`: `path` when given, else the first match in model_dirs()
    (None where there is none and the model is `optional`)."""
    if path is not None:
        model = Model.open(path, threads)
        if model.task != task:
            raise ModelError(f"{Path(path).name} is a '{model.task}' model, not a '{task}' model")
        return model
    for folder in model_dirs():
        for candidate in sorted(Path(folder).glob("*.onnx")):
            try:
                meta = read_metadata(candidate)
            except ModelError:
                continue
            if meta.get("cordseg_task") != task:
                continue
            served = [c.strip() for c in meta.get("cordseg_contrast", "").split(",")]
            if contrast is None or contrast in served:
                return Model.from_metadata(candidate, meta, threads)
    if optional:
        return None
    where = ", ".join(str(d) for d in model_dirs()) or "(no model folder)"
    raise ModelError(f"no '{task}' model for contrast '{contrast}' in {where}")


def list_models() -> list[Model]:
    found = []
    for folder in model_dirs():
        for candidate in sorted(Path(folder).glob("*.onnx")):
            try:
                found.append(Model.open(candidate))
            except ModelError:
                continue
    return found

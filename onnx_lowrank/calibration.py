"""Calibration data: feeds for a model, from files, scripts, readers, arrays, or synthesized.

A *feed* is one ``session.run`` input: a dict of model input name -> array whose first axis
holds samples.  Every source below becomes a :class:`CalibrationData`, which checks each feed
against the model's inputs (names, dtype kind, rank, fixed dimensions) and can be iterated as
often as a source allows (files are re-opened on every pass; nothing is held in memory between
passes):

* an ``.npz`` whose keys are the model's input names, first axis = samples, cut into feeds of
  ``calib_batch`` samples (``--calib data.npz``);
* a directory of ``.npz`` files, one feed each, in file-name order (``--calib data/``);
* ``file.py:func``, a function returning an iterable of feed dicts (``--calib-script``);
* an onnxruntime-style ``CalibrationDataReader`` (anything with ``get_next() -> dict | None``);
* any iterable of feed dicts, a dict of arrays (cut like an ``.npz``), or one array for a
  single-input model;
* nothing: ``samples`` random samples synthesized from the model's input types and shapes.

Labels (integer class ids, one per sample) come from ``labels=`` (an array or ``.npy`` path,
``--labels``) or from a ``labels`` key in the ``.npz`` files.

Synthetic data (see ``docs/verification.md``): a leading dimension without a fixed size is the
sample axis; any other unknown dimension must be given with ``--input-shape name:1x128``.  Floats
are standard normal, integers uniform in ``[0, 100)`` (inputs named ``*mask*`` get ones, inputs
named ``*type_ids*`` or ``*segment*`` zeros), booleans uniform; ``--input-range name:low,high``
replaces that with uniform values in ``[low, high)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationError, UsageError, option, option_value
from .options import parse_input_ranges, parse_input_shapes

__all__ = [
    "InputSpec",
    "reads_once",
    "input_type_mismatch",
    "CalibrationData",
    "load_calibration",
    "iter_feeds",
    "check_feed",
    "feed_samples",
    "flag_inputs",
    "model_inputs",
    "parse_input_shapes",
    "parse_input_ranges",
    "DEFAULT_INT_RANGE",
    "SYNTHETIC_WARNING",
]

log = logging.getLogger(__name__)

#: Integer inputs (token ids, categorical features) are drawn from ``[0, 100)`` unless told
#: otherwise: every vocabulary or embedding table worth compressing has at least 100 rows.
DEFAULT_INT_RANGE = (0, 100)
DEFAULT_SEED = 0
SYNTHETIC_WARNING = (
    "no calibration data: compared the models on {n} random samples; this checks fidelity to the "
    "original, not task accuracy (pass {calib} with real data for that)"
)
LABELS_KEY = "labels"

@dataclass(frozen=True)
class InputSpec:
    """One graph input that needs a value at run time.

    Attributes:
        name: Input name.
        dtype: NumPy dtype, or ``None`` when the input is not a plain tensor.
        shape: Dimensions (``int`` fixed, ``str`` symbolic, ``None`` unknown), or ``None``
            when even the rank is unknown.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype if self.dtype is not None else 'non-tensor'} {dims}"


def model_inputs(model: onnx.ModelProto | str | os.PathLike) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (IR < 4 lists both)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        dtype = None
        shape = None
        if tt is not None:
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except (KeyError, TypeError, ValueError):
                dtype = None
            if tt.HasField("shape"):
                shape = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                )
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


# --------------------------------------------------------------------------- feed checks

def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs) or "none"


def _check_input(spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...], where: str, *, free_lead: bool = False) -> None:
    """Check a value's dtype kind and shape against an input; ``free_lead`` skips the sample axis."""
    want = spec.dtype
    if want is not None and dtype != want:
        same_kind = (dtype.kind == "f" and want.kind == "f") or (dtype.kind in "iu" and want.kind in "iu")
        if not same_kind:
            hint = ", which an .npz cannot hold: calibrate a float32 export of the model" if want.name == "bfloat16" else ""
            raise CalibrationError(f"{where}: input '{spec.name}' is {dtype}; the model expects {want}{hint}.")
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise CalibrationError(
            f"{where}: input '{spec.name}' has rank {len(shape)} (shape {list(shape)}); "
            f"the model expects rank {len(spec.shape)} ({spec.describe()}), first axis = samples."
        )
    for axis, (got, dim) in enumerate(zip(shape, spec.shape)):
        if free_lead and axis == 0:
            continue
        if isinstance(dim, int) and dim > 0 and got != dim:
            raise CalibrationError(
                f"{where}: input '{spec.name}' has shape {list(shape)}; the model expects {spec.describe()} (axis {axis} must be {dim})."
            )


def _check_names(names: Iterable[str], specs: Sequence[InputSpec], where: str) -> None:
    known = {s.name for s in specs}
    given = list(names)
    unknown = [str(k) for k in given if k not in known]
    if unknown:
        raise CalibrationError(f"{where} has unknown input(s) {', '.join(repr(u) for u in unknown)}; the model's inputs are {_names(specs)}.")
    missing = [s.name for s in specs if s.name not in given]
    if missing:
        raise CalibrationError(f"{where} lacks input(s) {', '.join(repr(m) for m in missing)}; the model's inputs are {_names(specs)}.")


def _coerce(spec: InputSpec, value: Any, where: str, *, free_lead: bool = False) -> np.ndarray:
    """``value`` as an array of the input's dtype; only casts within a kind (float64 -> float32)."""
    arr = np.asarray(value)
    _check_input(spec, arr.dtype, arr.shape, where, free_lead=free_lead)
    want = spec.dtype
    if want is not None and arr.dtype != want:
        if want.kind in "iu" and arr.size:
            info = np.iinfo(want)
            if arr.min() < info.min or arr.max() > info.max:
                raise CalibrationError(f"{where}: input '{spec.name}' holds values outside the range of {want}, the dtype the model expects.")
        arr = arr.astype(want)
    return arr


def check_feed(feed: Any, specs: Sequence[InputSpec], where: str, *, free_lead: bool = False) -> dict[str, np.ndarray]:
    """Validate one feed against the model's inputs and return it with dtypes fixed.

    Args:
        free_lead: Accept any size on the sample axis (for whole arrays cut into feeds later).

    Raises:
        CalibrationError: not a dict, a missing or unknown input, or a wrong dtype kind, rank or size.
    """
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{where} is a {type(feed).__name__}; expected a dict of input name -> array.")
    _check_names(feed, specs, where)
    return {s.name: _coerce(s, feed[s.name], where, free_lead=free_lead) for s in specs}


def feed_samples(feed: Mapping[str, np.ndarray], flags: Iterable[str] = ()) -> int:
    """Samples in a feed: the first axis of its first input that has one (``flags``: inputs that
    hold one value for the whole feed, :func:`flag_inputs`)."""
    flags = set(flags)
    for name, arr in feed.items():
        if np.ndim(arr) > 0 and name not in flags:
            return int(np.shape(arr)[0])
    return 1


def flag_inputs(specs: Sequence[InputSpec]) -> set[str]:
    """Inputs of a fixed shape in a model whose other inputs have a free batch axis: one value for
    the whole feed, not one per sample (an optimum merged decoder's ``use_cache_branch``, of shape
    ``[1]``).  Like scalar inputs, they go with every feed as they are."""
    def fixed(s: InputSpec) -> bool:
        return bool(s.shape) and all(isinstance(d, int) and d > 0 for d in s.shape)

    if not any(s.shape and not fixed(s) and not (isinstance(s.shape[0], int) and s.shape[0] > 0) for s in specs):
        return set()  # (no input with a free batch axis: a fixed-batch model, whose batch every input shares)
    return {s.name for s in specs if fixed(s)}


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The sample count every feed must have, when the model fixes its leading dimension."""
    flags = flag_inputs(specs)
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 and s.name not in flags}
    return fixed.pop() if len(fixed) == 1 else None


# --------------------------------------------------------------------------- labels

def _check_labels(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise CalibrationError(f"{where}: labels have shape {list(arr.shape)}; expected one integer class id per sample, shape [samples].")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise CalibrationError(f"{where}: labels are {arr.dtype}; expected integer class ids.")
    return arr.astype(np.int64)


def _load_labels(value: Any) -> np.ndarray:
    if isinstance(value, (str, os.PathLike)):
        p = Path(value)
        if not p.is_file():
            raise CalibrationError(f"{option('labels')} {p}: no such file; pass a .npy file with one class id per sample.")
        try:
            data = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise CalibrationError(f"{option('labels')} {p}: not a readable .npy file ({type(exc).__name__}).") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if LABELS_KEY not in data.files:
                    raise CalibrationError(f"{option('labels')} {p}: an .npz without a '{LABELS_KEY}' key; pass a .npy file of class ids.")
                data = data[LABELS_KEY]
        return _check_labels(data, f"{option('labels')} {p}")
    return _check_labels(value, "labels")


# --------------------------------------------------------------------------- npz files

def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in an ``.npz``, read from the headers without loading data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({type(exc).__name__}); expected arrays saved with numpy.savez.") from None
    return out


def _check_arrays(shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], specs: Sequence[InputSpec], where: str) -> int:
    """Validate arrays by shape and dtype before they are cut into feeds; returns the sample count."""
    _check_names(shapes, specs, where)
    for s in specs:
        _check_input(s, shapes[s.name][1], shapes[s.name][0], where, free_lead=True)
    # A scalar input (an If condition, a Loop trip count) is one value for every feed, not a
    # per-sample array, so it takes no part in counting samples; so is a fixed-shape input of a
    # model whose batch is free (a merged decoder's use_cache_branch), given as it is.
    flags = flag_inputs(specs)
    for sp in specs:
        if sp.name in flags and tuple(shapes[sp.name][0]) != tuple(sp.shape):
            raise CalibrationError(f"{where}: input '{sp.name}' has the fixed shape {list(sp.shape)}, one value for every "
                                   f"feed, but the data holds {list(shapes[sp.name][0])}; give it once, as the model "
                                   "takes it (feeds with other values: one .npz each, in a directory, or --calib-script).")
    scalar = {sp.name for sp in specs if sp.shape == ()} | flags
    counts = {k: (shape[0] if shape else 1) for k, (shape, _) in shapes.items() if k not in scalar} or {"": 1}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{where}: arrays disagree on the number of samples (first axis): "
                               + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    samples = next(iter(counts.values()))
    if samples == 0:
        raise CalibrationError(f"{where}: holds 0 samples; expected at least one along the first axis.")
    fixed = fixed_batch(specs)
    if fixed is not None and samples % fixed:
        raise CalibrationError(f"{where}: holds {samples} samples, but the model takes feeds of exactly {fixed}; "
                               f"pass a multiple of {fixed} samples.")
    return samples


def _check_npz(path: Path, specs: Sequence[InputSpec]) -> tuple[int, np.ndarray | None]:
    """Validate an ``.npz`` from its headers; returns (samples, labels or None)."""
    where = str(path)
    if path.stat().st_size == 0:
        raise CalibrationError(f"{where}: file is empty; expected an .npz with arrays named {_names(specs)}.")
    heads = _npz_headers(path)
    if not heads:
        raise CalibrationError(f"{where}: holds no arrays; expected arrays named {_names(specs)}.")
    has_labels = LABELS_KEY in heads and LABELS_KEY not in {s.name for s in specs}
    samples = _check_arrays({k: v for k, v in heads.items() if not (has_labels and k == LABELS_KEY)}, specs, where)
    if not has_labels:
        return samples, None
    labels = _check_labels(_read_npz(path, [LABELS_KEY])[LABELS_KEY], f"'{LABELS_KEY}' in {where}")
    if len(labels) != samples:
        raise CalibrationError(f"{where}: '{LABELS_KEY}' has {len(labels)} entries but the inputs hold {samples} samples; expected one label per sample.")
    return samples, labels


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in keys}


def _cut(arrays: Mapping[str, np.ndarray], batch: int, flags: Iterable[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    flags = set(flags)
    n = feed_samples(arrays, flags)
    for start in range(0, n, batch):
        # 0-d arrays are scalar inputs and flags hold one value for the feed: the same goes with every feed
        yield {k: (a if np.ndim(a) == 0 or k in flags else a[start:start + batch]) for k, a in arrays.items()}


# --------------------------------------------------------------------------- the data

class CalibrationData:
    """Validated feeds for one model.  Iterate it for ``dict[input name, array]`` feeds.

    Build it with :func:`load_calibration`.  Sources backed by files, scripts, lists or arrays
    can be iterated any number of times; a ``CalibrationDataReader`` is rewound between passes
    when it has ``rewind()``, and a plain iterator can be read once.

    Attributes:
        specs: The model inputs the feeds match.
        labels: Class ids, one per sample, or ``None``.
        synthetic: True when the feeds are random, synthesized from the input types.
        description: Where the feeds come from, for reports (``"holdout.npz"``).
        samples: Number of samples when known before reading (files, arrays, synthetic).
        warnings: Things the user should hear about (e.g. that synthetic data checks fidelity only).
    """

    def __init__(self, specs: Sequence[InputSpec], produce: Callable[[int], Iterable[Any]], *, description: str,
                 labels: np.ndarray | None = None, samples: int | None = None, synthetic: bool = False,
                 warnings: Sequence[str] = (), where: Callable[[int], str] | None = None, labels_from: str = "labels"):
        self.specs = list(specs)
        self.labels = labels
        self.synthetic = synthetic
        self.description = description
        self.samples = samples
        self.warnings = list(warnings)
        self._produce = produce
        self._where = where or (lambda i: f"{description}: feed {i}")
        self._labels_from = labels_from
        self._passes = 0
        if labels is not None and samples is not None and len(labels) != samples:
            raise CalibrationError(f"{labels_from} holds {len(labels)} class ids but the calibration data ({description}) holds {samples} samples; expected one per sample.")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pass_no = self._passes
        self._passes += 1
        total = 0
        count = 0
        for count, feed in enumerate(self._produce(pass_no), start=1):
            checked = check_feed(feed, self.specs, self._where(count))
            total += feed_samples(checked, self.flags)
            yield checked
        if count == 0:
            raise CalibrationError(f"{self.description}: yielded no feeds; expected at least one dict of input name -> array.")
        if self.labels is not None and len(self.labels) != total:
            raise CalibrationError(f"{self._labels_from} holds {len(self.labels)} class ids but the calibration data ({self.description}) held {total} samples; expected one per sample.")


    def head(self, n: int) -> "CalibrationData":
        """The first feeds holding at least ``n`` samples (whole feeds: none is cut), with their labels.

        Returns ``self`` when it holds no more than that.  Feeds are never sliced, so inputs
        without a batch axis and models with a fixed batch size stay valid.
        """
        feeds = total = 0
        for feed in self:
            feeds += 1
            total += feed_samples(feed, self.flags)
            if total >= n:
                break
        if total < n or (self.samples is not None and total >= self.samples):
            if self.samples is None:
                self.samples = total  # read to the end: now known
            return self

        def produce(_: int) -> Iterator[dict[str, np.ndarray]]:
            for k, feed in enumerate(self, start=1):
                yield feed
                if k == feeds:
                    return

        labels = self.labels[:total] if self.labels is not None else None
        return CalibrationData(self.specs, produce, description=f"the first {total} samples of {self.description}",
                               labels=labels, samples=total, synthetic=self.synthetic, where=self._where,
                               labels_from=self._labels_from)

    def spread(self, n: int) -> "CalibrationData":
        """About ``n`` samples drawn evenly over the whole set (one pass reads it), with their labels.

        A file sorted by class gives every class its share, where :meth:`head` would give the first
        ones only.  When every input has a batch axis, the rows at even steps are regrouped into
        feeds of the same size as the originals (the model's fixed batch when it has one: ``n``
        rounds up to it); otherwise whole feeds at even steps, none cut.  Returns ``self`` when it
        holds no more than ``n`` samples.
        """
        sizes = [feed_samples(f, self.flags) for f in self]
        total = sum(sizes)
        if self.samples is None:
            self.samples = total
        if total <= n:
            return self
        fixed = fixed_batch(self.specs)
        batch = fixed or max(sizes)
        if self._rows_sliceable():
            count = min(total, -(-n // fixed) * fixed) if fixed else n
            rows = np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))
            picked: dict[str, list[np.ndarray]] = {}
            start = 0
            for feed, size in zip(self, sizes):
                local = rows[(rows >= start) & (rows < start + size)] - start
                if local.size:
                    for k, a in feed.items():
                        picked.setdefault(k, []).append(a if np.ndim(a) == 0 else np.asarray(a)[local])
                start += size
            joined = {k: (v[0] if np.ndim(v[0]) == 0 else np.concatenate(v)) for k, v in picked.items()}
            feeds = list(_cut(joined, batch))
            labels = self.labels[rows] if self.labels is not None else None
            what = f"{len(rows)} samples spread over {self.description}"
        else:
            want = -(-n * len(sizes) // total)  # feeds of about the mean size holding n samples
            idx = sorted({int(round(i)) for i in np.linspace(0, len(sizes) - 1, max(1, want))})
            chosen = set(idx)
            feeds = [f for i, f in enumerate(self) if i in chosen]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
            labels = self.labels[rows] if self.labels is not None else None
            what = f"{len(idx)} of the {len(sizes)} feeds of {self.description}, evenly spaced"
        return CalibrationData(self.specs, lambda _: feeds, description=what, labels=labels, samples=int(len(rows)),
                               synthetic=self.synthetic, labels_from=self._labels_from)

    @property
    def flags(self) -> set[str]:
        """Inputs with one value for the whole feed (:func:`flag_inputs`)."""
        return flag_inputs(self.specs)

    def _rows_sliceable(self) -> bool:
        """Whether every input with a value per sample has a batch axis to take rows from (and no
        input holds one value per feed, which rows of other feeds may not share)."""
        if self.flags:
            return False
        fixed = fixed_batch(self.specs)
        for spec in self.specs:
            if spec.shape is None:
                return False  # rank unknown: no telling its first axis is the batch
            if not spec.shape:
                continue  # a scalar input goes with every feed as it is
            lead = spec.shape[0]
            if isinstance(lead, int) and lead > 0 and lead != fixed:
                return False
        return True


# produce(pass number) -> feeds, sample count, labels, and where feed i came from (for errors).
Source = Tuple[Callable[[int], Iterable[Any]], int, Optional[np.ndarray], Callable[[int], str]]


def _file_source(path: Path, specs: Sequence[InputSpec], batch: int) -> Source:
    samples, labels = _check_npz(path, specs)
    keys = [s.name for s in specs]

    def produce(_: int) -> Iterator[dict[str, np.ndarray]]:
        yield from _cut(_read_npz(path, keys), batch, flag_inputs(specs))

    return produce, samples, labels, lambda i: f"{path} (feed {i})"


def _dir_source(path: Path, specs: Sequence[InputSpec]) -> Source:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise CalibrationError(f"{path}: directory holds no .npz files; expected one .npz per feed, keys = input names {_names(specs)}.")
    checked = [_check_npz(f, specs) for f in files]
    with_labels = [lab is not None for _, lab in checked]
    labels = None
    if any(with_labels):
        if not all(with_labels):
            lacking = files[with_labels.index(False)]
            raise CalibrationError(f"{lacking}: has no '{LABELS_KEY}' array while other files in {path} do; give every file labels or none.")
        labels = np.concatenate([lab for _, lab in checked])
    keys = [s.name for s in specs]

    def produce(_: int) -> Iterator[dict[str, np.ndarray]]:
        for f in files:
            yield _read_npz(f, keys)

    return produce, sum(n for n, _ in checked), labels, lambda i: str(files[i - 1])


def _load_script(spec: str) -> Callable[[], Any]:
    file, sep, func = spec.rpartition(":")
    if not sep or not file or not func.isidentifier():
        raise UsageError(f"{option('calib_script')} '{spec}': expected FILE.py:FUNCTION, e.g. {option_value('calib_script', 'calib.py:feeds')}.")
    path = Path(file)
    if not path.is_file():
        raise CalibrationError(f"{option('calib_script')} {spec}: no such file '{path}'.")
    mod_name = f"_onnx_lowrank_calib_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise CalibrationError(f"{option('calib_script')} {spec}: '{path}' cannot be imported as Python.")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        sys.modules[mod_name] = module
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise CalibrationError(f"{option('calib_script')} {spec}: importing '{path}' raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise CalibrationError(f"{option('calib_script')} {spec}: '{path}' defines no function '{func}'.")
    return fn


def _script_source(spec: str) -> Callable[[int], Iterable[Any]]:
    fn = _load_script(spec)

    def produce(_: int) -> Iterator[Any]:
        try:
            result = fn()
        except Exception as exc:
            raise CalibrationError(f"{option('calib_script')} {spec} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, Mapping) or isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
            raise CalibrationError(f"{option('calib_script')} {spec} returned a {type(result).__name__}; expected an iterable of feed dicts (input name -> array).")
        it = iter(result)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise CalibrationError(f"{option('calib_script')} {spec} raised {type(exc).__name__} while producing feeds: {exc}") from exc
            yield item

    return produce


def _reader_source(reader: Any) -> Callable[[int], Iterable[Any]]:
    def produce(pass_no: int) -> Iterator[Any]:
        if pass_no:
            if not callable(getattr(reader, "rewind", None)):
                raise CalibrationError(f"the {type(reader).__name__} was read once already and has no rewind(); pass a fresh reader or a list of feeds.")
            reader.rewind()
        while True:
            feed = reader.get_next()
            if feed is None:
                return
            yield feed

    return produce


def input_type_mismatch(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[str, int, int] | None:
    """The first input (in name order) both models take, but as different element types:
    ``(name, type in a, type in b)`` as ONNX ``TensorProto`` codes (0: not a tensor)."""
    types = [{v.name: v.type.tensor_type.elem_type for v in m.graph.input if v.name not in {t.name for t in m.graph.initializer}}
             for m in (a, b)]
    return next(((n, types[0][n], types[1][n]) for n in sorted(types[0].keys() & types[1].keys()) if types[0][n] != types[1][n]),
                None)


def reads_once(calib: Any) -> bool:
    """Whether calibration data can be read only once: an iterator or generator, or a reader
    without ``rewind()`` (a path, a mapping, an array or a sequence is read again each pass)."""
    if isinstance(calib, (str, bytes, os.PathLike, Mapping, np.ndarray)):
        return False
    if callable(getattr(calib, "get_next", None)):
        return not callable(getattr(calib, "rewind", None))
    try:
        return iter(calib) is calib
    except TypeError:  # not iterable at all: load_calibration names the problem
        return False


def _iterable_source(feeds: Iterable[Any]) -> Callable[[int], Iterable[Any]]:
    once = reads_once(feeds)

    def produce(pass_no: int) -> Iterable[Any]:
        if once and pass_no:
            raise CalibrationError(f"this {type(feeds).__name__} of feeds was read once already; pass a list (or a function via {option('calib_script')}) to read it again.")
        return feeds

    return produce


# --------------------------------------------------------------------------- synthesis

def _synthetic_value(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, ranges: Mapping[str, tuple[float, float]]) -> np.ndarray:
    dtype = spec.dtype
    name = spec.name.lower()
    if dtype is None:
        raise CalibrationError(f"input '{spec.name}' is not a plain tensor; random data cannot be made for it, pass {option('calib')}.")
    if spec.name in ranges:
        low, high = ranges[spec.name]
        if dtype.kind in "iu":
            lo, hi = int(np.ceil(low)), int(np.ceil(high))
            if lo >= hi:
                raise UsageError(f"{option('input_range')} {spec.name}:{low:g},{high:g} holds no integer; widen it.")
            return rng.integers(lo, hi, size=shape).astype(dtype)
        if dtype.kind == "b":
            return rng.uniform(low, high, size=shape) >= 0.5
        return rng.uniform(low, high, size=shape).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, bool) if "mask" in name else rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        # Masks and segment ids outside {0, 1} are meaningless to the models that take them.
        if "mask" in name:
            return np.ones(shape, dtype)
        if "type_ids" in name or "segment" in name:
            return np.zeros(shape, dtype)
        return rng.integers(*DEFAULT_INT_RANGE, size=shape).astype(dtype)
    raise CalibrationError(f"input '{spec.name}' is {dtype}; random data of that type cannot be made, pass {option('calib')}.")


def random_feed(model: onnx.ModelProto | str | os.PathLike, shapes: Mapping[str, Sequence[int]], *, seed: int = DEFAULT_SEED,
                input_range: Any = None) -> dict[str, np.ndarray]:
    """One random feed with the given shapes, drawn the way synthesis draws (masks all ones, ...)."""
    rng = np.random.default_rng(seed)
    ranges = parse_input_ranges(input_range)
    return {s.name: _synthetic_value(s, tuple(shapes[s.name]), rng, ranges) for s in model_inputs(model)}


def _synthetic_shapes(specs: Sequence[InputSpec], given: Mapping[str, tuple[int, ...]], batch: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input.  Symbolic dimensions shared by name take the given value."""
    symbols: dict[str, int] = {}
    for s in specs:
        if s.name in given and s.shape is not None:
            if len(given[s.name]) != len(s.shape):
                raise UsageError(f"{option('input_shape')} {s.name}: got {len(given[s.name])} dimensions; the model expects {len(s.shape)} ({s.describe()}).")
            for dim, value in zip(s.shape, given[s.name]):
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
    lead = next((given[s.name][0] for s in specs if s.name in given), None)
    out = {}
    for s in specs:
        if s.name in given:
            if s.shape is not None:
                for axis, (dim, value) in enumerate(zip(s.shape, given[s.name])):
                    if isinstance(dim, int) and dim > 0 and dim != value:
                        raise UsageError(f"{option('input_shape')} {s.name}: axis {axis} is fixed to {dim} in the model, got {value}.")
            out[s.name] = given[s.name]
            continue
        if s.shape is None:
            raise UsageError(f"input '{s.name}' has no shape in the model; pass one, e.g. {option_value('input_shape', f'{s.name}:1x128')}.")
        shape = []
        for axis, dim in enumerate(s.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                shape.append(symbols[dim])
            elif axis == 0:
                shape.append(lead if lead is not None else batch)
            else:
                example = "x".join(str(d) if isinstance(d, int) and d > 0 else ("1" if i == 0 else "128") for i, d in enumerate(s.shape))
                raise UsageError(f"input '{s.name}' ({s.describe()}): axis {axis} ('{dim or '?'}') has no fixed size; "
                                 f"pass {option_value('input_shape', f'{s.name}:{example}')}.")
        out[s.name] = tuple(shape)
    return out


def _synthetic_source(specs: Sequence[InputSpec], samples: int, batch: int, given: Mapping[str, tuple[int, ...]],
                      ranges: Mapping[str, tuple[float, float]], seed: int) -> tuple[Callable[[int], Iterable[Any]], int]:
    shapes = _synthetic_shapes(specs, given, batch)
    free = {s.name for s in specs if s.name not in given and s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0)}
    # Feeds shrink to the samples left only when no input pins the leading size.
    flexible = bool(free) and not given and fixed_batch(specs) is None
    per_feed = batch if flexible else next((shape[0] for shape in shapes.values() if shape), 1)
    total = samples if flexible else -(-samples // per_feed) * per_feed

    def produce(_: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for start in range(0, total, per_feed):
            n = min(per_feed, total - start)
            yield {s.name: _synthetic_value(s, (n, *shapes[s.name][1:]) if s.name in free else shapes[s.name], rng, ranges)
                   for s in specs}

    return produce, total


# --------------------------------------------------------------------------- entry points

def load_calibration(
    model: onnx.ModelProto | str | os.PathLike,
    calib: Any = None,
    *,
    calib_script: str | None = None,
    calib_batch: int = 32,
    labels: Any = None,
    samples: int = 32,
    input_shape: Any = None,
    input_range: Any = None,
    seed: int = DEFAULT_SEED,
) -> CalibrationData:
    """Calibration data for ``model`` from whichever source is given, validated up front.

    Args:
        model: The model whose inputs the feeds must match (a path or a ``ModelProto``).
        calib: An ``.npz`` path, a directory of ``.npz`` files, a ``CalibrationDataReader``,
            an iterable of feed dicts, a dict of arrays, or one array; ``None`` to synthesize.
        calib_script: ``"file.py:func"``; ``func()`` returns an iterable of feed dicts.
        calib_batch: Samples per feed when cutting an ``.npz`` or arrays (and for synthesis).
        labels: Class ids (array, or a ``.npy`` path); overrides a ``labels`` key in the ``.npz``.
        samples: How many random samples to synthesize when there is no data.
        input_shape: Shapes for synthesis, ``"name:1x128,..."`` or ``{name: (1, 128)}``.
        input_range: Value ranges for synthesis, ``"name:low,high,..."`` or ``{name: (low, high)}``.
        seed: Seed of the random generator for synthesis (same seed, same feeds).

    Returns:
        A :class:`CalibrationData`.

    Raises:
        UsageError: conflicting options (e.g. ``input_shape`` with real data).
        CalibrationError: the data does not match the model's inputs, or holds nothing.
    """
    specs = model_inputs(model)
    if isinstance(calib_batch, bool) or not isinstance(calib_batch, int) or calib_batch < 1:
        raise UsageError(f"{option('calib_batch')} must be a positive integer, got {calib_batch!r}.")
    batch = fixed_batch(specs) or calib_batch
    shapes, ranges = parse_input_shapes(input_shape), parse_input_ranges(input_range)
    known = {s.name for s in specs}
    for flag, names in ((option("input_shape"), shapes), (option("input_range"), ranges)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"{flag} names {', '.join(repr(u) for u in unknown)}, not an input of the model; its inputs are {_names(specs)}.")
    if calib is not None and calib_script is not None:
        raise UsageError(f"got both {option('calib')} and {option('calib_script')}; pass only one source of calibration data.")

    if calib is None and calib_script is None:
        if labels is not None:
            raise UsageError(f"{option('labels')} needs real data: pass {option('calib')} or {option('calib_script')} with it (random inputs have no labels).")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise UsageError(f"{option('samples')} must be a positive integer, got {samples!r}.")
        produce, total = _synthetic_source(specs, samples, batch, shapes, ranges, seed)
        warning = SYNTHETIC_WARNING.format(n=total, calib=option("calib"))
        log.info(warning)  # (a warning of the verification report, which the command line prints once)
        return CalibrationData(specs, produce, description="random inputs", samples=total, synthetic=True, warnings=[warning])

    if shapes or ranges:
        flag = option("input_shape") if shapes else option("input_range")
        raise UsageError(f"{flag} shapes random data only; drop it when passing {option('calib')} or {option('calib_script')}.")

    label_arr = _load_labels(labels) if labels is not None else None
    labels_from = f"{option('labels')} {labels}" if isinstance(labels, (str, os.PathLike)) else "labels"
    known_samples: int | None = None
    where = None
    if calib_script is not None:
        produce = _script_source(calib_script)
        description = f"{option('calib_script')} {calib_script}"
        where = lambda i: f"{option('calib_script')} {calib_script}: item {i}"  # noqa: E731
    elif isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if path.is_dir():
            produce, known_samples, file_labels, where = _dir_source(path, specs)
        elif path.is_file() and path.suffix == ".npz":
            produce, known_samples, file_labels, where = _file_source(path, specs, batch)
        elif path.is_file():
            raise CalibrationError(f"{option('calib')} {path}: expected an .npz file (keys = input names) or a directory of them, "
                                   f"got a '{path.suffix or 'suffix-less'}' file.")
        else:
            raise CalibrationError(f"{option('calib')} {path}: no such file or directory; pass an .npz file or a directory of them.")
        description = path.name or str(path)
        if label_arr is None and file_labels is not None:
            label_arr, labels_from = file_labels, f"'{LABELS_KEY}' in {path}"
    elif callable(getattr(calib, "get_next", None)):
        produce = _reader_source(calib)
        description = type(calib).__name__
    elif isinstance(calib, np.ndarray):
        if len(specs) != 1:
            raise CalibrationError(f"got one array, but the model has {len(specs)} inputs ({_names(specs)}); pass a dict of input name -> array.")
        produce, known_samples = _array_source({specs[0].name: calib}, specs, batch)
        description = "array"
    elif isinstance(calib, Mapping):
        produce, known_samples = _array_source(calib, specs, batch)
        description = "arrays"
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        produce = _iterable_source(calib)
        description = type(calib).__name__
    else:
        raise UsageError(f"got a {type(calib).__name__} as calibration data; expected an .npz path, a directory, a "
                         "CalibrationDataReader, an iterable of feed dicts, a dict of arrays or an array.")
    return CalibrationData(specs, produce, description=description, labels=label_arr, samples=known_samples, where=where,
                           labels_from=labels_from)


def _array_source(arrays: Mapping[str, Any], specs: Sequence[InputSpec], batch: int) -> tuple[Callable[[int], Iterable[Any]], int]:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    samples = _check_arrays({k: (a.shape, a.dtype) for k, a in arrays.items()}, specs, "calibration arrays")
    # Cast once here rather than on every feed of every pass.
    cast = check_feed(arrays, specs, "calibration arrays", free_lead=True)
    return (lambda _: _cut(cast, batch, flag_inputs(specs))), samples


def iter_feeds(model: onnx.ModelProto | str | os.PathLike, calib: Any = None, **options: Any) -> Iterator[dict[str, np.ndarray]]:
    """Validated feeds for ``model``; the arguments are those of :func:`load_calibration`."""
    return iter(load_calibration(model, calib, **options))

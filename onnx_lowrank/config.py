"""The pass configuration, and recipes (TOML files whose keys are its fields).

A CLI flag, a recipe key and a :class:`CompressConfig` field are the same name for the same
thing: ``--min-params`` is ``min_params`` in both.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import UsageError

__all__ = ["CompressConfig", "DEFAULT_ENERGY", "load_recipe", "recipe_path", "list_recipes"]

DEFAULT_ENERGY = 0.95
OP_TYPES = ("MatMul", "Gemm", "Conv")
CONV_MODES = ("channel", "spatial", "auto")
QUANTIZE_MODES = ("int8",)


@dataclass(frozen=True)
class CompressConfig:
    """Every option that changes what the pass produces.

    Attributes:
        energy: Energy threshold in (0, 1]; each layer keeps the smallest rank whose singular
            values hold this fraction of ``sum s_i^2``.  Defaults to 0.95 when ``rank`` is unset.
        rank: Fixed rank for every layer (capped at ``min(m, n)``); excludes ``energy``.
        rank_multiple: Round each rank up to a multiple of this, never past break-even.
        min_params: Leave weights with fewer elements alone.
        include: Regex on node or weight names; only matches are factorized.
        exclude: Regex on node or weight names; matches are left alone.
        op_types: Node types to consider; any of ``MatMul``, ``Gemm``, ``Conv`` (all by default).
        conv_mode: How Conv weights are split: ``channel`` (k x k conv to r channels, then 1 x 1),
            ``spatial`` (kh x 1 then 1 x kw; 2-D kernels only), or ``auto``, which picks per layer
            the one with fewer multiply-accumulates at its chosen rank.
        allow_input_weights: Also factorize weights listed as graph inputs (every initializer
            is one in IR < 4); the factors replace the weight among the inputs.
        latency_aware: Factorize a layer only where its factored form is measured faster than
            the dense one (onnxruntime, at every ``threads`` x ``batch`` setting), and check
            that the whole model is not slower.
        threads: onnxruntime intra-op thread counts the model will run with.
        batch: Batch sizes (the dynamic first axis) the model will run at.
        input_shape: Shapes of inputs with other dynamic axes, as ``NAME:DIMS`` items
            (``input_ids:1x128``); the batch axis is replaced by each ``batch``.
        min_speedup: In latency-aware mode, the speed-up a layer must show at every setting.
        quantize: ``"int8"``: onnxruntime dynamic int8 quantization after factorization.
    """

    energy: float | None = None
    rank: int | None = None
    rank_multiple: int = 1
    min_params: int = 4096
    include: str | None = None
    exclude: str | None = None
    op_types: tuple[str, ...] = OP_TYPES
    conv_mode: str = "auto"
    allow_input_weights: bool = False
    latency_aware: bool = False
    threads: tuple[int, ...] = (1,)
    batch: tuple[int, ...] = (1,)
    input_shape: tuple[str, ...] = ()
    min_speedup: float = 1.1
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.energy is not None and self.rank is not None:
            raise UsageError("got both --energy and --rank; pass only one of them.")
        if self.energy is not None:
            e = self.energy
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < float(e) <= 1.0:
                raise UsageError(f"--energy must be a number in (0, 1], got {e!r}; e.g. --energy 0.93.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}; e.g. --rank 64.")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise UsageError(f"--rank-multiple must be a positive integer, got {self.rank_multiple!r}; e.g. --rank-multiple 8.")
        if isinstance(self.min_params, bool) or not isinstance(self.min_params, int) or self.min_params < 0:
            raise UsageError(f"--min-params must be a non-negative integer, got {self.min_params!r}.")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"{flag} '{pattern}' is not a valid regular expression ({exc}).") from None
        ops = (self.op_types,) if isinstance(self.op_types, str) else tuple(self.op_types)
        bad = [o for o in ops if o not in OP_TYPES]
        if bad or not ops:
            raise UsageError(f"--op-types got {','.join(bad) or 'nothing'}; expected a comma-separated subset of {','.join(OP_TYPES)}.")
        object.__setattr__(self, "op_types", ops)
        if self.conv_mode not in CONV_MODES:
            raise UsageError(f"--conv-mode got {self.conv_mode!r}; expected one of {', '.join(CONV_MODES)}.")
        for flag, name in (("--threads", "threads"), ("--batch", "batch")):
            value = getattr(self, name)
            values = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) if isinstance(value, (list, tuple)) else None
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise UsageError(f"{flag} must be positive integers, got {value!r}; e.g. {flag} 1,2.")
            object.__setattr__(self, name, values)
        shapes = (self.input_shape,) if isinstance(self.input_shape, str) else tuple(self.input_shape or ())
        from .bench import parse_input_shapes

        parse_input_shapes(shapes)
        object.__setattr__(self, "input_shape", shapes)
        m = self.min_speedup
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 100.0:
            raise UsageError(f"--min-speedup must be a positive number, got {m!r}; e.g. --min-speedup 1.1.")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UsageError(f"--quantize got {self.quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}.")

    @property
    def effective_energy(self) -> float | None:
        """The energy threshold in force (``None`` when a fixed rank is used)."""
        if self.rank is not None:
            return None
        return DEFAULT_ENERGY if self.energy is None else float(self.energy)

    def replace(self, **changes: Any) -> "CompressConfig":
        """A copy with ``changes`` applied (and validated).  ``energy`` and ``rank`` displace each other."""
        if changes.get("rank") is not None and "energy" not in changes:
            changes["energy"] = None
        if changes.get("energy") is not None and "rank" not in changes:
            changes["rank"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("op_types", "threads", "batch", "input_shape"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> "CompressConfig":
        """Build from a mapping (a parsed recipe); unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}.")
        values = dict(data)
        if "op_types" in values and isinstance(values["op_types"], str):
            values["op_types"] = tuple(s.strip() for s in values["op_types"].split(",") if s.strip())
        elif "op_types" in values:
            values["op_types"] = tuple(values["op_types"])
        return cls(**values)


def _recipe_dirs() -> list[Path]:
    dirs = []
    try:
        from importlib.resources import files

        dirs.append(Path(str(files("onnx_lowrank.passes"))))
    except Exception:
        pass
    dirs.append(Path(__file__).resolve().parent.parent / "passes")
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> list[str]:
    names: set[str] = set()
    for d in _recipe_dirs():
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolve a recipe file path, or the name of a shipped recipe (``balanced``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix == "" and p.parent == Path("."):
        for d in _recipe_dirs():
            cand = d / f"{p.name}.toml"
            if cand.is_file():
                return cand
    raise UsageError(f"--recipe {name_or_path}: no such file or shipped recipe; shipped recipes: {', '.join(list_recipes()) or 'none'}.")


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """The keys of a recipe file, validated against :class:`CompressConfig`."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--recipe {path}: not valid TOML ({exc}).") from None
    data.pop("description", None)
    CompressConfig.from_mapping(data, source=f"--recipe {path}")
    return data

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

from .errors import UsageError, option, option_value
from .linalg import CONV_MODES as _VIEWS
from .linalg import DEFAULT_DAMPING, RULES

__all__ = ["CompressConfig", "DEFAULT_ENERGY", "load_recipe", "recipe_path", "list_recipes"]

DEFAULT_ENERGY = 0.95
OP_TYPES = ("MatMul", "Gemm", "Conv")
#: ``auto`` picks, per layer, whichever view of :data:`~onnx_lowrank.linalg.CONV_MODES` needs fewer MACs.
CONV_MODES = (*_VIEWS, "auto")
QUANTIZE_MODES = ("int8", "int8-per-channel")
RANK_RULES = RULES
#: What ``max_drop`` bounds: the verification gate's metrics (:mod:`onnx_lowrank.verify`).
METRICS = ("accuracy", "f1", "top1", "cosine", "rel_l2", "max_abs")
#: Metrics whose "drop" is an error (0 is perfect), not a fall from 1.
ERROR_METRICS = ("rel_l2", "max_abs")


def check_max_drop(value: Any, metric: str | None) -> None:
    """``max_drop`` is a fraction in [0, 1], or any non-negative number for ``max_abs``."""
    top = float("inf") if metric == "max_abs" else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= top:
        what = ("a non-negative number (in the output's units)" if metric == "max_abs" else
                f"a number in [0, 1] (a fraction: 0.01 is one point; only {option('metric')} max_abs takes larger limits)")
        raise UsageError(f"{option('max_drop')} must be {what}, got {value!r}.")
BUDGET_SCOPES = ("weights", "model")


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
        rank_rule: ``energy`` (fraction of ``sum s_i^2``) or ``entropy`` (ARSVD's spectral
            entropy); ``energy`` is the threshold of either rule.
        target_params: Global budget: keep at most this fraction (0, 1] of the parameters (of
            the candidate weights, or of the whole model with ``budget_scope="model"``); ranks
            are allocated across layers.  Replaces the per-layer rule.
        target_macs: The same for the multiply-accumulates per row of the candidate layers.
        budget_scope: What ``target_params`` is a fraction of: ``weights`` (every MatMul/Gemm
            weight in the report) or ``model`` (every parameter of the model).
        data_aware: Truncate in the space whitened by the layers' real input activations
            (needs calibration data).
        attention_aware: With ``data_aware``: weigh a projection whose output is scored against
            another activation (an attention query or key) also on its output side, by the
            Gram of what it is scored against (``docs/rank-selection.md``).
        damping: Damping of the activation Gram matrix, relative to its mean diagonal.
        calib_mask: Name of a model input (an attention mask) whose zeros mark padded rows to
            leave out of the activation statistics.
        adaptive: Allocate ranks by measured sensitivity on the calibration data (needs
            calibration data, and ``max_drop`` or a budget).
        adaptive_samples: With ``adaptive``: measure sensitivity, search and check on the first
            calibration feeds holding this many samples (whole feeds; ``None``: all of them).
            The activation statistics of ``data_aware`` and the verification gate still use
            every sample; sensitivity costs about ``10 L`` passes for ``L`` layers, so a subset
            keeps it affordable.
        max_drop: With ``adaptive``: the largest allowed drop of the quality metric on the
            calibration data (accuracy with labels, else mean output cosine), e.g. 0.005.
        metric: With ``adaptive``: the metric ``max_drop`` bounds, as the verification gate reads
            it (``cosine`` for embeddings; default per output: accuracy with labels and class
            scores, top-1 for outputs named like class scores, else the relative L2 error).
        refine: After the ranks are chosen, refit both factors of every MatMul/Gemm layer by
            least squares on the calibration activations of the compressed model, level by
            level in graph order (needs calibration data).
        latency_aware: Factorize a layer only where its factored form is measured faster than
            the dense one (onnxruntime, at every ``threads`` x ``batch`` setting), and check
            that the whole model is not slower.
        threads: onnxruntime intra-op thread counts the model will run with.
        batch: Batch sizes (the dynamic first axis) the model will run at.
        input_shape: Shapes of inputs with other dynamic axes, as ``NAME:DIMS`` items
            (``input_ids:1x128``); the batch axis is replaced by each ``batch``.
        min_speedup: In latency-aware mode, the speed-up a layer must show at every setting.
        quantize: ``"int8"``: onnxruntime dynamic int8 quantization after factorization, with its
            defaults (one scale per weight); ``"int8-per-channel"``: one scale per output column.
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
    rank_rule: str = "energy"
    target_params: float | None = None
    target_macs: float | None = None
    budget_scope: str = "weights"
    data_aware: bool = False
    attention_aware: bool = True
    damping: float = DEFAULT_DAMPING
    calib_mask: str | None = None
    adaptive: bool = False
    adaptive_samples: int | None = None
    max_drop: float | None = None
    metric: str | None = None
    refine: bool = False
    latency_aware: bool = False
    threads: tuple[int, ...] = (1,)
    batch: tuple[int, ...] = (1,)
    input_shape: tuple[str, ...] = ()
    min_speedup: float = 1.1
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.energy is not None and self.rank is not None:
            raise UsageError(f"got both {option('energy')} and {option('rank')}; pass only one of them.")
        if self.energy is not None:
            e = self.energy
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < float(e) <= 1.0:
                raise UsageError(f"{option('energy')} must be a number in (0, 1], got {e!r}; e.g. {option_value('energy', 0.93)}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"{option('rank')} must be a positive integer, got {self.rank!r}; e.g. {option_value('rank', 64)}.")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise UsageError(f"{option('rank_multiple')} must be a positive integer, got {self.rank_multiple!r}; e.g. {option_value('rank_multiple', 8)}.")
        if isinstance(self.min_params, bool) or not isinstance(self.min_params, int) or self.min_params < 0:
            raise UsageError(f"{option('min_params')} must be a non-negative integer, got {self.min_params!r}.")
        for flag, pattern in ((option("include"), self.include), (option("exclude"), self.exclude)):
            if pattern is not None:
                if not isinstance(pattern, str):
                    raise UsageError(f"{flag} takes one regular expression (a string), got {pattern!r}; "
                                     f"join alternatives with '|', e.g. 'q_proj|k_proj'.")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"{flag} '{pattern}' is not a valid regular expression ({exc}).") from None
        ops = (self.op_types,) if isinstance(self.op_types, str) else tuple(self.op_types)
        bad = [o for o in ops if o not in OP_TYPES]
        if bad or not ops:
            raise UsageError(f"{option('op_types')} got {','.join(bad) or 'nothing'}; expected a comma-separated subset of {','.join(OP_TYPES)}.")
        object.__setattr__(self, "op_types", ops)
        if self.conv_mode not in CONV_MODES:
            raise UsageError(f"{option('conv_mode')} got {self.conv_mode!r}; expected one of {', '.join(CONV_MODES)}.")
        for name in ("threads", "batch"):
            flag = option(name)
            value = getattr(self, name)
            values = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) if isinstance(value, (list, tuple)) else None
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise UsageError(f"{flag} must be positive integers, got {value!r}; e.g. {option_value(name, (1, 2))}.")
            object.__setattr__(self, name, values)
        shapes = (self.input_shape,) if isinstance(self.input_shape, str) else tuple(self.input_shape or ())
        from .calibration import parse_input_shapes

        parse_input_shapes(shapes)
        object.__setattr__(self, "input_shape", shapes)
        m = self.min_speedup
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 100.0:
            raise UsageError(f"{option('min_speedup')} must be a positive number, got {m!r}; e.g. {option_value('min_speedup', 1.1)}.")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UsageError(f"{option('quantize')} got {self.quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}.")
        self._check_rank_selection()

    def _check_rank_selection(self) -> None:
        if self.rank_rule not in RANK_RULES:
            raise UsageError(f"{option('rank_rule')} got {self.rank_rule!r}; expected one of {', '.join(RANK_RULES)}.")
        for name in ("target_params", "target_macs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0):
                raise UsageError(f"{option(name)} must be a fraction in (0, 1], got {value!r}; e.g. {option_value(name, 0.5)} keeps at most half.")
        if self.budget_scope not in BUDGET_SCOPES:
            raise UsageError(f"{option('budget_scope')} got {self.budget_scope!r}; expected one of {', '.join(BUDGET_SCOPES)}.")
        if self.has_budget:
            if self.rank is not None or self.energy is not None:
                flag = option("rank") if self.rank is not None else option("energy")
                raise UsageError(f"a budget ({option('target_params')}/{option('target_macs')}) allocates ranks itself; drop {flag}.")
            if self.rank_rule != "energy":
                raise UsageError(f"{option('rank_rule')} applies per layer; a budget ({option('target_params')}/{option('target_macs')}) allocates ranks itself.")
        for flag in ("data_aware", "attention_aware", "adaptive", "refine", "allow_input_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise UsageError(f"{option(flag)} is a switch (true or false), got {getattr(self, flag)!r}.")
        if not self.attention_aware and not self.data_aware:
            raise UsageError(f"{option_value('attention_aware', False)} changes the statistics of {option('data_aware')}; add {option('data_aware')} or drop it.")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) < 1e6:
            raise UsageError(f"{option('damping')} must be a non-negative number, got {d!r}; e.g. {option_value('damping', 0.01)}.")
        if not self.data_aware and (self.calib_mask is not None or float(d) != DEFAULT_DAMPING):
            flag = option("calib_mask") if self.calib_mask is not None else option("damping")
            raise UsageError(f"{flag} shapes the activation statistics of {option('data_aware')}; add {option('data_aware')} or drop {flag}.")
        if self.metric is not None and self.metric not in METRICS:
            raise UsageError(f"{option('metric')} got {self.metric!r}; expected one of {', '.join(METRICS)}.")
        if self.metric is not None and not self.adaptive:
            raise UsageError(f"{option('metric')} sets what {option('adaptive')} bounds with {option('max_drop')}; add "
                             f"{option('adaptive')}, or give the metric to the verification (verify={{'metric': ...}}).")
        if self.max_drop is not None:
            check_max_drop(self.max_drop, self.metric)
            if not self.adaptive:
                raise UsageError(f"{option('max_drop')} needs {option('adaptive')} (it bounds the drop that adaptive allocation measures).")
        if self.adaptive_samples is not None:
            n = self.adaptive_samples
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise UsageError(f"{option('adaptive_samples')} must be a positive integer, got {n!r}; e.g. {option_value('adaptive_samples', 64)}.")
            if not self.adaptive:
                raise UsageError(f"{option('adaptive_samples')} sets how many calibration samples {option('adaptive')} measures on; add {option('adaptive')} or drop it.")
        if self.adaptive:
            if self.max_drop is None and not self.has_budget:
                raise UsageError(f"{option('adaptive')} needs a goal: {option('max_drop')} X, or a budget {option('target_params')} F / {option('target_macs')} F.")
            if self.max_drop is not None and self.has_budget:
                raise UsageError(f"{option('adaptive')} takes either {option('max_drop')} or a budget ({option('target_params')}/{option('target_macs')}), not both.")
            if self.rank is not None or self.energy is not None or self.rank_rule != "energy":
                raise UsageError(f"{option('adaptive')} allocates ranks itself; drop {option('energy')}/{option('rank')}/{option('rank_rule')}.")

    @property
    def has_budget(self) -> bool:
        """Whether a global budget (``target_params`` or ``target_macs``) is set."""
        return self.target_params is not None or self.target_macs is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether the options need calibration data (``data_aware``, ``adaptive`` or ``refine``)."""
        return self.data_aware or self.adaptive or self.refine

    @property
    def effective_energy(self) -> float | None:
        """The rule's threshold in force (``None`` for a fixed rank, a budget or adaptive mode)."""
        if self.rank is not None or self.has_budget or self.adaptive:
            return None
        return DEFAULT_ENERGY if self.energy is None else float(self.energy)

    def replace(self, **changes: Any) -> "CompressConfig":
        """A copy with ``changes`` applied (and validated).

        The ways of choosing ranks displace each other: a new ``energy`` drops a ``rank`` and
        any budget, a new ``rank`` drops ``energy`` and budgets, a new budget or ``adaptive``
        drops ``energy`` and ``rank`` (so flags override a recipe's rule).
        """
        per_layer = changes.get("rank") is not None or changes.get("energy") is not None
        global_ = any(changes.get(k) not in (None, False) for k in ("target_params", "target_macs", "adaptive"))
        if changes.get("rank") is not None:
            changes.setdefault("energy", None)
        if changes.get("energy") is not None:
            changes.setdefault("rank", None)
        if per_layer and not global_:
            changes.setdefault("target_params", None)
            changes.setdefault("target_macs", None)
        if global_ and not per_layer:
            changes.setdefault("energy", None)
            changes.setdefault("rank", None)
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
    """Where shipped recipes live: inside the installed package, or the repository's ``passes/``
    (an editable install maps the package there without copying it)."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "passes" / "recipes", here.parent / "passes" / "recipes") if d.is_dir()]


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

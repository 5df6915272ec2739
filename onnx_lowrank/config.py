"""The pass configuration: small option sections that each validate themselves, and recipes.

Each section is a frozen dataclass of options declared with :func:`~onnx_lowrank.options.opt`
(kind, help text, example); building one checks every value against its declaration and then
the section's own rules.  :class:`CompressConfig` joins the sections into the flat set of
keywords that ``compress()``, recipes and the command line share (``--min-params`` is
``min_params`` everywhere) and checks the rules that span sections.

Recipes are TOML files whose keys are those names (``passes/recipes``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import UsageError, option, option_style, option_value, recipe_keys
from .linalg import CONV_MODES as _VIEWS
from .linalg import DEFAULT_DAMPING, NEURON_SELECTIONS, RULES
from .linalg.quant import BLOCK_SIZES
from .options import check, opt

__all__ = ["CompressConfig", "DEFAULT_ENERGY", "load_recipe", "recipe_path", "list_recipes", "SECTIONS", "Selection", "RankRule",
           "Budget", "DataAware", "Adaptive", "Refine", "Latency", "Quantize", "Compute"]

DEFAULT_ENERGY = 0.95
#: Adaptive mode's sensitivity runs: samples spread over the calibration set, and ranks measured
#: per layer (of the 10 of its grid).  all-MiniLM-L6-v2 at 20 % fewer weights: 19x fewer texts
#: run than every grid rank on all 256 texts, held-out cosine 0.9598 against 0.9600; the MNIST
#: MLP: accuracy within a digit in a thousand (docs/benchmarks/adaptive_cost*.md).
DEFAULT_ADAPTIVE_SAMPLES = 64
DEFAULT_SENSITIVITY_POINTS = 2
#: Ranks on each layer's sensitivity grid (``passes.adaptive.GRID``).
SENSITIVITY_GRID = 10
OP_TYPES = ("MatMul", "Gemm", "Conv")
#: ``auto`` picks, per layer, whichever view of :data:`~onnx_lowrank.linalg.CONV_MODES` needs fewer MACs.
CONV_MODES = (*_VIEWS, "auto")
QUANTIZE_MODES = ("int8", "int8-per-channel", "int4")
#: Weights per 4-bit block that ``MatMulNBits`` takes.
INT4_BLOCKS = BLOCK_SIZES
RANK_RULES = RULES
BUDGET_SCOPES = ("weights", "model")
EXECUTORS = ("local", "ray")
SVD_METHODS = ("auto", "exact")
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


def _example_of(f: dataclasses.Field) -> str:
    example = f.metadata["opt"].example
    return f", e.g. {option_value(f.name, example)}" if example is not None else ""


class Section:
    """A group of options that validates itself when built (:func:`~onnx_lowrank.options.check`
    per field, then :meth:`rules`).  ``title`` heads its group of flags in ``--help``."""

    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is not None and "None" not in str(f.type):
                raise UsageError(f"{option(f.name)} cannot be None; leave it out for its default ({f.default!r}) or "
                                 f"give a value{_example_of(f)}.")
            value = check(f.name, f.metadata["opt"], value)
            object.__setattr__(self, f.name, value)
        self.rules()

    def rules(self) -> None:
        """Rules between this section's own options."""


def _needs(given: bool, name: str, switch: bool, switch_name: str, what: str) -> None:
    """``name`` was given but only means something with ``switch_name``: say so."""
    if given and not switch:
        raise UsageError(f"{option(name)} {what}; add {option(switch_name)} or drop {option(name)}.")


@dataclass(frozen=True)
class RankRule(Section):
    """The per-layer rule: an energy threshold (ARSVD) or a fixed rank."""

    title = "rank selection (flags override --recipe)"
    energy: float | None = opt(None, "energy", "keep per layer the smallest rank holding this fraction of the squared singular "
                               "values (default 0.95)", metavar="E", example=0.93, exclusive="rule")
    rank: int | None = opt(None, "positive_int", "fixed rank for every layer", metavar="N", example=64, exclusive="rule")
    rank_multiple: int = opt(1, "positive_int", "round ranks up to a multiple of K, never past break-even", metavar="K", example=8)
    rank_rule: str = opt("energy", "choice", "per-layer rule that --energy thresholds: squared singular values (energy, default) "
                         "or ARSVD's spectral entropy (entropy)", choices=RANK_RULES)
    svd: str = opt("auto", "choice", "auto: under an energy threshold compute only the leading singular values when that "
                   "certifies the exact rule's rank (much faster on large, low-rank weights), else the full SVD; exact: "
                   "always the full SVD", choices=SVD_METHODS)

    def rules(self) -> None:
        if self.energy is not None and self.rank is not None:
            raise UsageError(f"got both {option('energy')} and {option('rank')}; pass only one of them.")


@dataclass(frozen=True)
class Budget(Section):
    """A global budget: ranks allocated across layers (replaces the per-layer rule)."""

    title = "global budgets (replace the per-layer rule)"
    target_params: float | None = opt(None, "fraction", "keep at most this fraction of the parameters; ranks are allocated "
                                      "across the MatMul, Gemm and Conv layers", metavar="F", example=0.5)
    target_macs: float | None = opt(None, "fraction", "keep at most this fraction of the candidate layers' MACs per row "
                                    "(Conv layers keep the per-layer rule)",
                                    metavar="F", example=0.5)
    target_bytes: float | None = opt(None, "fraction", "keep at most this fraction of the MatMul/Gemm weights' bytes (Conv "
                                     "layers keep the per-layer rule); with "
                                     "--quantize int4 each layer's candidates are a factor pair at any rank or 4-bit blocks "
                                     "with a correction branch of any rank, priced in bytes (docs/int4.md)", metavar="F",
                                     example=0.2)
    budget_scope: str = opt("weights", "choice", "what --target-params is a fraction of: the candidate layers' weights (default) or "
                            "the whole model (--target-bytes is always of the MatMul/Gemm weights)", choices=BUDGET_SCOPES)

    @property
    def given(self) -> bool:
        return self.target_params is not None or self.target_macs is not None or self.target_bytes is not None


@dataclass(frozen=True)
class DataAware(Section):
    """Truncation in the space whitened by real activations (needs calibration data)."""

    title = "data-aware selection"
    data_aware: bool = opt(False, "switch", "truncate in the space whitened by real input activations (needs --calib or "
                           "--calib-script)")
    attention_aware: bool = opt(True, "switch", "with --data-aware: weigh attention query/key projections by their input only, "
                                "not also by the keys/queries their output is scored against", flag="--no-attention-aware")
    damping: float = opt(DEFAULT_DAMPING, "non_negative_float", "damping of the activation Gram matrix, relative to its mean "
                         "diagonal (default 0.01)", metavar="D", example=0.01, high=1e6)
    calib_mask: str | None = opt(None, "text", "with --data-aware or --ffn-keep: input whose zeros mark padded rows to leave out "
                                 "(e.g. attention_mask)", metavar="INPUT")

    def rules(self) -> None:
        if not self.attention_aware and not self.data_aware:
            raise UsageError(f"{option_value('attention_aware', False)} changes the statistics of {option('data_aware')}; add "
                             f"{option('data_aware')} or drop it.")


@dataclass(frozen=True)
class Width(Section):
    """Width reduction of feed-forward blocks: hidden neurons dropped, the second projection
    refitted on calibration data (:mod:`onnx_lowrank.linalg.width`)."""

    title = "width reduction of feed-forward blocks (needs --calib)"
    ffn_keep: Any = opt(None, "any", "keep this fraction of the hidden neurons of every feed-forward block (x W1 -> activation "
                        "-> W2): the rest leave W1, its bias and W2, and W2 is refitted on the calibration data; those weights "
                        "are not factorized. auto: with --data-aware and a budget, the budget chooses each block's width "
                        "against the factorization of the other layers", metavar="F|auto", example=0.75)
    ffn_select: str = opt("refit", "choice", "with --ffn-keep: which neurons stay: refit (default) drops, one by one, the "
                          "neuron whose output the refit of the others recovers best; energy keeps those of largest output "
                          "energy, each on its own", choices=NEURON_SELECTIONS)

    def rules(self) -> None:
        value = self.ffn_keep
        if value is None:
            if self.ffn_select != "refit":
                raise UsageError(f"{option('ffn_select')} chooses the neurons {option('ffn_keep')} keeps; add "
                                 f"{option_value('ffn_keep', 0.75)} or drop {option('ffn_select')}.")
            return
        text = value.strip().lower() if isinstance(value, str) else None
        if text == "auto":
            object.__setattr__(self, "ffn_keep", "auto")
            return
        try:
            number = float(text if text is not None else value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not 0.0 < number <= 1.0:
            raise UsageError(f"{option('ffn_keep')} must be a fraction in (0, 1] or auto, got {value!r}; "
                             f"e.g. {option_value('ffn_keep', 0.75)}.")
        object.__setattr__(self, "ffn_keep", number)

    @property
    def auto(self) -> bool:
        return self.ffn_keep == "auto"


@dataclass(frozen=True)
class Adaptive(Section):
    """Ranks allocated by sensitivity measured on calibration data."""

    title = "adaptive allocation"
    adaptive: bool = opt(False, "switch", "allocate ranks by sensitivity measured on --calib (goal: --max-drop, read as the gate "
                         "reads --metric; or a budget)")
    adaptive_samples: int | None = opt(DEFAULT_ADAPTIVE_SAMPLES, "positive_int", "with --adaptive: measure sensitivities on "
                                       "N calibration samples spread evenly over the set (the budget search, its check, "
                                       "--data-aware statistics and verification use all); pass the set's size to measure "
                                       "on all", metavar="N", example=256)
    sensitivity_points: int | None = opt(DEFAULT_SENSITIVITY_POINTS, "positive_int", "with --adaptive: measure each layer "
                                         "at N of its 10 grid ranks and scale its whitened truncation loss to them for the "
                                         "rest; 10 measures every grid rank", metavar="N", example=10, high=SENSITIVITY_GRID)
    max_drop: float | None = opt(None, "any", "with --adaptive: the largest drop of the metric allowed (also the gate)")
    metric: str | None = opt(None, "choice", "with --adaptive: the metric --max-drop bounds (also the gate's)", choices=METRICS)

    def rules(self) -> None:
        if self.metric is not None and not self.adaptive:
            check = ("pass --metric on the command line for the check" if option_style() == "key" else
                     "give the metric to the verification (verify={'metric': ...})")
            raise UsageError(f"{option('metric')} sets what {option('adaptive')} bounds with {option('max_drop')}; add "
                             f"{option_value('adaptive', True)}, or {check}.")
        if self.max_drop is not None:
            check_max_drop(self.max_drop, self.metric)
            if not self.adaptive:
                check = "; for the check's gate pass --max-drop on the command line" if option_style() == "key" else ""
                raise UsageError(f"{option('max_drop')} needs {option_value('adaptive', True)} (it bounds the drop that adaptive "
                                 f"allocation measures){check}.")
        _needs(self.adaptive_samples != DEFAULT_ADAPTIVE_SAMPLES, "adaptive_samples", self.adaptive, "adaptive",
               f"sets how many calibration samples {option('adaptive')} measures on")
        _needs(self.sensitivity_points != DEFAULT_SENSITIVITY_POINTS, "sensitivity_points", self.adaptive, "adaptive",
               f"sets how many ranks per layer {option('adaptive')} measures")


@dataclass(frozen=True)
class Refine(Section):
    title = "refit"
    refine: bool = opt(False, "switch", "after choosing ranks, refit the factors by least squares on --calib activations of the "
                       "compressed model, layer by layer in graph order")


@dataclass(frozen=True)
class Selection(Section):
    """Which layers are candidates."""

    title = "layer selection"
    min_params: int = opt(4096, "non_negative_int", "leave weights with fewer elements alone (default 4096)", metavar="N")
    include: str | None = opt(None, "regex", "only factorize nodes or weights whose name matches", metavar="REGEX")
    exclude: str | None = opt(None, "regex", "leave nodes or weights whose name matches alone", metavar="REGEX")
    op_types: tuple[str, ...] = opt(OP_TYPES, "names", "node types to consider, a comma-separated subset of MatMul,Gemm,Conv "
                                    "(default: all three)", metavar="LIST", choices=OP_TYPES)
    conv_mode: str = opt("auto", "choice", "how a Conv is split: channel (k x k conv to r channels, then 1 x 1), spatial "
                         "(kh x 1, then 1 x kw), or auto: per layer, whichever needs fewer MACs (when a budget allocates "
                         "the Conv, docs/conv.md: whichever keeps more energy at half the parameters) (default auto)",
                         choices=CONV_MODES)
    allow_input_weights: bool = opt(False, "switch", "also factorize weights that are graph inputs (every initializer is one in "
                                    "IR < 4)")


@dataclass(frozen=True)
class Latency(Section):
    """The settings the model will run at, and latency-aware selection."""

    title = "latency"
    latency_aware: bool = opt(False, "switch", "factorize a layer only where onnxruntime runs its factored form faster, at every "
                              "--threads x --batch")
    threads: tuple[int, ...] = opt((1,), "int_list", "onnxruntime intra-op thread counts the model runs with (default 1); "
                                   "verification uses the first", metavar="LIST", example=(1, 2))
    batch: tuple[int, ...] = opt((1,), "int_list", "batch sizes the model runs at (default 1)", metavar="LIST", example=(1, 2))
    input_shape: tuple[str, ...] = opt((), "shapes", "shape of an input with dynamic axes, e.g. input_ids:1x128 (comma-separated, "
                                       "repeatable); for latency-aware mode and for random verification inputs",
                                       metavar="NAME:DIMS")
    min_speedup: float = opt(1.1, "positive_float", "speed-up a layer must show at every setting in latency-aware mode "
                             "(default 1.1)", metavar="X", example=1.1, high=100.0)

    def rules(self) -> None:
        # (--threads also sets the check's sessions, so it stands alone)
        _needs(float(self.min_speedup) != 1.1, "min_speedup", self.latency_aware, "latency_aware",
               "is the speed-up latency-aware mode asks of each layer")
        _needs(tuple(self.batch) != (1,), "batch", self.latency_aware, "latency_aware",
               "sets the batch sizes latency-aware mode times the layers at")


@dataclass(frozen=True)
class Quantize(Section):
    """Quantization after factorization: onnxruntime's int8, or 4-bit blocks with a low-rank correction."""

    title = "quantization"
    quantize: str | None = opt(None, "choice", "quantize after factorization: int8 (onnxruntime's dynamic int8, one scale per "
                               "weight), int8-per-channel (one scale per output column of MatMul/Gemm weights; better quality, "
                               "same size; Conv kernels keep one scale), or int4 (4-bit blocks as onnxruntime's MatMulNBits, "
                               "with a low-rank correction of their error; add --energy 1 for int4 without factorization; "
                               "docs/int4.md)", choices=QUANTIZE_MODES)
    int8_ops: str = opt("default", "choice", "with --quantize int8*: the ops onnxruntime's quantizer takes: default (its own "
                        "list: MatMul, Conv, LSTM, Gather of a constant table, Attention) or matmul (MatMul weights and the "
                        "factors only; Convs, LSTMs and embedding tables stay float: its ConvInteger can be slower and less "
                        "exact than float Conv)", choices=("default", "matmul"))
    int4_block: int = opt(32, "choice", "with --quantize int4: weights per block along the input axis (default 32)",
                          choices=INT4_BLOCKS)
    int4_accuracy_level: int = opt(0, "non_negative_int", "with --quantize int4: MatMulNBits's compute type: 0 unset (float, "
                                   "default), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (less exact; time it: on the CPU of "
                                   "docs/int4.md it was slower)",
                                   metavar="L", example=4)
    int4_correction: Any = opt("auto", "any", "with --quantize int4: the low-rank branch that corrects each layer's 4-bit "
                               "error: a number in (0, 1) keeps the smallest rank holding that share of the residual's energy "
                               "(whitened by the layer's inputs under --data-aware), an integer is a fixed rank, 0 turns the "
                               "branch off; auto (default): off (with --data-aware the blocks are rounded with error feedback, "
                               "--int4-rounding gptq, which repairs most of what a branch would at no cost in bytes or time), "
                               "0.5 with --data-aware --int4-rounding nearest", metavar="E|R", example=0.5)
    int4_max_rank: int = opt(64, "positive_int", "with --quantize int4: the highest rank a correction branch gets (default 64)",
                             metavar="R", example=32)
    int4_factors: str = opt("int8", "choice", "with --quantize int4: how low-rank factors (correction branches and the "
                            "factorization's pairs) are stored: int8 (one scale per singular direction, default) or float",
                            choices=("int8", "float"))
    int4_branch: str = opt("auto", "choice", "with --quantize int4: where a correction branch's second factor goes: auto "
                           "(default) stacks it below the weight's 4-bit blocks, one product of [x, x A] instead of a second "
                           "MatMul and an Add, where the layer is at least as wide as its input (N >= K), "
                           "factors are int8 and it costs at most 1/8 more bytes (a rank of about half the block or "
                           "more); separate keeps x A B a product of its own everywhere",
                           choices=("auto", "separate"))
    int4_rounding: str = opt("gptq", "choice", "with --quantize int4: how weights round to their 4-bit levels: gptq (default) "
                             "rounds each block's rows in order and feeds each row's error into the rows not yet rounded, "
                             "weighted by the layer's inputs (needs --data-aware; without input statistics it is nearest); "
                             "nearest rounds every weight on its own", choices=("gptq", "nearest"))

    def rules(self) -> None:
        object.__setattr__(self, "int4_correction", _correction(self.int4_correction))
        if self.int8_ops != "default" and self.quantize not in ("int8", "int8-per-channel"):
            raise UsageError(f"{option('int8_ops')} chooses the ops of the int8 quantization; add "
                             f"{option_value('quantize', 'int8')} (or int8-per-channel) or drop {option('int8_ops')}.")
        if self.quantize != "int4":
            for f in fields(self):
                if f.name.startswith("int4_") and getattr(self, f.name) != f.default:
                    raise UsageError(f"{option(f.name)} sets the 4-bit quantization; add {option_value('quantize', 'int4')} "
                                     f"or drop {option(f.name)}.")
            return
        if self.int4_accuracy_level > 4:
            raise UsageError(f"{option('int4_accuracy_level')} must be 0, 1, 2, 3 or 4, got {self.int4_accuracy_level!r}.")
        from .passes.int4 import require_runtime  # the runtime is checked before any work

        require_runtime(self.int4_block, self.int4_accuracy_level)


def _correction(value: Any) -> float | int | str:
    """``int4_correction`` as a share of energy (a float in (0, 1)), a rank (an int; 0: off) or ``"auto"``."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "auto":
        return text
    if value is None or text in ("none", "off"):
        return 0
    if text is not None:
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:
            value = text
    if isinstance(value, float) and value == 1.0:  # the whole energy or the rank 1? neither is what anyone means by 1.0
        raise UsageError(f"{option('int4_correction')} 1.0 is ambiguous: a share of energy is below 1 (e.g. "
                         f"{option_value('int4_correction', 0.99)}) and a rank is a whole number (e.g. "
                         f"{option_value('int4_correction', 1)}).")
    if isinstance(value, float) and value.is_integer() and (value == 0 or value > 1):
        value = int(value)  # "2.0" is the rank 2, "0.0" no branch
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 < value < 1.0:
        return value
    shown = value.strip() if isinstance(value, str) else (int(value) if isinstance(value, float) and value.is_integer() else value)
    raise UsageError(f"{option('int4_correction')} takes a share of energy in (0, 1), a rank (a whole number), 0 to turn "
                     f"the branch off, or auto; got {shown!r}; e.g. {option_value('int4_correction', 0.5)}.")


@dataclass(frozen=True)
class Compute(Section):
    """How the pass runs its own work; never what it produces."""

    title = "compute (the pass's own work; the result is the same)"
    cores: int | None = opt(None, "positive_int", "CPU cores the pass uses: BLAS threads of its SVDs and onnxruntime threads of its "
                            "calibration runs, never more together (default: the cores this process may run on)", metavar="N",
                            example=2)
    workers: int = opt(1, "positive_int", "run the spectra, the calibration statistics and the sensitivity runs in N worker "
                       "processes, each with cores/N threads (default 1: here)", metavar="N", example=2)
    executor: str = opt("local", "choice", "where the workers run: local (this machine) or ray (a Ray cluster; needs "
                        "pip install 'onnx-lowrank[ray]')", choices=EXECUTORS)
    ray_address: str | None = opt(None, "text", "with --executor ray: the cluster to join, e.g. ray://head:10001 (default: a "
                                  "local Ray started for the run)", metavar="ADDR")

    def rules(self) -> None:
        if self.ray_address is not None and self.executor != "ray":
            raise UsageError(f"{option('ray_address')} names a Ray cluster; add {option_value('executor', 'ray')} or drop it.")


#: The sections of :class:`CompressConfig`, in the order their flags appear.
SECTIONS: tuple[type[Section], ...] = (RankRule, Budget, DataAware, Width, Adaptive, Refine, Selection, Latency, Quantize,
                                       Compute)
#: Sections that change how the pass runs, not what it produces (left out of the model's stamp).
RUN_ONLY: tuple[type[Section], ...] = (Compute,)
_OWNER = {f.name: cls for cls in SECTIONS for f in fields(cls)}


class CompressConfig:
    """Every option that changes what the pass produces: the :data:`SECTIONS` as one flat set.

    ``CompressConfig(energy=0.93, min_params=0)`` builds and validates every section; each
    option reads as an attribute (``cfg.energy``), keeps its name as a recipe key and a flag, and
    its declaration (help, kind, example) is in the section that owns it:

    * :class:`RankRule`: ``energy``, ``rank``, ``rank_multiple``, ``rank_rule``;
    * :class:`Budget`: ``target_params``, ``target_macs``, ``budget_scope``;
    * :class:`DataAware`: ``data_aware``, ``attention_aware``, ``damping``, ``calib_mask``;
    * :class:`Width`: ``ffn_keep``, ``ffn_select``;
    * :class:`Adaptive`: ``adaptive``, ``adaptive_samples``, ``max_drop``, ``metric`` (the
      drop is read as the verification gate reads it; ``cosine`` for embeddings);
    * :class:`Refine`: ``refine``;
    * :class:`Selection`: ``min_params``, ``include``, ``exclude``, ``op_types``, ``conv_mode``,
      ``allow_input_weights``;
    * :class:`Latency`: ``latency_aware``, ``threads``, ``batch``, ``input_shape``, ``min_speedup``;
    * :class:`Quantize`: ``quantize``;
    * :class:`Compute`: ``cores``, ``workers``, ``executor``, ``ray_address`` (how the pass runs;
      the result is the same).

    Instances are immutable; :meth:`replace` gives a changed copy.
    """

    __slots__ = ("_sections",)

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(_OWNER))
        if unknown:
            raise TypeError(f"CompressConfig() got an unexpected keyword argument {unknown[0]!r}")
        sections = tuple(cls(**{k: v for k, v in values.items() if _OWNER[k] is cls}) for cls in SECTIONS)
        object.__setattr__(self, "_sections", sections)
        self._rules()

    @staticmethod
    def fields() -> tuple[dataclasses.Field, ...]:
        """Every option's field, section by section (its ``metadata["opt"]`` is the declaration)."""
        return tuple(f for cls in SECTIONS for f in fields(cls))

    def section(self, cls: type[Section]) -> Section:
        return self._sections[SECTIONS.index(cls)]

    def __getattr__(self, name: str) -> Any:
        owner = _OWNER.get(name)
        if owner is None:
            raise AttributeError(f"CompressConfig has no option {name!r}")
        return getattr(self.section(owner), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressConfig) and self._sections == other._sections

    def __hash__(self) -> int:
        return hash(self._sections)

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in self.fields() if getattr(self, f.name) != f.default]
        return f"CompressConfig({', '.join(changed)})"

    def __reduce__(self):
        return (_from_values, (self.values(),))

    def _rules(self) -> None:
        """Rules between sections: the ways of choosing ranks exclude each other."""
        stats = self.data_aware or self.ffn_keep is not None
        if self.ffn_keep == "auto" and not (self.adaptive or (self.has_budget and self.data_aware)):
            if self.has_budget:  # the budget is there: only the statistics to weigh widths against ranks are missing
                raise UsageError(f"{option_value('ffn_keep', 'auto')} under a budget weighs each block's widths on whitened "
                                 f"errors: add {option('data_aware')} (or {option('adaptive')} to measure them instead).")
            raise UsageError(f"{option_value('ffn_keep', 'auto')} lets a budget choose each block's width: add "
                             f"{option('data_aware')} and {option('target_params')} F (or {option('target_macs')} F), or "
                             f"{option('adaptive')} with a goal; or give a fraction, e.g. {option_value('ffn_keep', 0.75)}.")
        what = f"shapes the activation statistics of {option('data_aware')} or {option('ffn_keep')}"
        _needs(self.calib_mask is not None, "calib_mask", stats, "data_aware", what)
        _needs(float(self.damping) != DEFAULT_DAMPING, "damping", stats, "data_aware", what)
        if self.has_budget:
            if self.rank is not None or self.energy is not None:
                flag = option("rank") if self.rank is not None else option("energy")
                raise UsageError(f"a budget ({option('target_params')}/{option('target_macs')}/{option('target_bytes')}) allocates ranks "
                                 f"itself; drop {flag}.")
            if self.rank_rule != "energy":
                raise UsageError(f"{option('rank_rule')} applies per layer; a budget ({option('target_params')}/"
                                 f"{option('target_macs')}/{option('target_bytes')}) allocates ranks itself.")
        if self.target_bytes is not None:
            if self.quantize == "int4" and (self.target_params is not None or self.target_macs is not None):
                raise UsageError(f"with {option_value('quantize', 'int4')}, {option('target_bytes')} is the budget (int4 changes "
                                 f"bytes, not parameters); drop {option('target_params')}/{option('target_macs')}.")
            if self.adaptive and self.max_drop is not None and self.quantize == "int4":
                raise UsageError(f"with {option_value('quantize', 'int4')} and {option('target_bytes')}, {option('adaptive')} "
                                 f"allocates that budget by measured sensitivity; drop {option('max_drop')} (its search moves "
                                 f"a parameter budget).")
            if self.quantize == "int4" and self.ffn_keep is not None and self.ffn_keep != "auto":
                raise UsageError(f"with {option_value('quantize', 'int4')} and {option('target_bytes')}, pass "
                                 f"{option_value('ffn_keep', 'auto')}: the budget then prices each block's widths in 4-bit "
                                 f"blocks; or drop {option('ffn_keep')}.")
            if self.quantize == "int4" and self.int4_correction != "auto":
                raise UsageError(f"{option('target_bytes')} chooses each branch's rank itself; drop {option('int4_correction')}.")
        if self.quantize == "int4" and self.latency_aware:
            raise UsageError(f"{option('latency_aware')} times float factor pairs, not the 4-bit forms "
                             f"{option_value('quantize', 'int4')} writes; drop one of them.")
        if self.adaptive:
            if self.max_drop is None and not self.has_budget:
                raise UsageError(f"{option('adaptive')} needs a goal: {option('max_drop')} X, or a budget {option('target_params')} F "
                                 f"/ {option('target_macs')} F.")
            if self.max_drop is not None and self.has_budget:
                raise UsageError(f"{option('adaptive')} takes either {option('max_drop')} or a budget ({option('target_params')}/"
                                 f"{option('target_macs')}), not both.")
            if self.rank is not None or self.energy is not None or self.rank_rule != "energy":
                raise UsageError(f"{option('adaptive')} allocates ranks itself; drop {option('energy')}/{option('rank')}/"
                                 f"{option('rank_rule')}.")

    @property
    def has_budget(self) -> bool:
        """Whether a global budget (``target_params``, ``target_macs`` or ``target_bytes``) is set."""
        return self.section(Budget).given

    @property
    def needs_calibration(self) -> bool:
        """Whether the options need calibration data (``data_aware``, ``ffn_keep``, ``adaptive`` or ``refine``)."""
        return self.data_aware or self.ffn_keep is not None or self.adaptive or self.refine

    @property
    def needs_statistics(self) -> bool:
        """Whether the activation statistics are captured (``data_aware`` or ``ffn_keep``)."""
        return self.data_aware or self.ffn_keep is not None

    @property
    def effective_energy(self) -> float | None:
        """The rule's threshold in force (``None`` for a fixed rank, a budget or adaptive mode)."""
        if self.rank is not None or self.has_budget or self.adaptive:
            return None
        return DEFAULT_ENERGY if self.energy is None else float(self.energy)

    def values(self) -> dict[str, Any]:
        """Every option's value, by name."""
        return {f.name: getattr(self, f.name) for f in self.fields()}

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
        return CompressConfig(**{**self.values(), **changes})

    def to_dict(self, *, results_only: bool = False) -> dict[str, Any]:
        """Every option as JSON-ready data; ``results_only`` leaves out those that only change how
        the pass runs (:data:`RUN_ONLY`)."""
        skip = {f.name for cls in RUN_ONLY for f in fields(cls)} if results_only else set()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.values().items() if k not in skip}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> "CompressConfig":
        """Build from a mapping (a parsed recipe); unknown keys are an error that lists the known ones."""
        unknown = sorted(set(data) - set(_OWNER))
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(_OWNER))}.")
        if source == "config":
            return cls(**dict(data))
        with recipe_keys():  # the keys as the file spells them, and the file named
            try:
                return cls(**dict(data))
            except UsageError as exc:
                raise UsageError(f"{source}: {exc}") from None


def _from_values(values: dict[str, Any]) -> CompressConfig:
    return CompressConfig(**values)


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
    if p.is_dir():
        raise UsageError(f"{option('recipe')} {name_or_path}: is a directory; pass a recipe's .toml file or a shipped recipe's "
                         f"name ({', '.join(list_recipes()) or 'none'}).")
    if p.suffix == "" and p.parent == Path("."):
        for d in _recipe_dirs():
            cand = d / f"{p.name.lower()}.toml"  # (shipped names are lower case; choices take any case)
            if cand.is_file():
                return cand
    raise UsageError(f"{option('recipe')} {name_or_path}: no such file or shipped recipe; shipped recipes: "
                     f"{', '.join(list_recipes()) or 'none'}.")


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """The keys of a recipe file, validated against :class:`CompressConfig`."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option('recipe')} {path}: not valid TOML ({exc}).") from None
    data.pop("description", None)
    CompressConfig.from_mapping(data, source=f"{option('recipe')} {path}")
    return data

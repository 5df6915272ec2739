"""The pass as a pipeline of stages.

A stage (one module each, in :mod:`onnx_lowrank.passes`) reads the :class:`Context` (the request,
the current model and what earlier stages returned), does one job, and returns a typed result
that the runner stores under the stage's name.  Stages never write into an earlier stage's
result; one that changes the model says so (``changes_model``) and hands the next model over in
its result.  The runner skips stages that do not apply to the request, reports progress, and
names the stage when something unexpected fails in it.

The report is made from the results, once (:mod:`onnx_lowrank.passes.report`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, TypeVar

import onnx

from . import io
from .errors import LowRankError, ModelError
from .runtime.run import Progress

if TYPE_CHECKING:
    from .config import CompressConfig
    from .verify import VerifyConfig

__all__ = ["Request", "Context", "Stage", "Step", "StageResult", "StageError", "run", "Progress"]

log = logging.getLogger(__name__)


R = TypeVar("R", bound="StageResult")


class StageResult:
    """What a stage returns.  ``section`` names its part of the report (``None``: no part)."""

    section: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        return {}

    def report_sections(self) -> dict[str, dict[str, Any]]:
        """Its parts of the report by section name (one, ``section``, unless a result says more)."""
        return {self.section: self.to_dict()} if self.section is not None else {}


@dataclass(frozen=True)
class Request:
    """Everything a caller asked for, validated: what ``compress()`` was called with.

    Attributes:
        source: A path, or an ``onnx.ModelProto`` (never modified).
        config: What the pass does.
        verify: How to check the result (``None``: no check).
        dry_run: Decide but do not rewrite.
        base_dir: Where an in-memory model's external data lives.
        calib, labels, calib_batch, calib_script: Calibration data for the stages that need it.
        probe: What latency-aware mode measures with.
        progress: Called as work advances.
    """

    source: Any
    config: "CompressConfig"
    verify: "VerifyConfig | None" = None
    dry_run: bool = False
    base_dir: Path | None = None
    calib: Any = None
    labels: Any = None
    calib_batch: int = 32
    calib_script: str | None = None
    probe: Any = None
    progress: Progress | None = None


@dataclass
class Context:
    """What flows through the pipeline: the request, the current model, and the results so far.

    Attributes:
        request: What the caller asked for.
        model: The model as the stages so far left it (the load stage's copy, then the rewrite's).
        data: Where :attr:`model`'s external data resolves.
        results: Each stage's result, by stage name, in the order they ran.
        seconds: Wall time of each stage that ran.
        executor: Where the parallel stages run their tasks (:mod:`onnx_lowrank.runtime.executor`;
            ``None``: here, in order).
    """

    request: Request
    model: onnx.ModelProto | None = None
    data: io.DataFiles = field(default_factory=io.DataFiles)
    results: dict[str, StageResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    executor: Any = None

    @property
    def config(self) -> "CompressConfig":
        return self.request.config

    def get(self, kind: type[R]) -> R | None:
        """The result of type ``kind``, when a stage returned one."""
        return next((r for r in self.results.values() if isinstance(r, kind)), None)

    def need(self, kind: type[R]) -> R:
        """The result of type ``kind``, which an earlier stage must have returned."""
        found = self.get(kind)
        if found is None:
            raise RuntimeError(f"no earlier stage returned a {kind.__name__}")
        return found

    def latest(self, kind: type[R]) -> R | None:
        """The last result of type ``kind`` (decisions are replaced by later deciders)."""
        return next((r for r in reversed(list(self.results.values())) if isinstance(r, kind)), None)

    def progress(self, done: int, total: int, label: str) -> None:
        if self.request.progress is not None:
            self.request.progress(done, total, label)


class Stage(Protocol):
    """One step of the pass.

    Attributes:
        name: How reports and errors name the stage.
        changes_model: Whether its result carries a new model (``result.model``).
    """

    name: str
    changes_model: bool

    def applies(self, ctx: Context) -> bool:
        """Whether the request needs this stage."""
        ...

    def run(self, ctx: Context) -> StageResult:
        ...


class Step:
    """What most stages share: the model is read, not changed, and the stage applies to every
    request, or to those whose config turns on ``switch`` (``"adaptive"``, ``"data_aware"``)."""

    name: ClassVar[str]
    changes_model: ClassVar[bool] = False
    switch: ClassVar[str | None] = None

    def applies(self, ctx: Context) -> bool:
        return self.switch is None or bool(getattr(ctx.config, self.switch))


class StageError(ModelError):
    """Something unexpected failed inside a stage; the message names the stage."""

    def __init__(self, stage: str, exc: BaseException):
        text = str(exc).strip().splitlines()
        super().__init__(f"stage '{stage}' failed: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
        self.stage = stage


def run(stages: Sequence[Stage], ctx: Context) -> Context:
    """Run each stage that applies, in order, storing its result in ``ctx``.

    Raises:
        LowRankError: as the stage raised it (it already says what to fix).
        StageError: any other exception, with the stage named (the original is chained).
    """
    for stage in stages:
        if not stage.applies(ctx):
            continue
        start = time.perf_counter()
        try:
            result = stage.run(ctx)
        except (LowRankError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise StageError(stage.name, exc) from exc
        ctx.results[stage.name] = result
        ctx.seconds[stage.name] = time.perf_counter() - start
        if stage.changes_model:
            ctx.model, ctx.data = result.model, result.data  # type: ignore[attr-defined]
        log.debug("stage %s: %.3f s", stage.name, ctx.seconds[stage.name])
    return ctx


def sections(ctx: Context) -> Mapping[str, dict[str, Any]]:
    """Each stage's report section, by section name, in pipeline order (later ones win)."""
    out: dict[str, dict[str, Any]] = {}
    for r in ctx.results.values():
        out.update(r.report_sections())
    return out

"""onnx-ir: :class:`LowRankPass`, low-rank factorization as a pass on onnx-ir's pass infrastructure.

onnx-ir is the ONNX project's in-memory IR; the PyTorch ONNX exporter and onnxscript's optimizer
run passes written on it.  ``LowRankPass(**options)`` takes the options of
:func:`onnx_lowrank.compress` and runs it on an ``ir.Model``::

    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnx_lowrank.integrations.ir import LowRankPass

    lowrank = LowRankPass(energy=0.93)
    result = ir.passes.PassManager([LiftConstantsToInitializersPass(), lowrank, RemoveUnusedNodesPass()])(model)
    print(result.modified, lowrank.result.totals.params_after)

The pass is *functional* (``ir.passes.FunctionalPass``): it returns a new ``ir.Model`` and leaves
the one given as it is, as :func:`~onnx_lowrank.compress` does with every input.  The model is
serialized to an ``onnx.ModelProto`` (``ir.to_proto``), compressed, and read back
(``ir.from_proto``).  ``PassResult.modified`` is true when at least one layer was factorized.

The report: the pass keeps the :class:`~onnx_lowrank.api.CompressResult` of its latest run as
:attr:`LowRankPass.result` (``layers``, ``totals``, ``to_json()``, ``save()``).  It lives on the
pass rather than on the returned ``PassResult`` because ``Sequential`` and ``PassManager`` return
results of their own.

External data: tensors that ``ir.load`` left in external files (``ir.ExternalTensor``) are
serialized as references, so a weight is read only if it is factorized, from the folder the
tensors name as their ``base_dir`` (or ``base_dir=`` given to the pass).  In the returned model,
weights left alone still reference those files; the factors are in memory.

Run it once per model.  A model that carries this package's metadata stamp (``onnx_lowrank``:
it was factorized already) is returned unchanged with ``modified=False``, so a ``PassManager``
with ``steps > 1`` does not factorize the factors again and again.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

from onnx_lowrank.api import METADATA_KEY, CompressResult, _resolve_config, compress
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.errors import UsageError

from ._common import inline_spilled, require

ir = require("onnx_ir", "ir", "LowRankPass")

__all__ = ["LowRankPass"]

log = logging.getLogger(__name__)

# compress() keywords that say how to run, not what to decide (calib, verify, dry_run, ...).
_RUN_KEYWORDS = frozenset(inspect.signature(compress).parameters) - {"model", "config", "recipe", "base_dir", "options"}


class LowRankPass(ir.passes.FunctionalPass):
    """Factorize the constant weights of MatMul/Gemm/Conv nodes into low-rank pairs.

    Args:
        config: A :class:`~onnx_lowrank.config.CompressConfig`, as for ``compress()``.
        recipe: A recipe name or TOML path, as for ``compress()``.
        base_dir: Where external data of the model lives, when its tensors do not say.
        **options: Every other keyword of ``compress()``: options (``energy=0.93``,
            ``rank=64``, ``data_aware=True``, ...) and run settings (``calib=``, ``verify=``,
            ``dry_run=``, ``progress=``).  Options are validated here, when the pass is made.

    Attributes:
        config: The resolved configuration.
        result: The :class:`~onnx_lowrank.api.CompressResult` of the latest run that compressed
            (``None`` before the first); a later step of a ``PassManager`` that finds the model
            factorized already leaves it as it is, so the report of the real run survives.
    """

    def __init__(self, config: CompressConfig | None = None, *, recipe: str | os.PathLike | None = None,
                 base_dir: str | os.PathLike | None = None, **options: Any) -> None:
        super().__init__()
        self._run = {k: v for k, v in options.items() if k in _RUN_KEYWORDS}
        self.config = _resolve_config(config, recipe, {k: v for k, v in options.items() if k not in _RUN_KEYWORDS})
        _check_run_settings(self._run)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.result: CompressResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not isinstance(model, ir.Model):
            raise UsageError(f"LowRankPass runs on an onnx_ir.Model, got a {type(model).__name__}; convert it with "
                             "onnx_ir.from_proto(), or call onnx_lowrank.compress() on an onnx.ModelProto.")
        base_dir = self.base_dir or _external_base_dir(model)
        if METADATA_KEY in model.metadata_props:  # (self.result keeps the run that factorized it, if this pass made it)
            log.info("LowRankPass: the model was factorized already (metadata '%s'); left as it is", METADATA_KEY)
            return ir.passes.PassResult(_from_proto(ir.to_proto(model), base_dir), modified=False)
        result = compress(ir.to_proto(model), self.config, base_dir=base_dir, **self._run)
        inline_spilled(result)
        self.result = result
        return ir.passes.PassResult(_from_proto(result.model, base_dir), modified=result.modified and not result.dry_run)


def _check_run_settings(run: dict[str, Any]) -> None:
    """The run settings' kinds, checked when the pass is made (a PassManager would report a
    failure later only as 'an error occurred at step N')."""
    from onnx_lowrank.api import _resolve_verify

    _resolve_verify(run.get("verify"))
    calib = run.get("calib")
    if isinstance(calib, (bool, int, float)):
        raise UsageError(f"calib= takes calibration data (an .npz path, a folder of them, feed dicts or arrays), got {calib!r}.")
    if isinstance(calib, (str, os.PathLike)) and not Path(calib).exists():
        raise UsageError(f"calib= {str(calib)!r}: no such file or directory; pass an .npz file, a folder of them, feed dicts or arrays.")
    if run.get("progress") is not None and not callable(run["progress"]):
        raise UsageError(f"progress= takes a callable (done, total, message), got {run['progress']!r}.")


def _from_proto(proto: Any, base_dir: Path | None) -> ir.Model:
    model = ir.from_proto(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)  # external weights left alone still resolve
    return model


def _external_base_dir(model: ir.Model) -> Path | None:
    """The one folder the model's external tensors resolve against (``None`` when there are none)."""
    folders = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        tensors = [v.const_value for v in graph.initializers.values()]
        tensors += [a.value for node in graph for a in node.attributes.values()
                    if not a.is_ref() and a.type == ir.AttributeType.TENSOR]
        folders.update(os.fspath(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor))
    if len(folders) > 1:
        raise UsageError(f"the model's external tensors resolve against different folders ({', '.join(sorted(folders))}); "
                         "pass base_dir= to LowRankPass.")
    folder = folders.pop() if folders else None
    return Path(folder) if folder else None

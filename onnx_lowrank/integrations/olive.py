"""Olive: :class:`LowRankFactorization`, a pass for Olive workflows.

Olive chains conversion, optimization, quantization and evaluation passes from one workflow
config; none of its own passes factorizes ONNX weights.  This pass runs
:func:`onnx_lowrank.compress` on the ONNX model it is handed and passes the compressed model on,
so a workflow can factorize, then quantize with onnxruntime, then evaluate::

    "passes": {
        "lowrank": {"type": "LowRankFactorization", "energy": 0.93},
        "quantize": {"type": "OnnxDynamicQuantization"}
    }

Every option of ``compress()`` is a key of the pass's config, under the same name (``energy``,
``rank``, ``target_params``, ``data_aware``, ``exclude``, ...; one declaration each, in
:class:`~onnx_lowrank.config.CompressConfig`), and so are ``recipe`` and ``calib`` (calibration
data, an ``.npz`` file or folder, for ``data_aware``, ``adaptive`` and ``refine``).  Keys left out
take ``compress()``'s defaults.  The output folder holds the model, its data file when there is
one, and the JSON report, ``lowrank_report.json`` (``report: false`` leaves it out); the report is
one of the model's ``additional_files``, so Olive copies it along to the outputs of later passes.

Olive finds passes through its package configuration, a JSON file that maps pass names to
classes.  :func:`package_config` returns Olive's own with this pass added::

    import olive.workflows
    from onnx_lowrank.integrations.olive import package_config

    olive.workflows.run("workflow.json", package_config=package_config())

or, for the ``olive run`` command, write it to a file first::

    python -c "from onnx_lowrank.integrations.olive import write_package_config as w; w('olive_package.json')"
    olive run --config workflow.json --package-config olive_package.json

``examples/olive/`` is a complete workflow: the demo MLP, this pass, onnxruntime dynamic
quantization, and an accuracy and latency evaluation on held-out digits.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from onnx_lowrank.api import compress
from onnx_lowrank.config import CompressConfig

from ._common import require

require("olive", "olive", "the Olive pass LowRankFactorization")

from olive.common.config_utils import ParamCategory  # noqa: E402
from olive.hardware.accelerator import AcceleratorSpec  # noqa: E402
from olive.model import ONNXModelHandler  # noqa: E402
from olive.model.utils import resolve_onnx_path  # noqa: E402
from olive.passes import Pass  # noqa: E402
from olive.passes.pass_config import BasePassConfig, PassConfigParam  # noqa: E402
from olive.resource_path import LocalFolder  # noqa: E402

__all__ = ["LowRankFactorization", "package_config", "write_package_config", "PASS_TYPE", "REPORT_NAME"]

log = logging.getLogger(__name__)

#: The pass's name in a workflow config (``"type": "LowRankFactorization"``).
PASS_TYPE = "LowRankFactorization"
#: The report's file name in the pass's output folder.
REPORT_NAME = "lowrank_report.json"

# The Python type of each option kind (onnx_lowrank.options.Opt.kind), for Olive's config class;
# other kinds take any value.  Either way compress() validates every value as it does its own.
_TYPES: dict[str, Any] = {
    "energy": float, "fraction": float, "positive_float": float, "non_negative_float": float,
    "positive_int": int, "non_negative_int": int, "switch": bool,
    "choice": str, "regex": str, "text": str,
    "int_list": list[int], "names": Union[str, list[str]], "shapes": Union[str, list[str]],
}
_OPTIONS = tuple(f.name for f in CompressConfig.fields())


def _description(field: Any) -> str:
    o = field.metadata["opt"]
    choices = f" ({', '.join(map(str, o.choices))})" if o.choices else ""
    return f"{o.help}{choices}; as compress()'s {field.name}= (unset: its default)"


class LowRankFactorization(Pass):
    """Factorize the constant weights of MatMul/Gemm/Conv nodes into low-rank pairs.

    Takes an ONNX model, returns the compressed ONNX model in a folder with its data file and
    the JSON report (:data:`REPORT_NAME`).  See :func:`onnx_lowrank.compress` for the options.
    """

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        params = {f.name: PassConfigParam(type_=_TYPES.get(f.metadata["opt"].kind, Any), default_value=None,
                                          description=_description(f))
                  for f in CompressConfig.fields()}
        params["recipe"] = PassConfigParam(type_=str, default_value=None,
                                           description="a recipe name (balanced, ...: onnx_lowrank/passes/recipes) or a TOML "
                                                       "file; the options above override it")
        params["calib"] = PassConfigParam(type_=Optional[str], default_value=None, category=ParamCategory.PATH,
                                          description="calibration data (an .npz file or a folder of them) for data_aware, "
                                                      "adaptive and refine")
        params["report"] = PassConfigParam(type_=bool, default_value=True,
                                           description=f"write the JSON report as {REPORT_NAME} beside the model")
        return params

    def _run_for_config(self, model: ONNXModelHandler, config: BasePassConfig, output_model_path: str) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"{PASS_TYPE} takes an ONNX model, got a {type(model).__name__}; convert it to ONNX first "
                             "(e.g. with OnnxConversion).")
        options = {name: getattr(config, name) for name in _OPTIONS if getattr(config, name) is not None}
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        output.parent.mkdir(parents=True, exist_ok=True)
        result = compress(model.model_path, recipe=config.recipe, calib=config.calib, **options)
        report = output.parent / REPORT_NAME if config.report else None
        result.save(output, report=report)
        t = result.totals
        log.info("%s: %d of %d layers factorized, weight parameters %d -> %d", PASS_TYPE, t.factorized, t.layers,
                 t.params_before, t.params_after)
        attributes = dict(model.model_attributes or {})
        if report is not None:  # Olive copies "additional_files" along to the outputs of later passes
            attributes["additional_files"] = sorted({*attributes.get("additional_files", []), str(report)})
        # a folder, so that the data file and the report travel with the model
        return ONNXModelHandler(model_path=LocalFolder({"path": output.parent}), onnx_file_name=output.name,
                                model_attributes=attributes)


def package_config() -> dict[str, Any]:
    """Olive's own package configuration with :class:`LowRankFactorization` added.

    Give it to ``olive.workflows.run(config, package_config=package_config())``; Olive uses the
    package configuration it is given instead of its own, so every built-in pass stays in.
    """
    from olive.package_config import OlivePackageConfig

    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as f:
        data = json.load(f)
    data["passes"][PASS_TYPE] = {
        "module_path": f"onnx_lowrank.integrations.olive.{PASS_TYPE}",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
    }
    return data


def write_package_config(path: str | os.PathLike) -> Path:
    """Write :func:`package_config` as JSON to ``path`` (for ``olive run --package-config``)."""
    from onnx_lowrank.io import write_text

    return write_text(path, json.dumps(package_config(), indent=2) + "\n")


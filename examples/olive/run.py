"""Run the example workflow: the demo MLP -> low-rank factorization -> int8 quantization, evaluated.

    python examples/olive/run.py [--output DIR] [--energy 0.93]

``workflow.json`` is an ordinary Olive workflow config.  This script fills in the paths (the
demo model that ships with onnx-lowrank, the data script beside it), hands Olive the package
configuration that knows the ``LowRankFactorization`` pass, runs the workflow and prints the
accuracy and latency of the input model and of the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def workflow(output: Path, energy: float) -> dict[str, Any]:
    """``workflow.json`` with absolute paths: runs from any folder."""
    from onnx_lowrank.demo import DEMO_MODEL

    config = json.loads((HERE / "workflow.json").read_text(encoding="utf-8"))
    config["input_model"]["model_path"] = str(DEMO_MODEL)
    for data in config["data_configs"]:
        data["user_script"] = str(HERE / data["user_script"])
    config["passes"]["lowrank"]["energy"] = energy
    config["output_dir"] = str(output)
    config["cache_dir"] = str(output / "cache")
    return config


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("olive-output"), help="Olive's output folder")
    parser.add_argument("--energy", type=float, default=0.93, help="energy kept per layer by the low-rank pass")
    args = parser.parse_args(argv)

    import olive.workflows

    from onnx_lowrank.integrations.olive import package_config

    result = olive.workflows.run(workflow(args.output.resolve(), args.energy), package_config=package_config())
    before = result.get_input_model_metrics()
    for model in result.get_output_models():
        print(f"{'metric':<26}{'input model':>14}{'output model':>14}")
        for name, after in model.metrics_value.items():
            print(f"{name:<26}{before[name]['value']:>14.6g}{after['value']:>14.6g}")
        print(f"output: {model.model_path}")
    return result


if __name__ == "__main__":
    main()

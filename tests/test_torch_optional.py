"""torch stays optional: the package and its non-torch modules import without it."""

import subprocess
import sys

MODULES = ["onnx_lowrank", "onnx_lowrank.api", "onnx_lowrank.cli", "onnx_lowrank.config", "onnx_lowrank.decompose",
           "onnx_lowrank.demo", "onnx_lowrank.discovery", "onnx_lowrank.errors", "onnx_lowrank.io", "onnx_lowrank.policies",
           "onnx_lowrank.report", "onnx_lowrank.rewrite", "onnx_lowrank.verify", "onnx_lowrank.plan", "onnx_lowrank.shapes",
           "onnx_lowrank.calibration", "onnx_lowrank.activations", "onnx_lowrank.adaptive", "onnx_lowrank.bench",
           "onnx_lowrank.latency", "onnx_lowrank.quantize"]


def test_package_does_not_import_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in MODULES) + (
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_torch_subpackage_without_torch_says_how_to_install_it():
    # sys.modules["torch"] = None makes "import torch" fail as if PyTorch were not installed.
    code = "import sys\nsys.modules['torch'] = None\nimport onnx_lowrank.torch\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "onnx_lowrank.torch needs PyTorch" in done.stderr and "onnx-lowrank[torch]" in done.stderr

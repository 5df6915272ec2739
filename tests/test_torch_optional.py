"""torch stays optional: the package and its non-torch modules import without it."""

import subprocess
import sys

MODULES = ["onnx_lowrank", "onnx_lowrank.api", "onnx_lowrank.cli", "onnx_lowrank.config", "onnx_lowrank.decompose",
           "onnx_lowrank.demo", "onnx_lowrank.discovery", "onnx_lowrank.errors", "onnx_lowrank.io", "onnx_lowrank.policies",
           "onnx_lowrank.report", "onnx_lowrank.rewrite", "onnx_lowrank.verify"]


def test_package_does_not_import_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in MODULES) + (
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

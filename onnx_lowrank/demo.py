"""The embedded demo: compress a small real model shipped with the package and check it.

The model is an MLP (64-512-256-10) trained on scikit-learn's real 8x8 handwritten digits; the
held-out digits and their labels ship beside it (``benchmarks/make_demo_model.py`` rebuilds both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .api import compress
from .io import check_output_path
from .report import render_table, render_totals
from .verify import VerifyConfig

DATA = Path(__file__).resolve().parent / "data"
DEMO_MODEL = DATA / "digits_mlp.onnx"
DEMO_HOLDOUT = DATA / "digits_holdout.npz"
DEMO_ENERGY = 0.93


def run_demo(output: str, *, energy: float | None = None, rank: int | None = None, quiet: bool = False,
             echo: Callable[[str], None] = print) -> int:
    """Compress the shipped model, verify it on the held-out digits, write it to ``output``."""
    check_output_path(output, DEMO_MODEL)
    options = {"rank": rank} if rank is not None else {"energy": energy if energy is not None else DEMO_ENERGY}
    # The held-out npz carries its labels, so the check reports accuracy and F1; no gate: the
    # demo shows the numbers for any --energy/--rank rather than refusing.
    result = compress(DEMO_MODEL, verify=VerifyConfig(calib=DEMO_HOLDOUT), **options)
    rule = f"--rank {rank}" if rank is not None else f"--energy {options['energy']}"
    check = result.verification
    m = check.outputs[0]
    written = result.save(output)
    if not quiet:
        echo(f"model: {DEMO_MODEL.name} (MLP 64-512-256-10 trained on real 8x8 digits), {rule}")
        echo("")
        echo(render_table(result.layers))
        echo("")
        echo(render_totals(result.totals))
        echo("")
        echo(f"held-out check on {check.samples} digits the model never saw in training (onnxruntime):")
        echo(f"  accuracy   {m.accuracy_before:.4f} -> {m.accuracy_after:.4f}")
        echo(f"  macro-F1   {m.f1_before:.4f} -> {m.f1_after:.4f}")
        echo(f"  top-1 agreement with the original {m.top1_agreement:.4f}; "
             f"logits cosine mean {m.cosine_mean:.5f} (min {m.cosine_min:.5f}); max |diff| {m.max_abs_error:.4g}")
    t = result.totals
    echo(f"wrote {written[0]}: weights {t.params_before:,} -> {t.params_after:,} parameters, "
         f"accuracy {m.accuracy_before:.4f} -> {m.accuracy_after:.4f}")
    return 0

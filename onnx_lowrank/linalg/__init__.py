"""The math of low-rank compression: NumPy only, never onnx.

One module per concern, each stating its math in its docstring:

* :mod:`.svd`: the thin SVD of a weight, sign-fixed, and its split into two factors;
* :mod:`.rank`: per-layer rank rules (energy, spectral entropy, fixed) and break-even;
* :mod:`.whiten`: data-aware truncation in the space whitened by activation statistics;
* :mod:`.refit`: least-squares refit of factors on propagated activations;
* :mod:`.conv`: Conv weights as matrices, the kernels of the split, their MACs;
* :mod:`.allocate`: one rank per layer under a global budget (greedy water-filling);
* :mod:`.quant`: 4-bit block quantization and the low-rank correction of its error.
"""

from __future__ import annotations

from .allocate import BudgetError, Options, allocate, rank_options
from .conv import CONV_MODES, conv_kernels, conv_macs, conv_matrix, conv_matrix_shape, conv_output_size, conv_weight
from .rank import (RULES, RankChoice, break_even_rank, choice_at, choose_rank, energy_kept, energy_rank, entropy_kept,
                   entropy_rank, entropy_terms, lowrank_params, relative_error, round_rank)
from .quant import BlockQuantized, Correction, correction, dequantize, dequantize_columns, quantize_blocks, quantize_columns
from .refit import refit_factor, refit_lowrank
from .svd import Spectrum, factors, leading, spectrum
from .whiten import DEFAULT_DAMPING, whitened_spectrum, whitening_factor
from .width import SELECTIONS as NEURON_SELECTIONS
from .width import WidthFit, keep_neurons, neuron_priority, neuron_scores, refit_width, removal_order, width_errors

__all__ = [
    "Spectrum", "spectrum", "leading", "factors",
    "RULES", "RankChoice", "choose_rank", "choice_at", "energy_rank", "energy_kept", "relative_error", "break_even_rank",
    "lowrank_params", "round_rank", "entropy_terms", "entropy_rank", "entropy_kept",
    "DEFAULT_DAMPING", "whitening_factor", "whitened_spectrum",
    "refit_factor", "refit_lowrank",
    "CONV_MODES", "conv_matrix_shape", "conv_matrix", "conv_weight", "conv_kernels", "conv_output_size", "conv_macs",
    "BudgetError", "Options", "rank_options", "allocate",
    "NEURON_SELECTIONS", "WidthFit", "neuron_scores", "removal_order", "neuron_priority", "keep_neurons", "refit_width",
    "width_errors",
    "BlockQuantized", "quantize_blocks", "dequantize", "Correction", "correction", "quantize_columns", "dequantize_columns",
]

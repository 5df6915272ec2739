"""``to_svd``: swap a model's ``nn.Linear`` and ``nn.Conv2d`` layers for SVD-parameterized ones.

With ``init="weights"`` each new layer holds the thin SVD of the old weight,
``W = U diag(s) V^T`` at full rank ``r = min(m, n)`` (computed in float64), so the model computes
what it computed before, to float32 rounding.  With ``init="random"`` the factors are fresh:
random orthonormal ``U`` and ``V`` and a constant ``s`` with the Frobenius norm PyTorch's default
init gives in expectation; biases are kept.

Only layers of exactly these types are replaced; subclasses (such as the output projection of
``nn.MultiheadAttention``, whose owner reads ``.weight`` directly) and layers that the factored
form cannot express (grouped convs, non-zero padding modes) are left alone, each with a reason
logged at DEBUG.
"""

from __future__ import annotations

import logging
import re
from typing import Iterator

from torch import nn

from onnx_lowrank.errors import UsageError
from onnx_lowrank.torch.layers import CONV_MODES, INITS, SVDConv2d, SVDLayer, SVDLinear

__all__ = ["to_svd", "svd_layers"]

log = logging.getLogger(__name__)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"got {name}={value!r}; expected one of {', '.join(repr(a) for a in allowed)}.")


def number(name: str, value: object, *, integer: bool = False) -> float | int:
    """``value`` as a number (numpy scalars and 0-d tensors too), or a UsageError naming
    ``name``; ``integer``: it must be a whole number (2.7 is refused, not truncated)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UsageError(f"got {name}={value!r}; expected {'an integer' if integer else 'a number'}.")
    return value


def _compile(name: str, pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"got {name}={pattern!r}, which is not a valid regular expression: {exc}.") from None


def _skip_reason(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "owned by nn.MultiheadAttention, which reads its weight directly"
    if type(module) not in (nn.Linear, nn.Conv2d):
        return f"{type(module).__name__} is a subclass; only plain nn.Linear and nn.Conv2d are replaced"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}); only groups=1 is decomposed"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}; only zero padding is decomposed"
    return None


def to_svd(
    model: nn.Module,
    *,
    include: str | None = None,
    exclude: str | None = None,
    init: str = "weights",
    conv_mode: str = "channel",
    rank: int | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by SVD layers, in place.

    Args:
        model: The model; its layers are replaced in place.
        include: Regex; when given, only layers whose qualified name (``"features.0"``) matches
            (``re.search``) are replaced.
        exclude: Regex; layers whose qualified name matches are left alone.
        init: ``"weights"``: the SVD of each layer's weight, so outputs are unchanged;
            ``"random"``: fresh orthonormal factors (for training from scratch).
        conv_mode: ``"channel"`` (k x k conv to r channels, then 1x1) or ``"spatial"``
            (kh x 1 conv to r channels, then 1 x kw).
        rank: Start every layer at this rank (capped at its full rank); ``None`` keeps full rank.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        UsageError: an unknown ``init`` or ``conv_mode``, an invalid regex, or a rank below 1.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"to_svd takes a torch nn.Module, got a {type(model).__name__}.")
    _check_choice("init", init, INITS)
    _check_choice("conv_mode", conv_mode, CONV_MODES)
    if rank is not None and number("rank", rank, integer=True) < 1:
        raise UsageError(f"got rank={rank!r}; expected a positive integer or None for full rank.")
    inc, exc = _compile("include", include), _compile("exclude", exclude)
    present = [name for name, _ in svd_layers(model)]
    parents = {name: mod for name, mod in model.named_modules()}
    todo = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name:
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        reason = _skip_reason(name, module, parents.get(parent_name))
        if reason is None and exc is not None and exc.search(name):
            reason = f"excluded by exclude={exc.pattern!r}"
        if reason is None and inc is not None and not inc.search(name):
            reason = f"not matched by include={inc.pattern!r}"
        if reason is not None:
            log.debug("to_svd left %s alone: %s", name, reason)
            continue
        todo.append((name, parent_name, module))
    for name, parent_name, module in todo:
        if isinstance(module, nn.Linear):
            new: SVDLayer = SVDLinear.from_linear(module, init=init, rank=rank)
        else:
            new = SVDConv2d.from_conv(module, init=init, rank=rank, mode=conv_mode)
        new.train(module.training)
        setattr(parents[parent_name], name.rsplit(".", 1)[-1], new)
        m, n = new.matrix_shape
        log.info("to_svd replaced %s (%s) by %s: matrix %dx%d, rank %d", name, type(module).__name__, type(new).__name__, m, n, new.rank)
    if not todo and isinstance(model, (nn.Linear, nn.Conv2d)):
        raise UsageError("got a bare nn.Linear/nn.Conv2d; to_svd replaces layers inside a model: "
                         "wrap it (nn.Sequential(layer)) or use SVDLinear.from_linear / SVDConv2d.from_conv.")
    if not todo and present and rank is not None:
        raise UsageError(f"the model's layers are SVD layers already ({len(present)}), so rank={rank} changes nothing; "
                         "lower their ranks with prune(model, energy=...) or convert the original model.")
    if not todo:
        log.warning("to_svd found no nn.Linear or nn.Conv2d layer to replace%s", " (the model holds SVD layers already)"
                    if present else "; the model is left as it is")
    return model


def svd_layers(model: nn.Module) -> Iterator[tuple[str, SVDLayer]]:
    """Every SVD layer of ``model`` with its qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SVDLayer):
            yield name, module

"""accelerate(model): run a model's ``torch.nn`` attention on pykernels, in place."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .nn.attention import MultiheadAttention


@dataclass
class AccelerateReport:
    """Qualified names of the modules :func:`accelerate` swapped, and of those it left alone with the reason."""

    swapped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pykernels.accelerate: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        lines += [f"  swapped  {name or '<root>'}" for name in self.swapped]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, backend: str = "auto") -> AccelerateReport:
    """Makes every ``torch.nn.MultiheadAttention`` in ``model`` a :class:`pykernels.nn.MultiheadAttention`.

    The module object is kept and only its class changes, so its Parameters (and the optimisers holding them),
    hooks, device, dtype and training mode are untouched, and a module shared by several parents is swapped
    once. Subclasses of ``torch.nn.MultiheadAttention`` are skipped: they may override ``forward``.

    ``torch.nn.TransformerEncoderLayer`` in eval mode without autograd runs torch's fused fast path for the
    whole layer and never calls its attention module; that path is left as it is.
    """
    report = AccelerateReport()
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            report.skipped.append((name, "already a pykernels MultiheadAttention"))
        elif type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
            report.swapped.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            report.skipped.append((name, f"subclass {type(module).__qualname__} of nn.MultiheadAttention"))
    return report

"""accelerate(model): run a model's attention on pykernels, in place; restore(model) undoes it.

Its routes, each serving only what it computes with the same semantics and handing the rest back to the code
it replaces:

* ``torch.nn.MultiheadAttention`` modules become :class:`pykernels.nn.MultiheadAttention` (class swap).
* Calls to ``torch.nn.functional.scaled_dot_product_attention`` made during the model's forward are served by
  :func:`pykernels.fused_attention`: the root module's ``forward`` is wrapped (an instance attribute) in a
  function that enters a ``TorchFunctionMode`` for the call. Mode stacks are thread-local, so another thread
  running the same or another model is untouched, and the mode is left on exceptions.
* A Hugging Face transformers ``PreTrainedModel`` is switched to ``attn_implementation="pykernels"``
  (:mod:`pykernels.integrations.transformers`), so its attention modules call the fused kernel themselves.
* diffusers ``Attention`` modules with ``AttnProcessor2_0`` get a :class:`RoutedAttnProcessor`: the same
  processor, its SDPA call routed as above.
* timm's ``SwinTransformerBlock`` (v1) gets a per-instance ``_attn`` that runs :func:`pykernels.window_attention`
  on the un-partitioned map with the block's own weights.
* PyG's ``GCNConv``, ``GATConv``, ``GATv2Conv``, ``SAGEConv`` and ``TransformerConv`` get a per-instance ``forward``
  (:mod:`pykernels.integrations.pyg`) that serves the forms the graph kernels compute exactly.

Counts of served and fallen-through calls are kept in the report as the model runs, under ``torch.compile`` too:
the counting function is one of dynamo's reorderable logging functions, so a compiled graph calls it after each
run instead of breaking the graph. Dynamo keeps such calls only from the compiled forward's own frame, so the
routed forward collects the outcomes of its call and counts them there; counts of an accelerated module compiled
as part of a larger model are not kept (its routing is), nor are those of diffusers' attention layers under
``torch.compile`` (diffusers marks them allow_in_graph, so they are traced apart from that frame; they are served).
"""
from __future__ import annotations

import abc
import collections
import itertools
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _backend
from ._checks import FLOAT_DTYPES, GPU_MAX_HEAD_DIM
from .attention import fused_attention
from .nn.attention import MultiheadAttention
from .nn.window import swin_window_attention
from .window import swin_window_shift

__all__ = ["AccelerateReport", "FAMILIES", "RoutedAttnProcessor", "accelerate", "restore"]

FAMILIES = ("attention", "window", "graph")

_SDPA = F.scaled_dot_product_attention
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_SWIN_V2_BLOCKS = (("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
                   ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock"))
_SWIN_V2_REASON = ("SwinV2 block: its cosine attention (normalised q, k and a learned logit scale) and continuous "
                   "position bias are not the dot-product scores pykernels.window_attention computes")


# Below this many q·kᵀ multiply-adds (batch x heads x queries x keys x head dim) a call costs torch's CPU SDPA less
# than the fused kernel, whose fixed cost per call (argument checks, packing, the custom op's dispatch) is a few
# microseconds more: measured on a 2-thread AMD EPYC, fp32, forward and forward+backward, with the crossover between
# 0.5M and 2.5M over head dims 32 and 64 and 16 to 197 tokens, and pykernels ahead on every shape above 4M.
# ``backend="auto"`` hands such calls back to torch; a pinned ``backend="cpu"`` serves them.
_CPU_MIN_WORK = 1 << 22
_CPU_SMALL_REASON = "small call on the CPU (torch's SDPA is faster below 4M multiply-adds)"


class _Tally:
    """The live per-(path, outcome) call counts of one :func:`accelerate` call, shared by the hooks it installs.

    Hooks count through :func:`_count` with plain constants (``key``, path, outcome), which is what dynamo needs
    to replay the call after a compiled graph. A copy (``copy.deepcopy``, unpickling) gets its own key and counts.
    """

    _keys = itertools.count()
    _live: weakref.WeakValueDictionary[int, _Tally] = weakref.WeakValueDictionary()

    def __init__(self):
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._register()

    def _register(self):
        self.key = next(_Tally._keys)
        self.lock = threading.Lock()
        _Tally._live[self.key] = self

    def __getstate__(self):
        return {"calls": self.calls}

    def __setstate__(self, state):
        self.calls = state["calls"]
        self._register()


def _count(key: int, path: str, outcome: str) -> None:
    tally = _Tally._live.get(key)
    if tally is not None:
        with tally.lock:
            tally.calls[(path, outcome)] += 1


torch._dynamo.config.reorderable_logging_functions.add(_count)


@dataclass
class AccelerateReport:
    """What :func:`accelerate` changed (qualified module names, ``""`` for the root), what it left alone and why,
    and the live counts of calls served and handed back, per path and reason.

    * ``swapped``: ``nn.MultiheadAttention`` modules made :class:`pykernels.nn.MultiheadAttention`;
    * ``routed``: modules whose forward routes ``F.scaled_dot_product_attention`` to the fused kernel;
    * ``switched``: transformers ``PreTrainedModel`` modules switched to ``attn_implementation="pykernels"``;
    * ``windowed``: timm ``SwinTransformerBlock`` modules whose window attention runs ``window_attention``;
    * ``graph``: PyG conv layers whose forward runs on the graph kernels where it computes what PyG's does;
    * ``processors``: diffusers ``Attention`` modules whose ``AttnProcessor2_0`` became a
      :class:`RoutedAttnProcessor`;
    * ``calls``: ``{(path, outcome): n}`` with path ``"sdpa"``, ``"swin"`` or ``"pyg"`` and outcome ``"served"`` or the
      reason the call ran the original code; it updates as the model runs. Path ``"transformers"`` counts the
      calls of a switched model's attention modules.
    """

    swapped: list[str] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)
    switched: list[str] = field(default_factory=list)
    windowed: list[str] = field(default_factory=list)
    graph: list[str] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calls: collections.Counter = field(default_factory=collections.Counter)

    def served(self, path: str) -> int:
        return self.calls[(path, "served")]

    def fallbacks(self, path: str) -> dict[str, int]:
        """``{reason: calls}`` of the calls on ``path`` that ran the original code."""
        return {why: n for (p, why), n in self.calls.items() if p == path and why != "served"}

    @property
    def changed(self) -> int:
        """How many modules were changed, over every route."""
        return (len(self.swapped) + len(self.routed) + len(self.switched) + len(self.windowed)
                + len(self.processors) + len(self.graph))

    def __str__(self) -> str:
        lines = [f"pykernels.accelerate: {self.changed} changed, {len(self.skipped)} skipped"]
        lines += [f"  swapped  {name or '<root>'}" for name in self.swapped]
        lines += [f"  routed   {name or '<root>'}: F.scaled_dot_product_attention" for name in self.routed]
        lines += [f"  switched {name or '<root>'}: transformers attn_implementation='pykernels'"
                  for name in self.switched]
        lines += [f"  windowed {name or '<root>'}" for name in self.windowed]
        lines += [f"  graph    {name or '<root>'}: PyG conv on pykernels graph kernels" for name in self.graph]
        lines += [f"  routed   {name or '<root>'}.processor: diffusers AttnProcessor2_0" for name in self.processors]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped]
        lines += [f"  calls    {path} {outcome}: {n}" for (path, outcome), n in sorted(self.calls.items())]
        return "\n".join(lines)


# F.scaled_dot_product_attention -----------------------------------------------------------------------------------

def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _broadcasts_to(shape, full) -> bool:
    return len(shape) <= len(full) and all(s in (1, f) for s, f in zip(reversed(shape), reversed(full)))


def _unserved_reason(q, k, v, mask, dropout_p, is_causal, enable_gqa, backend) -> str | None:
    """Why ``pykernels.fused_attention`` would not compute exactly what SDPA does with these arguments, or None."""
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "non-tensor q, k, v or attn_mask"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return "tensor subclass"
    if dropout_p != 0:
        return "dropout_p > 0"
    if is_causal and mask is not None:
        return "is_causal with attn_mask"
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        return "q, k, v not all 3-D or all 4-D"
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtypes"
    if k.device != q.device or v.device != q.device or (mask is not None and mask.device != q.device):
        return "devices differ"
    # Under autocast SDPA computes in the autocast dtype; the fused op is not on autocast's lists.
    if torch.is_autocast_enabled(q.device.type):
        return "autocast"
    # Only auto picks an engine here; a pinned backend serves every call it can compute.
    engine = _backend.select("pykernels.fused_attention", backend, q.device) if backend == "auto" else None
    if engine == "reference":
        return "no pykernels engine for the device"
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return "empty tensors"
    if engine == "cpu" and q.numel() * k.size(-2) < _CPU_MIN_WORK:
        return _CPU_SMALL_REASON
    if (engine or backend) in ("cuda", "triton") and max(q.size(-1), v.size(-1)) > GPU_MAX_HEAD_DIM:
        return f"head dim above {GPU_MAX_HEAD_DIM} (the CUDA and Triton engines' limit)"
    heads = (q.size(1), k.size(1)) if q.dim() == 4 else (1, 1)
    if (k.size(0) != q.size(0) or v.shape[:-1] != k.shape[:-1] or k.size(-1) != q.size(-1)
            or (q.dim() == 4 and heads[1] == 0)):
        return "shapes"
    if heads[0] != heads[1]:
        if not enable_gqa:
            return "head counts differ without enable_gqa"
        if heads[0] % heads[1] != 0:
            return "query heads not a multiple of key/value heads"
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            return "attn_mask dtype"
        if not _broadcasts_to(mask.shape, (*q.shape[:-1], k.size(-2))):
            return "attn_mask shape"
    return None


def _fused_sdpa(q, k, v, mask, is_causal, scale, backend):
    if q.dim() == 4:
        return fused_attention(q, k, v, attn_bias=mask, causal=is_causal, scale=scale, backend=backend)
    # 3-D [B, N, D] is one head.
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    out = fused_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_bias=mask, causal=is_causal,
                          scale=scale, backend=backend)
    return out.squeeze(1)


class _SDPAMode(TorchFunctionMode):
    """Serves ``F.scaled_dot_product_attention`` calls with the fused kernel where the semantics are identical.

    One mode per forward call: ``outcomes`` collects ``(tally key, path, outcome)`` for every call served or
    handed back while it is active, counted by the routed forward once the mode is left: dynamo drops a
    reorderable logging call made while a torch-function mode is active.
    """

    def __init__(self, backend: str, tally: _Tally, route_sdpa: bool):
        super().__init__()
        self.backend, self.tally_key, self.route_sdpa = backend, tally.key, route_sdpa
        self.outcomes: list[tuple[int, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA or not self.route_sdpa:
            return func(*args, **kwargs)
        # torch has parsed the arguments against this signature before handing them to the mode.
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
        reason = _unserved_reason(q, k, v, mask, dropout_p, is_causal, enable_gqa, self.backend)
        self.outcomes.append((self.tally_key, "sdpa", reason or "served"))
        if reason is not None:
            return func(*args, **kwargs)
        return _fused_sdpa(q, k, v, mask, is_causal, scale, self.backend)


def _active_sdpa_mode() -> _SDPAMode | None:
    for mode in torch.overrides._get_current_function_mode_stack():
        if isinstance(mode, _SDPAMode):
            return mode
    return None


def _record(key: int, path: str, outcome: str) -> None:
    """Counts now, or through the routed forward running, which counts once its mode is left."""
    mode = _active_sdpa_mode()
    if mode is None:
        _count(key, path, outcome)
    else:
        mode.outcomes.append((key, path, outcome))


class _Routed(abc.ABC):
    """Runs :meth:`original` under an :class:`_SDPAMode`, unless an outer mode already routes as much; then that
    one serves the calls and counts them once.

    The counting loop stays in ``__call__`` itself: under ``torch.compile`` dynamo keeps reorderable logging
    calls made in the compiled forward's own frame only, and a routed forward's ``__call__`` is that frame.
    """

    def __init__(self, backend: str, tally: _Tally, route_sdpa: bool):
        self.backend, self.tally, self.route_sdpa = backend, tally, route_sdpa

    @abc.abstractmethod
    def original(self, *args, **kwargs):
        """The code being routed."""

    def __call__(self, *args, **kwargs):
        outer = _active_sdpa_mode()
        if outer is not None and (outer.route_sdpa or not self.route_sdpa):
            return self.original(*args, **kwargs)
        mode = _SDPAMode(self.backend, self.tally, self.route_sdpa)
        try:
            with mode:
                return self.original(*args, **kwargs)
        finally:
            if outer is None:
                for key, path, outcome in mode.outcomes:
                    _count(key, path, outcome)
            else:
                outer.outcomes.extend(mode.outcomes)


class _RoutedForward(_Routed):
    """A module's ``forward`` (instance attribute) that runs the original one under an :class:`_SDPAMode`.

    With ``route_sdpa`` False (``families`` without ``"attention"``) the mode only collects the counts of the
    Swin blocks, for the reason given in :class:`_Routed`. Inside another routed forward (an accelerated module
    inside an accelerated model) it enters no second mode where the outer one routes as much.
    """

    def __init__(self, module: nn.Module, backend: str, tally: _Tally, route_sdpa: bool):
        super().__init__(backend, tally, route_sdpa)
        self.module = module
        # An instance-level forward the user had set, put back by restore(); None means the class's forward.
        self.previous = module.__dict__.get("forward")
        # Looked up here, not per call: dynamo cannot trace ``type(module).forward`` for classes marked
        # allow_in_graph (diffusers' transformer blocks). accelerate() refreshes it after swapping the class.
        self.class_forward = type(module).forward

    def original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return self.class_forward(self.module, *args, **kwargs)


class RoutedAttnProcessor(_Routed):
    """A diffusers ``AttnProcessor2_0`` whose ``F.scaled_dot_product_attention`` call runs
    :func:`pykernels.fused_attention` where it computes the same thing (the SDPA route of :func:`accelerate`),
    so the layer is served also when called outside the accelerated model's forward.

    The signature is ``AttnProcessor2_0.__call__``'s: diffusers' ``Attention.forward`` filters the keyword
    arguments it passes by it. ``processor`` is the wrapped one, put back by :func:`restore`.
    """

    def __init__(self, processor, backend: str, tally: _Tally):
        super().__init__(backend, tally, route_sdpa=True)
        self.processor = processor

    def original(self, *args, **kwargs):
        return self.processor(*args, **kwargs)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


# timm Swin ---------------------------------------------------------------------------------------------------------

def _loaded_class(module_name: str, class_name: str):
    """A class of an optional library, only if the library is already imported (the model then holds its modules)."""
    return getattr(sys.modules.get(module_name), class_name, None)


class _SwinWindowAttn:
    """timm ``SwinTransformerBlock._attn`` for one block (instance attribute), on :func:`swin_window_attention`.

    Each call checks that the fused path computes what timm's would for this map, and runs timm's ``_attn``
    otherwise, counting the reason.
    """

    def __init__(self, block: nn.Module, backend: str, tally: _Tally):
        self.block, self.backend, self.tally = block, backend, tally

    def unserved_reason(self, x: torch.Tensor) -> str | None:
        block, attn = self.block, self.block.attn
        if attn.training and attn.attn_drop.p > 0:
            return "attention dropout in training"
        if attn._forward_hooks or attn._forward_pre_hooks:
            return "hooks on the block's attn module"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast"
        if self.backend == "auto" and _backend.select("pykernels.window_attention", "auto", x.device) == "reference":
            return "no pykernels engine for the device"
        spatial = (x.size(1), x.size(2))
        # timm fixes its window and shift from input_resolution (or keeps them whole with always_partition);
        # window_attention clamps them to the map it is given, so they must agree on this map.
        if swin_window_shift(spatial, block.window_size, block.shift_size) != (tuple(block.window_size),
                                                                               tuple(block.shift_size)):
            return "window or shift not timm's for this map size"
        if any(block.shift_size) and not block.dynamic_mask and spatial != tuple(block.input_resolution):
            return "map size differs from the precomputed shift mask's"
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        reason = self.unserved_reason(x)
        _record(self.tally.key, "swin", reason or "served")
        if reason is not None:
            return type(self.block)._attn(self.block, x)
        return swin_window_attention(self.block.attn, x, self.block.shift_size, backend=self.backend)


def _swin_skip_reason(block: nn.Module, swin_block_class, window_attention_class) -> str | None:
    if type(block)._attn is not swin_block_class._attn:
        return f"{type(block).__qualname__} overrides SwinTransformerBlock._attn"
    if type(block.attn).forward is not window_attention_class.forward:
        return f"its attn is a {type(block.attn).__qualname__}, not timm's WindowAttention"
    return None


# accelerate / restore ----------------------------------------------------------------------------------------------

def _check_families(families) -> frozenset[str]:
    if families is None:
        return frozenset(FAMILIES)
    if isinstance(families, str):
        families = (families,)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"pykernels.accelerate: unknown families {unknown}; expected a subset of {FAMILIES}")
    return frozenset(families)


def accelerate(model: nn.Module, *, backend: str = "auto", families=None) -> AccelerateReport:
    """Runs ``model``'s attention on pykernels, in place, and returns a report of what changed.

    * ``"attention"`` family: every ``torch.nn.MultiheadAttention`` becomes a
      :class:`pykernels.nn.MultiheadAttention` (the class of the same object changes; subclasses are skipped,
      they may override ``forward``), and calls to ``F.scaled_dot_product_attention`` made during
      ``model(...)`` run :func:`pykernels.fused_attention` where it computes the same thing: 3-D or 4-D
      q, k, v of one float dtype and device, bool or float masks broadcastable to ``[B, H, Nq, Nk]``,
      ``is_causal``, ``scale``, ``enable_gqa``. Other calls run torch's SDPA, counted per reason in
      ``report.calls``: dropout, ``is_causal`` with a mask, nested tensors and tensor subclasses, autocast,
      devices without a pykernels engine, mismatched dtypes or shapes (torch then raises its own error).
      Only calls through the model's own ``forward`` are routed; a submodule called directly is not.
      A transformers ``PreTrainedModel`` is switched with ``set_attn_implementation("pykernels")``
      (:func:`pykernels.integrations.transformers.attention_forward`; ``backend="auto"`` only, a pinned backend
      leaves it to the SDPA route); per-head weights (``output_attentions``) run the model's eager attention.
      diffusers ``Attention`` modules (UNets, transformers) with the default ``AttnProcessor2_0`` get a
      :class:`RoutedAttnProcessor`, which routes that processor's SDPA call the same way (also when the module is
      called on its own) and lists them in ``report.processors``.
    * ``"window"`` family: timm ``SwinTransformerBlock`` (v1) modules run their shifted-window attention with
      :func:`pykernels.window_attention` on the un-partitioned map, with the block's own weights. SwinV2 blocks
      are reported as skipped. A call that the kernel would not compute as timm does (attention dropout in
      training, a map whose window or shift timm sets differently, hooks on the block's ``attn``) runs timm's
      code and is counted.
    * ``"graph"`` family: PyG's ``GCNConv``, ``GATConv``, ``GATv2Conv``, ``SAGEConv`` and ``TransformerConv``
      (exact classes, if ``torch_geometric`` is imported) stay PyG objects with a per-instance ``forward`` that runs on
      :func:`pykernels.spmm`, :func:`pykernels.sddmm`, :func:`pykernels.edge_softmax` and
      :func:`pykernels.graph_attention` with the layer's own weights, reusing an ``edge_index``'s CSR across
      layers and calls while the tensor is unchanged. Forms computed otherwise (``size``, sparse or
      ``SparseTensor`` adjacency, ``target_to_source`` flow, other aggregations, explain mode, message-passing
      hooks, ``decomposed_layers``, lazy Parameters, attention dropout off CPU or under ``torch.compile``,
      autocast) run PyG's ``forward`` and are counted under path ``"pyg"``.

    Every Parameter object, hook, device, dtype and training mode is kept; a module shared by several parents is
    changed once; a second call changes nothing. :func:`restore` undoes it.

    Differences from the code replaced: a query whose keys are all masked gives zeros (torch 2.14's CPU SDPA
    gives zeros too; some of its CUDA kernels give NaN); pykernels' backward is not differentiable twice;
    forward hooks of timm's ``WindowAttention`` modules are honoured by falling back, while a Swin block is
    served its ``attn`` module's ``forward`` is not called.

    ``torch.nn.TransformerEncoderLayer`` in eval mode without autograd runs torch's fused fast path for the
    whole layer and never calls its attention module; that path is left as it is.
    """
    families = _check_families(families)
    if backend not in _backend.BACKENDS:
        raise ValueError(f"pykernels.accelerate: backend must be one of {_backend.BACKENDS}, got {backend!r}")
    report = AccelerateReport()
    routed = model.__dict__.get("forward")
    tally = routed.tally if isinstance(routed, _RoutedForward) else _Tally()
    report.calls = tally.calls
    if not isinstance(routed, _RoutedForward):
        routed = model.forward = _RoutedForward(model, backend, tally, route_sdpa=False)
    if "attention" in families:
        _swap_multihead_attention(model, backend, report)
        if routed.route_sdpa:
            report.skipped.append(("", "forward already routes F.scaled_dot_product_attention"))
        else:
            routed.route_sdpa, routed.backend = True, backend
            report.routed.append("")
        from .integrations import transformers  # it builds on this module

        transformers.switch_models(model, backend, report)
        _route_diffusers_processors(model, backend, tally, report)
    if "window" in families:
        _window_swin_blocks(model, backend, tally, report)
    if "graph" in families:
        from .integrations import pyg  # it builds on this module

        pyg.accelerate_convs(model, backend, tally, report, _RoutedForward)
    routed.class_forward = type(model).forward
    return report


def _swap_multihead_attention(model: nn.Module, backend: str, report: AccelerateReport) -> None:
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            report.skipped.append((name, "already a pykernels MultiheadAttention"))
        elif type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
            module._pykernels_swapped = True
            report.swapped.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            report.skipped.append((name, f"subclass {type(module).__qualname__} of nn.MultiheadAttention"))


def _route_diffusers_processors(model: nn.Module, backend: str, tally: _Tally, report: AccelerateReport) -> None:
    attention = _loaded_class("diffusers.models.attention_processor", "Attention")
    sdpa_processor = _loaded_class("diffusers.models.attention_processor", "AttnProcessor2_0")
    if attention is None:
        return
    for name, module in model.named_modules():
        if not isinstance(module, attention):
            continue
        processor = module.processor
        if isinstance(processor, RoutedAttnProcessor):
            report.skipped.append((name, "processor already routed to pykernels"))
        elif type(processor) is sdpa_processor:
            module.set_processor(RoutedAttnProcessor(processor, backend, tally))
            report.processors.append(name)
        else:
            # Other processors compute attention their own way (or call SDPA with extra steps, served by the
            # forward's SDPA route); wrapping them would promise what they may not do.
            report.skipped.append((name, f"diffusers processor {type(processor).__name__}, not AttnProcessor2_0"))


def _window_swin_blocks(model: nn.Module, backend: str, tally: _Tally, report: AccelerateReport) -> None:
    swin_block = _loaded_class("timm.models.swin_transformer", "SwinTransformerBlock")
    window_attention_class = _loaded_class("timm.models.swin_transformer", "WindowAttention")
    v2_blocks = tuple(c for c in (_loaded_class(*spec) for spec in _SWIN_V2_BLOCKS) if c is not None)
    for name, module in model.named_modules():
        if v2_blocks and isinstance(module, v2_blocks):
            report.skipped.append((name, _SWIN_V2_REASON))
        elif swin_block is not None and isinstance(module, swin_block):
            if isinstance(module.__dict__.get("_attn"), _SwinWindowAttn):
                report.skipped.append((name, "already runs pykernels.window_attention"))
                continue
            reason = _swin_skip_reason(module, swin_block, window_attention_class)
            if reason is not None:
                report.skipped.append((name, reason))
                continue
            module._attn = _SwinWindowAttn(module, backend, tally)
            report.windowed.append(name)


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`accelerate` on ``model`` and all its submodules (also those accelerated by separate calls):
    swapped ``MultiheadAttention`` modules get torch's class back; routed forwards (PyG layers' included) and
    Swin overrides are removed; diffusers layers get their own processor objects back; transformers models their
    previous attention implementation.
    Modules built as pykernels modules by the user are left as they are. Returns ``model``."""
    from .integrations import pyg, transformers

    for module in model.modules():
        attributes = module.__dict__
        routed = attributes.get("forward")
        if isinstance(routed, _RoutedForward):
            if routed.previous is None:
                del module.forward
            else:
                module.forward = routed.previous
        if isinstance(attributes.get("_attn"), _SwinWindowAttn):
            del module._attn
        if isinstance(attributes.get("processor"), RoutedAttnProcessor):
            module.set_processor(attributes["processor"].processor)
        transformers.restore_model(module)
        pyg.restore_module(module)
        if attributes.pop("_pykernels_swapped", False):
            module.__class__ = nn.MultiheadAttention
            del module.backend
    return model

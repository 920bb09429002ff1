"""Hugging Face transformers: ``attn_implementation="pykernels"``, served by :func:`pykernels.fused_attention`.

:func:`register` adds ``"pykernels"`` to transformers' ``AttentionInterface`` (and to its ``AttentionMaskInterface``
with transformers' own SDPA mask builder, so the masks are exactly the ones the ``"sdpa"`` implementation gets).
After it, ``AutoModel.from_config(cfg, attn_implementation="pykernels")`` and
``model.set_attn_implementation("pykernels")`` work; :func:`pykernels.accelerate` registers and switches a
``PreTrainedModel`` itself.

:func:`attention_forward` computes what transformers' ``sdpa_attention_forward`` computes (same causal rule, same
masks, GQA, scaling, same ``[B, N, H, D]`` output) and hands every call it cannot serve with the same semantics to
the code transformers would have run: per-head attention weights wanted (``output_attentions``) go to the model's
eager attention, everything else (dropout in training, ``position_bias``, ``softcap``, attention sinks, autocast,
dtypes or devices pykernels has no engine for) to ``sdpa_attention_forward``. Calls are counted per outcome: in
the :class:`pykernels.AccelerateReport` of an accelerated model (path ``"transformers"``), else in :data:`calls`.
"""
from __future__ import annotations

import sys

import torch

from ..accelerate import _active_sdpa_mode, _loaded_class, _record as _record_in, _Tally, _unserved_reason
from ..attention import fused_attention

__all__ = ["NAME", "attention_forward", "calls", "register", "restore_model", "switch_models"]

NAME = "pykernels"

# Counts of calls made outside an accelerated model's forward (a model built with attn_implementation="pykernels").
_tally = _Tally()
calls = _tally.calls

# Keyword arguments that change what attention computes and that the fused kernel does not take; any other keyword
# is one sdpa_attention_forward ignores too (the mask already carries sliding windows and packed sequences).
_UNSERVED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")

_registered = False


def register() -> None:
    """Registers ``"pykernels"`` with transformers' attention and mask interfaces (once). Needs transformers."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("pykernels.integrations.transformers needs transformers: pip install transformers") from exc
    AttentionInterface.register(NAME, attention_forward)
    # Without a mask function transformers builds no mask at all for a custom implementation.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def _record(outcome: str) -> None:
    mode = _active_sdpa_mode()
    _record_in(_tally.key if mode is None else mode.tally_key, "transformers", outcome)


def _wants_weights(module, kwargs) -> bool:
    config = getattr(module, "config", None)
    return bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))


def _eager_forward(module):
    """The eager attention function of the module's own modeling file, which is what ``"eager"`` would run."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return _generic_eager if eager is None else eager


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.dropout(weights.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_mask(attention_mask, causal, query, key):
    """The additive float mask eager attention adds to its scores (``eager_mask``'s form): SDPA's bool masks and
    the causal flag become ``0`` / dtype-min."""
    if causal:
        rows = torch.arange(query.size(2), device=query.device)[:, None]
        attention_mask = (rows >= torch.arange(key.size(2), device=query.device))[None, None]
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return zero.masked_fill(~attention_mask, torch.finfo(query.dtype).min)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers attention function: ``[B, H, Nq, D]`` q and ``[B, Hkv, Nk, D]`` k, v in, ``([B, Nq, H, Dv],
    weights or None)`` out, as ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length = query.size(2)
    # sdpa_attention_forward's causal rule: the flag only without a mask (the mask is causal already) and only for
    # more than one query (a single decoding query sees every cached key).
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if _wants_weights(module, kwargs):
        _record("output_attentions (per-head weights): eager")
        # The mask interface is SDPA's (bool, or None for causal); eager attention adds a float mask to its scores.
        return _eager_forward(module)(module, query, key, value, _eager_mask(attention_mask, causal, query, key),
                                      scaling=scaling, dropout=dropout, **kwargs)
    unserved = next((name for name in _UNSERVED_KWARGS if kwargs.get(name) is not None), None)
    reason = (unserved and f"{unserved} argument") or _unserved_reason(
        query, key, value, attention_mask, dropout, causal, True, "auto")
    if reason is not None:
        mode = _active_sdpa_mode()
        if mode is None or not mode.route_sdpa:
            # Else accelerate's route sees the SDPA call made below and counts it (once) with its own reason.
            _record(reason + ": sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if causal and key.size(2) > q_length:
        # Prefill into an empty static cache: sdpa crops the unwritten slots, which top-left causal never reaches.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    _record("served")
    out = fused_attention(query, key, value, attn_bias=attention_mask, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# PreTrainedModel switching, for pykernels.accelerate -----------------------------------------------------------------

def _pretrained_model_class():
    return _loaded_class("transformers.modeling_utils", "PreTrainedModel")


def _implementations(config):
    """The attention implementations of a config and its sub-configs, in ``set_attn_implementation``'s dict form."""
    found = {"": config._attn_implementation}
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is not None:
            found[name] = _implementations(sub)
    return found


def switch_models(model, backend: str, report) -> None:
    """Switches every outermost transformers ``PreTrainedModel`` in ``model`` to ``"pykernels"`` (its sub-models
    follow, as with ``set_attn_implementation``), recording each in ``report.switched`` or ``report.skipped``."""
    pretrained = _pretrained_model_class()
    if pretrained is None:
        return
    outer: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, pretrained) or any(name.startswith(f"{o}.") or not o for o in outer):
            continue
        outer.append(name)
        if "_pykernels_attn_implementation" in module.__dict__:
            report.skipped.append((name, "transformers attn_implementation already 'pykernels'"))
        elif backend != "auto":
            # The interface function is shared by every model and runs the auto backend.
            report.skipped.append((name, f"transformers attn_implementation: backend={backend!r} is served only "
                                         "through F.scaled_dot_product_attention"))
        else:
            register()
            previous = _implementations(module.config)
            module.set_attn_implementation(NAME)
            if module.config._attn_implementation != NAME:
                report.skipped.append((name, f"{type(module).__qualname__} cannot set its attn_implementation "
                                             "dynamically"))
                continue
            module._pykernels_attn_implementation = previous
            report.switched.append(name)


def restore_model(model) -> None:
    previous = model.__dict__.pop("_pykernels_attn_implementation", None)
    if previous is not None:
        model.set_attn_implementation(previous)

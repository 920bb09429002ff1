"""diffusers: an attention processor on :func:`pykernels.fused_attention`, and head-averaged attention maps."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError as exc:
        raise ImportError("pykernels.integrations.diffusers needs diffusers: pip install diffusers") from exc
    return Attention


class FusedAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :func:`pykernels.fused_attention` in place of SDPA.

    The steps and their order are AttnProcessor2_0's: spatial norm, 4-D input to tokens,
    ``attn.prepare_attention_mask``, group norm, cross norm, q/k norms, output projection and dropout, residual,
    ``rescale_output_factor``. Like it, the scale is ``head_dim ** -0.5`` (``attn.scale`` is not read) and the
    mask is an SDPA one (float additive, or bool with True = attend). One difference: a query whose keys are all
    masked gives 0 where SDPA gives NaN.

    With ``record_maps=True`` every call appends the head-averaged attention probabilities ``[B, Nq, Nk]`` to
    ``self.maps``. They come out of the same fused call (no ``[B, H, Nq, Nk]`` tensor) and are differentiable
    with respect to the queries, keys and mask; call under ``torch.no_grad()`` to keep no graph alive.
    """

    def __init__(self, record_maps: bool = False, *, backend: str = "auto"):
        _attention_class()
        self.record_maps, self.backend = record_maps, backend
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        from ..attention import fused_attention  # on use, as in pykernels.nn.attention

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = fused_attention(query, key, value, attn_bias=attention_mask, return_attn_mean=self.record_maps,
                              backend=self.backend)
        if self.record_maps:
            out, attn_map = out
            self.maps.append(attn_map)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionMapRecorder:
    """What :func:`record_attention_maps` returns: ``maps[name]`` lists one ``[B, Nq, Nk]`` map per call.

    Use as a context manager, or call :meth:`remove`, to put the previous processors back.
    """

    def __init__(self, installed: dict[str, tuple[torch.nn.Module, object, FusedAttnProcessor]]):
        self._installed = installed

    @property
    def maps(self) -> dict[str, list[torch.Tensor]]:
        return {name: proc.maps for name, (_, _, proc) in self._installed.items()}

    def clear(self) -> None:
        for _, _, proc in self._installed.values():
            proc.maps.clear()

    def remove(self) -> None:
        for module, previous, _ in self._installed.values():
            module.set_processor(previous)

    def __enter__(self) -> AttentionMapRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def record_attention_maps(model: torch.nn.Module, layers: Iterable[str] | Callable[[str], bool] | None = None,
                          kinds: Iterable[str] = ("cross", "self"), *, backend: str = "auto") -> AttentionMapRecorder:
    """Installs a recording :class:`FusedAttnProcessor` on ``model``'s (e.g. a UNet's) attention layers.

    ``layers``: None for all, a list of module names (as in ``model.named_modules()``; the ``.processor`` suffix
    of ``model.attn_processors`` keys is accepted), or a predicate on the name. ``kinds`` keeps cross-attention
    layers, self-attention layers or both. Maps are recorded per layer name, one per forward call.
    """
    attention = _attention_class()
    kinds = set(kinds)
    if not kinds <= {"cross", "self"}:
        raise ValueError(f"kinds must be drawn from ('cross', 'self'), got {sorted(kinds)}")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, attention)}
    if layers is None:
        chosen = list(modules)
    elif callable(layers):
        chosen = [name for name in modules if layers(name)]
    else:
        chosen = [name.removesuffix(".processor") for name in layers]
        unknown = [name for name in chosen if name not in modules]
        if unknown:
            raise KeyError(f"not attention layers of this model: {unknown}")
    installed = {}
    for name in chosen:
        module = modules[name]
        if ("cross" if module.is_cross_attention else "self") in kinds:
            installed[name] = (module, module.get_processor(), FusedAttnProcessor(record_maps=True, backend=backend))
            module.set_processor(installed[name][2])
    return AttentionMapRecorder(installed)

"""diffusers: an attention processor on :func:`pykernels.fused_attention`, head-averaged attention maps,
HiDiffusion's MSW-MSA, and Vico's ST-Flow loss on a video UNet. :class:`RoutedAttnProcessor` is what
:func:`pykernels.accelerate` puts on a model's ``AttnProcessor2_0`` layers."""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch

from ..accelerate import RoutedAttnProcessor
from ..flow import st_flow


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

        def attend(query, key, value, attention_mask):
            out = fused_attention(query, key, value, attn_bias=attention_mask, return_attn_mean=self.record_maps,
                                  backend=self.backend)
            if self.record_maps:
                out, attn_map = out
                self.maps.append(attn_map)
            return out

        return _run_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend)


def _run_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend):
    """AttnProcessor2_0's steps around ``attend(q, k, v, mask) -> [B, heads, N, head_dim]``."""
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

    out = attend(query, key, value, attention_mask)
    hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


# HiDiffusion's MSW-MSA ------------------------------------------------------------------------------------------
#
# The transformer blocks whose self-attention HiDiffusion replaces with MSW-MSA, per model
# (hidiffusion/hidiffusion.py, sd15_hidiffusion_key / sdxl_hidiffusion_key / sdxl_turbo_hidiffusion_key,
# 'windown_attn_module_key'). HiDiffusion patches the whole block and partitions the normalised tokens around
# attn1; the projections and everything else in attn1 act per token, so a processor on attn1 that runs
# MSW-MSA on the un-partitioned tokens computes the same thing.
_SDXL_MSW_MSA = tuple(f"{side}_blocks.1.attentions.{a}.transformer_blocks.{t}"
                      for side, attentions in (("down", 2), ("up", 3)) for a in range(attentions) for t in range(2))
MSW_MSA_BLOCKS = {
    "sd15": ("down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.0.attentions.1.transformer_blocks.0",
             "up_blocks.3.attentions.0.transformer_blocks.0", "up_blocks.3.attentions.1.transformer_blocks.0",
             "up_blocks.3.attentions.2.transformer_blocks.0"),
    "sdxl": _SDXL_MSW_MSA,
    "sdxl_turbo": _SDXL_MSW_MSA,
}


class MSWMSAProcessor:
    """A diffusers self-attention processor running HiDiffusion's MSW-MSA (:func:`pykernels.msw_msa`).

    The token grid ``(H, W)`` of a call is ``spatial_shape`` when given (a pair, or a callable of the token
    count), else derived as HiDiffusion does from the UNet input size that :func:`apply_msw_msa` records:
    ``r = round(sqrt(H0 * W0 / N))``, ``(ceil(H0 / r), ceil(W0 / r))``, which is the grid diffusers' stride-2
    convolutions leave at every stage, odd sides included; a square grid otherwise. Each call draws its shift
    from ``generator`` (HiDiffusion draws from the global generator), so a seeded generator reproduces a run.
    """

    def __init__(self, generator: torch.Generator | None = None, spatial_shape=None, *, backend: str = "auto"):
        _attention_class()
        self.generator, self.spatial_shape, self.backend = generator, spatial_shape, backend
        self.input_size: tuple[int, int] | None = None

    def grid(self, tokens: int) -> tuple[int, int]:
        if callable(self.spatial_shape):
            return tuple(self.spatial_shape(tokens))
        if self.spatial_shape is not None:
            return tuple(self.spatial_shape)
        if self.input_size is not None:
            h0, w0 = self.input_size
            # HiDiffusion's expression, rounding included: a stride-2 stage of an odd side has ceil(side / 2)
            # cells, so H0 * W0 / N falls a little short of 4 and flooring would make the ratio 1.
            ratio = round((h0 * w0 / tokens) ** 0.5)
            if ratio < 1:
                raise ValueError(f"pykernels MSWMSAProcessor: {tokens} tokens are more than the UNet input's "
                                 f"{h0} x {w0} grid holds")
            return -(-h0 // ratio), -(-w0 // ratio)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pykernels MSWMSAProcessor: {tokens} tokens are not a square grid; pass spatial_shape "
                             "or install with apply_msw_msa, which records the UNet's input size")
        return side, side

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        from ..window import msw_msa

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("pykernels MSWMSAProcessor: MSW-MSA is unmasked self-attention; this layer got "
                             "encoder_hidden_states or an attention mask")

        def attend(query, key, value, _mask):
            return msw_msa(query, key, value, self.grid(query.size(2)), generator=self.generator,
                           backend=self.backend)

        return _run_attention(attn, hidden_states, None, None, temb, attend)


class _InstalledProcessors:
    """Processors put on attention modules (and forward hooks) by one call; :meth:`remove`, or leaving a
    ``with`` block, puts the previous processors back and detaches the hooks."""

    def __init__(self, restore: list[tuple[torch.nn.Module, object]], hooks: list):
        self._restore, self._hooks = restore, hooks

    def remove(self) -> None:
        for module, previous in self._restore:
            module.set_processor(previous)
        for hook in self._hooks:
            hook.remove()
        self._restore, self._hooks = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class MSWMSAHandle(_InstalledProcessors):
    """What :func:`apply_msw_msa` returns; :meth:`remove` (or leaving a ``with`` block) restores the model.
    ``installed[block]`` is ``(attn1 module, previous processor, MSWMSAProcessor)``."""

    def __init__(self, installed, hook):
        super().__init__([(module, previous) for module, previous, _ in installed.values()], [hook])
        self.installed = installed


def apply_msw_msa(unet: torch.nn.Module, model_type: str = "sd15", generator: torch.Generator | None = None,
                  blocks: Iterable[str] | None = None, *, backend: str = "auto") -> MSWMSAHandle:
    """Puts :class:`MSWMSAProcessor` on the self-attention (``attn1``) of the transformer blocks HiDiffusion
    patches for ``model_type`` (``"sd15"``, ``"sdxl"``, ``"sdxl_turbo"``; or the block names in ``blocks``),
    sharing one ``generator``, and records the UNet's input size for the token grid as HiDiffusion does.
    Only MSW-MSA: HiDiffusion's RAU-Net (resolution-aware down/up-sampling) is not part of this."""
    if blocks is None:
        if model_type not in MSW_MSA_BLOCKS:
            raise ValueError(f"apply_msw_msa: model_type must be one of {sorted(MSW_MSA_BLOCKS)}, got {model_type!r}")
        blocks = MSW_MSA_BLOCKS[model_type]
    modules = dict(unet.named_modules())
    missing = [name for name in blocks if f"{name}.attn1" not in modules]
    if missing:
        raise KeyError(f"apply_msw_msa: no self-attention (attn1) under {missing} in this model")
    installed = {}
    for name in blocks:
        module = modules[f"{name}.attn1"]
        processor = MSWMSAProcessor(generator, backend=backend)
        installed[name] = (module, module.get_processor(), processor)
        module.set_processor(processor)

    def record_size(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        for _, _, processor in installed.values():
            processor.input_size = tuple(sample.shape[-2:])

    return MSWMSAHandle(installed, unet.register_forward_pre_hook(record_size, with_kwargs=True))


class AttentionMapRecorder(_InstalledProcessors):
    """What :func:`record_attention_maps` returns: ``maps[name]`` lists one ``[B, Nq, Nk]`` map per call.

    Use as a context manager, or call :meth:`remove`, to put the previous processors back.
    """

    def __init__(self, installed: dict[str, tuple[torch.nn.Module, object, FusedAttnProcessor]]):
        super().__init__([(module, previous) for module, previous, _ in installed.values()], [])
        self._installed = installed

    @property
    def maps(self) -> dict[str, list[torch.Tensor]]:
        return {name: proc.maps for name, (_, _, proc) in self._installed.items()}

    def clear(self) -> None:
        for _, _, proc in self._installed.values():
            proc.maps.clear()



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


# Attention flow ---------------------------------------------------------------------------------------------------
#
# What follows re-implements, in our own code, the ST-Flow loss of Vico (Yang & Wang, "Compositional Video
# Generation as Flow Equalization", released code github.com/Adamdad/vico at ea3defc). Details taken from it:
# - vico/attribution/attention_attribution.py, AttentionSTAttribution.register_attention_control: spatial maps come
#   from the cross-attention layers, temporal maps from the self-attention layers of the "temp" transformers;
#   ``transformer_in`` is left out.
# - vico/attribution/attention_store.py, AttentionSTStore.__call__ / aggregate_attention_flow_{hard,soft}: one
#   latent resolution (``attn_res``); maps averaged over heads; each spatial block pairs with the two temporal maps
#   recorded after it (``sid * 2 + tid``); flows averaged over blocks.
# - attention_store.py, AttentionSTStore.preprocess_attention_flow_{hard,soft}: ``T̃ = (T + I) / 2``, then
#   ``(T̃2 ⊗ T̃1) ⊗ C`` per spatial location; AttentionSTFlowAttribution sets the soft temperature to 0.01.
# - attention_attribution.py, AttentionSTRollOutAttribution._compute_max_attention_per_index and
#   AttentionAttribution._compute_loss: tokens ``1 .. last_idx - 1`` (start token and end token onward dropped,
#   ``last_idx`` = prompt length in tokenizer ids - 1, default -1), x100, softmax over those tokens, per chosen
#   token reflect-pad by 1 and smooth frames x H x W with GaussianSmoothing(dim=3) (3x3x3, sigma 0.5), peak = max,
#   loss = max over tokens of max(0, 1 - peak).

_FLOW_MODES = ("soft", "hard")
_SPATIAL = re.compile(r"^(?P<block>.+)\.attentions\.(?P<index>\d+)$")


def _vico_smoothing(maps: torch.Tensor) -> torch.Tensor:
    """Vico's 3x3x3 smoothing of ``[N, frames, H, W]`` maps, reflect-padded so the size is kept.

    The 1-D factor is ``exp(-((x - 1) / (2 sigma)) ** 2)`` with sigma 0.5, as in Vico's GaussianSmoothing (taken
    from Attend-and-Excite): the divisor is ``2 sigma``, not ``sqrt(2) sigma``, so the taps are ``[e^-1, 1, e^-1]``
    before normalisation. Written out here so the loss matches theirs rather than a textbook Gaussian.
    """
    offsets = torch.arange(3, dtype=maps.dtype, device=maps.device) - 1
    taps = torch.exp(-((offsets / (2 * 0.5)) ** 2))
    kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    kernel = (kernel / kernel.sum()).view(1, 1, 3, 3, 3)
    padded = torch.nn.functional.pad(maps.unsqueeze(1), (1, 1, 1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv3d(padded, kernel).squeeze(1)


class AttentionFlowTracker(_InstalledProcessors):
    """Vico's ST-Flow of chosen text tokens in a video UNet, and its flow-equalisation loss, differentiably.

    Installs recording :class:`FusedAttnProcessor` s on the spatial cross-attention (``<block>.attentions.<i>``)
    and the temporal self-attention (``<block>.temp_attentions.<i>``) of ``unet``, e.g. diffusers'
    ``UNet3DConditionModel``; the UNet's outputs stay those of diffusers' default processor (to float32
    rounding). Every UNet forward replaces the recorded maps, so :meth:`flows`, :meth:`peaks`, :meth:`loss` and
    :meth:`step` always read the most recent forward. Per spatial block and location ``p`` the flow is
    ``(T̃2[p] ⊗ T̃1[p]) ⊗ C[p]`` (:func:`pykernels.st_flow`), with ``C`` the head-averaged cross-attention
    ``[frames, text]`` and ``T̃ = (T + I) / 2`` of the two head-averaged temporal maps ``[frames, frames]``.

    Args:
        unet: the model to track.
        token_indices: positions of the tokens to equalise in the text sequence (1 = first prompt token), as in
            Vico's ``token_indices``.
        mode: ``"soft"`` (Vico's smooth (max, min) product at ``temperature``) or ``"hard"`` (the exact one;
            ``temperature`` is ignored).
        temperature: the soft product's temperature, > 0; Vico uses 0.01.
        eot_index: position of the prompt's end token (``len(tokenizer(prompt).input_ids) - 1``); the softmax
            runs over tokens ``1 .. eot_index - 1``. None drops only the last token, Vico's default.
        blocks: None for every spatial/temporal pair, or names of pairs (``"up_blocks.1.attentions.0"``) or of
            blocks holding them (``"mid_block"``, ``"up_blocks.1"``).
        attn_res: keep only pairs running at this latent resolution ``(h, w)``, Vico's filter (its script uses
            the image size / 32, 16x16 for 512-pixel videos). None keeps all; they must then share one resolution.
        backend: passed to the attention and flow ops.

    Run the tracked forward on the conditional prompt only (Vico's latent update uses the positive embeddings,
    batch 1); with a batch, :meth:`loss` sums the per-sample losses, so each sample's latents get the gradient
    of its own loss. Test-time latent update::

        with AttentionFlowTracker(unet, token_indices=[2, 5], eot_index=7) as tracker:
            latents = latents.detach().requires_grad_()
            unet(latents, t, encoder_hidden_states=cond).sample
            loss = tracker.loss()
            latents = tracker.step(latents, lr=0.1, loss=loss)

    Use as a context manager, or call :meth:`remove`, to put the previous processors back.
    """

    def __init__(self, unet: torch.nn.Module, token_indices: int | Iterable[int], mode: str = "soft",
                 temperature: float = 0.01, *, eot_index: int | None = None,
                 blocks: Iterable[str] | None = None, attn_res: tuple[int, int] | None = None,
                 backend: str = "auto"):
        attention = _attention_class()
        name = "AttentionFlowTracker"
        if mode not in _FLOW_MODES:
            raise ValueError(f"{name}: mode must be 'soft' or 'hard', got {mode!r}")
        if mode == "soft":
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(f"{name}: temperature must be a number, got {type(temperature).__name__}")
            if not 0 < temperature < math.inf:
                raise ValueError(f"{name}: temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature) if mode == "soft" else None
        self.mode = mode
        indices = [token_indices] if isinstance(token_indices, int) else list(token_indices)
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise TypeError(f"{name}: token_indices must be a non-empty list of ints, got {token_indices!r}")
        if eot_index is not None and (not isinstance(eot_index, int) or eot_index < 2):
            raise ValueError(f"{name}: eot_index must be an int >= 2 (the end token follows at least one prompt "
                             f"token), got {eot_index!r}")
        self.token_indices, self.eot_index = indices, eot_index
        self._check_tokens(eot_index)
        if attn_res is not None:
            attn_res = tuple(attn_res)
            if len(attn_res) != 2 or not all(isinstance(s, int) and s > 0 for s in attn_res):
                raise ValueError(f"{name}: attn_res must be (h, w) with positive ints, got {attn_res!r}")
        self.attn_res, self.backend = attn_res, backend

        modules = dict(unet.named_modules())
        pairs = {}
        for spatial_name, spatial in modules.items():
            match = _SPATIAL.match(spatial_name)
            temporal = modules.get(f"{match['block']}.temp_attentions.{match['index']}") if match else None
            if temporal is None:
                continue
            cross = [m for m in spatial.modules() if isinstance(m, attention) and m.is_cross_attention]
            temporal_layers = [m for m in temporal.modules() if isinstance(m, attention) and not m.is_cross_attention]
            if cross and temporal_layers:
                pairs[spatial_name] = (spatial, cross, temporal_layers)
        if not pairs:
            raise ValueError(f"{name}: {type(unet).__name__} has no spatial cross-attention with a temporal "
                             "transformer beside it ('<block>.attentions.<i>' with '<block>.temp_attentions.<i>', "
                             "as in diffusers' UNet3DConditionModel)")
        if blocks is not None:
            blocks = [blocks] if isinstance(blocks, str) else list(blocks)
            unknown = [b for b in blocks if not any(p == b or p.startswith(b + ".") for p in pairs)]
            if unknown:
                raise ValueError(f"{name}: blocks {unknown} hold no tracked pair; the pairs are {sorted(pairs)}")
            pairs = {p: v for p, v in pairs.items() if any(p == b or p.startswith(b + ".") for b in blocks)}

        self._sizes: dict[str, tuple[int, int]] = {}
        super().__init__([], [])
        self._pairs: dict[str, tuple[list[FusedAttnProcessor], list[FusedAttnProcessor]]] = {}
        for pair, (spatial, cross, temporal_layers) in pairs.items():
            installed = []
            for module in cross + temporal_layers:
                self._restore.append((module, module.get_processor()))
                installed.append(FusedAttnProcessor(record_maps=True, backend=backend))
                module.set_processor(installed[-1])
            self._pairs[pair] = (installed[:len(cross)], installed[len(cross):])
        # The spatial size is read where the 4-D input enters each spatial transformer: the attention layers
        # only see H*W tokens, and the latent size alone does not give it for odd sizes.
        self._hooks += [spatial.register_forward_pre_hook(self._size_hook(pair), with_kwargs=True)
                        for pair, (spatial, _, _) in pairs.items()]
        self._hooks.append(unet.register_forward_pre_hook(lambda module, args: self.clear()))

    def _size_hook(self, pair: str):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self._sizes[pair] = tuple(hidden_states.shape[-2:])
        return hook

    def _check_tokens(self, eot_index: int | None, text_tokens: int | None = None) -> None:
        end = eot_index if eot_index is not None else text_tokens - 1 if text_tokens is not None else None
        bad = [i for i in self.token_indices if i < 1 or (end is not None and i >= end)]
        if bad:
            span = "1 .. eot_index - 1" if end is None else f"1 .. {end - 1}"
            raise ValueError(f"AttentionFlowTracker: token_indices {bad} out of range: the flow loss covers the "
                             f"prompt tokens {span} (0 is the start token, eot_index and later are dropped)")

    @property
    def pairs(self) -> list[str]:
        """Names of the tracked spatial transformers, each paired with its temporal transformer."""
        return list(self._pairs)

    def clear(self) -> None:
        """Drops the recorded maps (and the autograd graph they hold)."""
        self._sizes.clear()
        for cross, temporal in self._pairs.values():
            for proc in cross + temporal:
                proc.maps.clear()

    def flows(self) -> torch.Tensor:
        """The ST-Flow ``[batch, frames, h, w, text tokens]`` of the most recent forward, averaged over pairs."""
        name = "AttentionFlowTracker.flows"
        by_res: dict[tuple[int, int], list[torch.Tensor]] = {}
        for pair, (cross_procs, temporal_procs) in self._pairs.items():
            if pair not in self._sizes:
                continue
            procs = cross_procs + temporal_procs
            if any(len(proc.maps) != 1 for proc in procs):
                raise RuntimeError(f"{name}: the attention layers of {pair} ran {[len(p.maps) for p in procs]} "
                                   "times since the UNet's last forward; each must run once")
            height, width = self._sizes[pair]
            if self.attn_res is not None and (height, width) != self.attn_res:
                continue
            temporal = [proc.maps[0] for proc in temporal_procs]
            frames = temporal[0].size(-1)
            dtype = torch.promote_types(temporal[0].dtype, torch.float32)  # t = 0.01 magnifies half rounding 100x
            for proc in cross_procs:
                cross = proc.maps[0]
                batch = cross.size(0) // frames
                if cross.size(0) != batch * frames or cross.size(1) != height * width:
                    raise RuntimeError(f"{name}: {pair}'s cross-attention map {list(cross.shape)} does not fit "
                                       f"{frames} frames of {height}x{width}")
                # [batch*frames, HW, text] -> one [frames, text] matrix per (sample, location), the batch order
                # of the temporal maps ([batch*HW, frames, frames]).
                per_location = cross.view(batch, frames, height * width, -1).transpose(1, 2)
                flow = st_flow(per_location.reshape(batch * height * width, frames, -1).to(dtype),
                               [t.to(dtype) for t in temporal], self.temperature, backend=self.backend)
                flow = flow.view(batch, height, width, frames, -1).permute(0, 3, 1, 2, 4)
                by_res.setdefault((height, width), []).append(flow)
        if not by_res:
            wanted = "" if self.attn_res is None else f" at attn_res={self.attn_res}"
            raise RuntimeError(f"{name}: no maps recorded{wanted}; run the UNet forward with the tracker installed "
                               f"(tracked pairs: {self.pairs}, resolutions seen: {sorted(set(self._sizes.values()))})")
        if len(by_res) > 1:
            raise ValueError(f"{name}: the tracked pairs ran at resolutions {sorted(by_res)}; pass attn_res=(h, w) "
                             "or blocks=[...] to choose one (Vico uses one resolution)")
        (flows,) = by_res.values()
        return torch.stack(flows).mean(0)

    def peaks(self) -> torch.Tensor:
        """``[batch, len(token_indices)]``: each chosen token's smoothed peak, the quantity the loss raises to 1."""
        flow = self.flows()
        text_tokens = flow.size(-1)
        if self.eot_index is not None and self.eot_index > text_tokens - 1:
            raise ValueError(f"AttentionFlowTracker: eot_index {self.eot_index} is past the text sequence's last "
                             f"token ({text_tokens} tokens)")
        self._check_tokens(self.eot_index, text_tokens)
        end = self.eot_index if self.eot_index is not None else text_tokens - 1
        batch, frames, height, width = flow.shape[:4]
        if min(frames, height, width) < 2:
            raise ValueError(f"AttentionFlowTracker: Vico's reflect-padded smoothing needs at least 2 frames, rows "
                             f"and columns, got {frames} x {height} x {width}")
        probs = torch.softmax(flow[..., 1:end] * 100, dim=-1)
        chosen = probs[..., [i - 1 for i in self.token_indices]].permute(0, 4, 1, 2, 3)
        smoothed = _vico_smoothing(chosen.reshape(-1, frames, height, width))
        return smoothed.amax(dim=(1, 2, 3)).view(batch, len(self.token_indices))

    def loss(self) -> torch.Tensor:
        """Vico's flow-equalisation loss of the most recent forward: per sample, the largest ``max(0, 1 - peak)``
        over the chosen tokens; summed over the batch. Differentiable with respect to the UNet's inputs."""
        return (1 - self.peaks()).clamp_min(0).amax(-1).sum()

    def step(self, latents: torch.Tensor, lr: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        """One gradient-descent step ``latents - lr * d loss / d latents``; returns a new leaf tensor.

        ``latents`` must be the tensor (requiring grad) that the last tracked forward consumed; ``loss`` defaults
        to :meth:`loss`. The recorded maps are then dropped. The result requires grad, ready for the next tracked
        forward. Vico steps with Adam; for that, call ``loss.backward()`` on a leaf and ``optimizer.step()``.
        """
        name = "AttentionFlowTracker.step"
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"{name}: lr must be a positive finite number, got {lr!r}")
        if not isinstance(latents, torch.Tensor) or not latents.requires_grad:
            raise ValueError(f"{name}: latents must be the tensor the tracked forward consumed, with "
                             "requires_grad=True (call latents.requires_grad_() before the forward)")
        if loss is None:
            loss = self.loss()
        if not loss.requires_grad:
            raise RuntimeError(f"{name}: the loss has no autograd graph; run the tracked forward with gradients "
                               "enabled (not under torch.no_grad())")
        (grad,) = torch.autograd.grad(loss, latents, allow_unused=True)
        if grad is None:
            raise ValueError(f"{name}: the loss does not depend on latents; pass the tensor given to the forward")
        self.clear()
        return (latents.detach() - lr * grad).requires_grad_()

    def remove(self) -> None:
        """Puts the previous processors back, detaches the hooks and drops the recorded maps."""
        super().remove()
        self.clear()

"""MultiheadAttention: ``torch.nn.MultiheadAttention`` on :func:`pykernels.fused_attention`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.attention import attention_probs


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention``: same arguments, ``state_dict``, ``forward`` and shapes.

    It subclasses torch's module, so ``isinstance`` checks and checkpoints keep working. The masks are merged as
    torch merges them (bool ``True`` = masked, the opposite of SDPA's; bool masks become ``-inf``; ``bias_k`` and
    ``add_zero_attn`` keys are never masked) into one additive ``attn_bias``; ``is_causal`` is the same hint as in
    torch: ``attn_mask`` is still required, and replaced by a causal mask only without ``key_padding_mask`` and with
    ``need_weights=False``. ``need_weights`` with ``average_attn_weights=True`` (torch's default) costs no extra
    pass: the head-averaged map comes out of the fused call. ``backend`` picks the engine (``pykernels.BACKENDS``).

    Differences from torch:

    * a query whose keys are all masked outputs ``out_proj.bias`` (attention output 0) and a weight row of 0;
      torch returns NaN for both;
    * per-head weights (``average_attn_weights=False``) and attention dropout in training run the plain PyTorch
      reference (``pykernels.reference.attention``), which forms ``[B, H, L, S]``: the fused engines return only
      the head mean and have no dropout; the dropout draws differ from torch's;
    * NestedTensor inputs (torch's inference fast path) are not supported.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.backend = backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # Imported on use so that pykernels.nn imports even where the attention family does not.
        from ..attention import fused_attention

        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # Unbatched inputs were given a leading batch dimension above, whatever batch_first says.
        batch_first = self.batch_first or not is_batched
        q, k, v = self._project(query, key, value)
        q, k, v = (_split_heads(t, self.num_heads, batch_first) for t in (q, k, v))
        bsz, _, tgt_len, _ = q.shape
        src_len = k.size(2)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, self.num_heads, 1, -1).expand(bsz, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, self.num_heads, 1, -1).expand(bsz, -1, -1, -1)], dim=2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, self.num_heads, 1, k.size(-1))], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, self.num_heads, 1, v.size(-1))], dim=2)

        bias, causal = self._merge_masks(key_padding_mask, attn_mask, is_causal, need_weights, query.dtype,
                                         bsz, tgt_len, src_len, k.size(2) - src_len)
        if (self.training and self.dropout > 0) or (need_weights and not average_attn_weights):
            probs = F.dropout(attention_probs(q, k, bias, causal), p=self.dropout, training=self.training)
            out = torch.matmul(probs, v)
            weights = (probs.mean(dim=1) if average_attn_weights else probs) if need_weights else None
        elif need_weights:
            out, weights = fused_attention(q, k, v, attn_bias=bias, causal=causal, return_attn_mean=True,
                                           backend=self.backend)
        else:
            out, weights = fused_attention(q, k, v, attn_bias=bias, causal=causal, backend=self.backend), None

        out = out.transpose(1, 2) if batch_first else out.permute(2, 0, 1, 3)
        # torch applies out_proj's weights with F.linear, bypassing the submodule's forward (and its hooks).
        out = F.linear(out.reshape(*out.shape[:2], self.embed_dim), self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim and query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _merge_masks(self, key_padding_mask, attn_mask, is_causal, need_weights, dtype, bsz, tgt_len, src_len,
                     extra_keys):
        """One additive bias broadcastable to ``[B, H, L, S]``, and the causal flag, as torch's MHA derives them."""
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        causal = is_causal and key_padding_mask is None and not need_weights
        bias = None
        if attn_mask is not None and not causal:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=dtype, check_other=False)
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                bias = attn_mask.view(1, 1, tgt_len, src_len)
            else:
                if attn_mask.shape != (bsz * self.num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * self.num_heads, tgt_len, src_len)}.")
                bias = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{key_padding_mask.shape}")
            padding = key_padding_mask.view(bsz, 1, 1, src_len)
            bias = padding if bias is None else bias + padding
        if bias is not None and extra_keys:
            bias = F.pad(bias, (0, extra_keys))
        return bias, causal


def _split_heads(x: torch.Tensor, heads: int, batch_first: bool) -> torch.Tensor:
    """``[B, L, E]`` (or ``[L, B, E]``) to a ``[B, H, L, E / H]`` view."""
    x = x.unflatten(-1, (heads, -1))
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)

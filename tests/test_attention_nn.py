"""Attention modules against torch and diffusers: load their weights, compare outputs and all gradients."""
import copy
import importlib
import sys

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import nn as pknn
from pykernels.testing import TOLERANCES

pytestmark = pytest.mark.attention

E, H, L, S, B = 16, 4, 5, 7, 3
# Outputs and weights to 1e-5 in float32; gradients to the project's float32 tolerance (2e-5), since torch's own
# float32 gradients here are up to 1.7e-5 away from float64 and an engine's rounding differs from SDPA's.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-5, rtol=1e-5)}
GRAD_TOL = {dtype: dict(atol=atol, rtol=rtol) for dtype, (atol, rtol) in TOLERANCES.items()}

CONFIGS = {
    "default": {},
    "batch_first": dict(batch_first=True),
    "kdim_vdim": dict(kdim=6, vdim=10),
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn_bf": dict(add_zero_attn=True, batch_first=True),
    "bias_kv_zero_attn_kvdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bool_mask(*shape, seed):
    mask = torch.rand(*shape, generator=_gen(seed)) < 0.3
    mask[..., 0] = False  # every query keeps a key: torch gives NaN for a fully masked row, we give 0
    return mask


def _float_mask(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).masked_fill(_bool_mask(*shape, seed=seed),
                                                                                      float("-inf"))


def _masks(kind, batch, tgt, src):
    """(key_padding_mask, attn_mask, is_causal) for a mask case; ``batch`` None for unbatched inputs."""
    kpm_shape = (src,) if batch is None else (batch, src)
    heads3d = H * (batch or 1)
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    return {
        "none": (None, None, False),
        "kpm_bool": (_bool_mask(*kpm_shape, seed=1), None, False),
        "kpm_float": (_float_mask(*kpm_shape, seed=1), None, False),
        "attn2d_bool": (None, _bool_mask(tgt, src, seed=2), False),
        "attn2d_float": (None, _float_mask(tgt, src, seed=2), False),
        "attn3d_bool": (None, _bool_mask(heads3d, tgt, src, seed=3), False),
        "attn3d_float": (None, _float_mask(heads3d, tgt, src, seed=3), False),
        "both_bool": (_bool_mask(*kpm_shape, seed=1), _bool_mask(heads3d, tgt, src, seed=3), False),
        "both_float": (_float_mask(*kpm_shape, seed=1), _float_mask(tgt, src, seed=2), False),
        "causal": (None, causal, True),
        "causal_float_kpm": (_bool_mask(*kpm_shape, seed=1).double() * -1e9,
                             torch.zeros(tgt, src, dtype=torch.float64).masked_fill(causal, float("-inf")), True),
    }[kind]


def _pair(dtype, dropout=0.0, **config):
    """torch's module with random parameters (biases included) and ours loaded from its state_dict (strict)."""
    theirs = nn.MultiheadAttention(E, H, dropout=dropout, dtype=dtype, **config)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.copy_(torch.randn(p.shape, generator=_gen(100 + i), dtype=torch.float64) * 0.5)
    ours = pknn.MultiheadAttention(E, H, dropout=dropout, dtype=dtype, **config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _inputs(config, dtype, batched=True, self_attention=False):
    def rand(tokens, dim, seed):
        shape = (tokens, dim) if not batched else (B, tokens, dim) if config.get("batch_first") else (tokens, B, dim)
        return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).requires_grad_()

    query = rand(L, E, 4)
    if self_attention:
        return query, query, query
    return query, rand(S, config.get("kdim", E), 5), rand(S, config.get("vdim", E), 6)


def _run(module, inputs, masks, dtype, **kwargs):
    """Outputs and the gradients of a random projection of them w.r.t. inputs, float masks and parameters."""
    kpm, attn_mask, is_causal = masks
    kpm, attn_mask = (m.to(dtype).requires_grad_() if m is not None and m.is_floating_point() else m
                      for m in (kpm, attn_mask))
    out, weights = module(*inputs, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    loss = (out * torch.randn(out.shape, generator=_gen(7), dtype=torch.float64).to(dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=_gen(8), dtype=torch.float64).to(dtype)).sum()
    leaves = list(dict.fromkeys(inputs)) + [m for m in (kpm, attn_mask) if m is not None and m.requires_grad]
    leaves += list(module.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, weights, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _compare(ours, theirs, inputs, masks, dtype, **kwargs):
    expected = _run(theirs, inputs, masks, dtype, **kwargs)
    actual = _run(ours, inputs, masks, dtype, **kwargs)
    torch.testing.assert_close(actual[0], expected[0], **TOL[dtype])
    assert (actual[1] is None) == (expected[1] is None)
    if expected[1] is not None:
        torch.testing.assert_close(actual[1], expected[1], **TOL[dtype])
    for i, (a, e) in enumerate(zip(actual[2], expected[2])):
        torch.testing.assert_close(a, e, **GRAD_TOL[dtype], msg=lambda m: f"gradient {i}: {m}")


WEIGHTS = {"no_weights": dict(need_weights=False), "mean": dict(need_weights=True),
           "per_head": dict(need_weights=True, average_attn_weights=False)}
MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float", "both_bool",
         "both_float", "causal", "causal_float_kpm"]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", CONFIGS)
def test_mha_matches_torch_float64(config, mask, weights):
    ours, theirs = _pair(torch.float64, **CONFIGS[config])
    inputs = _inputs(CONFIGS[config], torch.float64)
    _compare(ours, theirs, inputs, _masks(mask, B, L, S), torch.float64, **WEIGHTS[weights])


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn3d_float", "causal", "causal_float_kpm"])
@pytest.mark.parametrize("config", ["default", "batch_first", "bias_kv", "zero_attn_bf"])
def test_mha_self_attention(config, mask, weights):
    ours, theirs = _pair(torch.float64, **CONFIGS[config])
    inputs = _inputs(CONFIGS[config], torch.float64, self_attention=True)
    _compare(ours, theirs, inputs, _masks(mask, B, L, L), torch.float64, **WEIGHTS[weights])


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mask", ["none", "kpm_float", "attn3d_bool", "both_bool"])
@pytest.mark.parametrize("config", ["default", "batch_first", "bias_kv_zero_attn_kvdim"])
def test_mha_unbatched(config, mask, weights):
    ours, theirs = _pair(torch.float64, **CONFIGS[config])
    inputs = _inputs(CONFIGS[config], torch.float64, batched=False)
    _compare(ours, theirs, inputs, _masks(mask, None, L, S), torch.float64, **WEIGHTS[weights])


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_mha_matches_torch_float32(config, weights):
    ours, theirs = _pair(torch.float32, **CONFIGS[config])
    inputs = _inputs(CONFIGS[config], torch.float32)
    _compare(ours, theirs, inputs, _masks("both_float", B, L, S), torch.float32, **WEIGHTS[weights])


def test_mha_eval_dropout_is_identity():
    ours, theirs = _pair(torch.float64, dropout=0.5, batch_first=True)
    ours.eval(), theirs.eval()
    inputs = _inputs(dict(batch_first=True), torch.float64)
    _compare(ours, theirs, inputs, _masks("kpm_bool", B, L, S), torch.float64)


def test_mha_training_dropout_drops_weights():
    ours, _ = _pair(torch.float64, dropout=0.5)
    inputs = _inputs({}, torch.float64)
    _, clean = ours.eval()(*inputs, average_attn_weights=False)
    _, dropped = ours.train()(*inputs, average_attn_weights=False)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], clean[kept] * 2)


def test_mha_fully_masked_row_gives_zero_attention():
    ours, _ = _pair(torch.float64)
    query, key, value = _inputs({}, torch.float64)
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[2] = True
    out, weights = ours(query, key, value, attn_mask=attn_mask)
    torch.testing.assert_close(out[2], ours.out_proj.bias.expand(B, E).detach())
    assert torch.all(weights[:, 2] == 0) and torch.isfinite(out).all()


def test_mha_is_causal_needs_attn_mask():
    ours, _ = _pair(torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(*_inputs({}, torch.float64), is_causal=True)


@pytest.mark.parametrize("case", [
    ("batch_first", "both_bool", dict(need_weights=True), False),
    ("bias_kv", "causal", dict(need_weights=False), True),
])
def test_mha_compiles(case):
    config, mask, kwargs, self_attention = case
    ours, _ = _pair(torch.float64, **CONFIGS[config])
    inputs = _inputs(CONFIGS[config], torch.float64, self_attention=self_attention)
    masks = _masks(mask, B, L, L if self_attention else S)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    expected, actual = _run(ours, inputs, masks, torch.float64, **kwargs), _run(compiled, inputs, masks,
                                                                                  torch.float64, **kwargs)
    for a, e in zip([actual[0], actual[1]] + actual[2], [expected[0], expected[1]] + expected[2]):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


class _OwnMHA(nn.MultiheadAttention):
    pass


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                          dropout=0.0, batch_first=True, dtype=torch.float64)
        self.pool = nn.MultiheadAttention(E, H, kdim=6, vdim=10, dtype=torch.float64)
        self.own = _OwnMHA(E, H, dtype=torch.float64)
        self.shared = self.pool

    def forward(self, src, tgt, memory):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=torch.float64)
        x = self.transformer(src, tgt, tgt_mask=causal, tgt_is_causal=True,
                             src_key_padding_mask=_bool_mask(B, src.size(1), seed=1))
        x = self.pool(x.transpose(0, 1), memory[..., :6], memory)[0]
        return self.own(x, x, x, need_weights=False)[0]


def test_accelerate_swaps_in_place():
    model = _Model()
    model.own.eval()
    untouched = copy.deepcopy(model)
    inputs = [torch.randn(*shape, generator=_gen(i), dtype=torch.float64)
              for i, shape in enumerate([(B, S, E), (B, L, E), (S, B, 10)])]
    params, modes = list(model.parameters()), [m.training for m in model.modules()]
    report = pk.accelerate(model)
    assert report.swapped == ["transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.0.self_attn",
                              "transformer.decoder.layers.0.multihead_attn", "pool"]
    assert [name for name, _ in report.skipped] == ["own"]
    assert "pool" in str(report) and "own" in str(report)
    assert all(type(m) is pknn.MultiheadAttention for m in (model.pool, model.shared))
    assert list(model.parameters()) == params and [m.training for m in model.modules()] == modes
    torch.testing.assert_close(model(*inputs), untouched(*inputs), **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*inputs), untouched.eval()(*inputs), **TOL[torch.float64])
    assert pk.accelerate(model).swapped == []


# diffusers ----------------------------------------------------------------------------------------------------

def _diffusers():
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from pykernels.integrations import diffusers as integration
    return Attention, AttnProcessor2_0, integration


def _tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _unet_inputs():
    sample = torch.randn(2, 4, 16, 16, generator=_gen(0))
    context = torch.randn(2, 7, 32, generator=_gen(1))
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    return sample, torch.tensor([10, 500]), context, mask


def test_diffusers_unet_matches_attn_processor_2_0():
    _, AttnProcessor2_0, integration = _diffusers()
    unet = _tiny_unet()
    sample, t, context, mask = _unet_inputs()
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(sample, t, context, encoder_attention_mask=mask).sample
        unet.set_attn_processor(integration.FusedAttnProcessor())
        actual = unet(sample, t, context, encoder_attention_mask=mask).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    dict(norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0, bias=True),
    dict(spatial_norm_dim=6, residual_connection=True),
    dict(cross_attention_dim=12, cross_attention_norm="layer_norm", qk_norm="layer_norm"),
    dict(cross_attention_dim=12, cross_attention_norm="group_norm", cross_attention_norm_num_groups=4),
])
def test_diffusers_attention_options(config):
    Attention, AttnProcessor2_0, integration = _diffusers()
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, **config)
    x = torch.randn(2, 32, 4, 3, generator=_gen(0))
    kwargs = {}
    if "cross_attention_dim" in config:
        x = x.flatten(2).transpose(1, 2)
        kwargs = dict(encoder_hidden_states=torch.randn(2, 5, 12, generator=_gen(1)),
                      attention_mask=torch.tensor([[0.0] * 5, [0.0] * 3 + [-1e4] * 2]).unsqueeze(1))
    if "spatial_norm_dim" in config:
        kwargs = dict(temb=torch.randn(2, 6, 2, 2, generator=_gen(2)))
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, x, **kwargs)
        actual = integration.FusedAttnProcessor()(attn, x, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_diffusers_record_attention_maps():
    _, AttnProcessor2_0, integration = _diffusers()
    unet = _tiny_unet()
    sample, t, context, mask = _unet_inputs()
    with torch.no_grad():
        expected = unet(sample, t, context).sample
    sample.requires_grad_()
    with integration.record_attention_maps(unet) as recorder:
        out = unet(sample, t, context).sample
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        names = sorted(recorder.maps)
        assert len(names) == 8 and all(len(recorder.maps[n]) == 1 for n in names)
        for name, (attn_map,) in recorder.maps.items():
            tokens = 256 if name.startswith(("down_blocks.0", "up_blocks.1")) else 64
            assert attn_map.shape == (2, tokens, 7 if name.endswith("attn2") else tokens)
            torch.testing.assert_close(attn_map.sum(-1), torch.ones(2, tokens), atol=1e-5, rtol=1e-5)
        first = recorder.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0]
        (grad,) = torch.autograd.grad((first * torch.randn(first.shape, generator=_gen(3))).sum(), sample)
        assert grad.abs().sum() > 0
        recorder.clear()
        assert all(maps == [] for maps in recorder.maps.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())

    cross = integration.record_attention_maps(unet, kinds=("cross",))
    assert sorted(cross.maps) == [n for n in names if n.endswith("attn2")]
    cross.remove()
    picked = integration.record_attention_maps(unet, layers=["mid_block.attentions.0.transformer_blocks.0.attn1"
                                                             ".processor"])
    assert list(picked.maps) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    picked.remove()
    assert len(integration.record_attention_maps(unet, layers=lambda n: n.startswith("up_blocks")).maps) == 4
    with pytest.raises(KeyError):
        integration.record_attention_maps(unet, layers=["conv_in"])


def test_diffusers_integration_imports_without_diffusers(monkeypatch):
    for name in [n for n in sys.modules if n == "diffusers" or n.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "pykernels.integrations.diffusers", raising=False)
    integration = importlib.import_module("pykernels.integrations.diffusers")
    with pytest.raises(ImportError, match="pip install diffusers"):
        integration.FusedAttnProcessor()
    with pytest.raises(ImportError, match="pip install diffusers"):
        integration.record_attention_maps(nn.Linear(1, 1))

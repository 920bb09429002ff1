"""Swin modules against a replica of timm's code path (roll, pad, partition, mask, attention, reverse), and
HiDiffusion's MSW-MSA as a module and as a diffusers processor against HiDiffusion's partition sequence."""
import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.reference import window as ref

pytestmark = pytest.mark.window

TIMM_BLOCK_KEYS = {
    "norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
}


def _partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def _reverse(windows, window, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _timm_mask(hp, wp, window, shift):
    """timm's SwinTransformerBlock.get_attn_mask: region ids on the padded grid, -100 across regions."""
    img = torch.zeros(1, hp, wp, 1)
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            img[:, hs[0]:hs[1], ws[0]:ws[1], :] = count
            count += 1
    ids = _partition(img, window).squeeze(-1)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


def _timm_block(block: pk.nn.SwinBlock, x):
    """What timm's SwinTransformerBlock.forward computes, step by step, with this block's parameters."""
    b, h, w, c = x.shape
    attn = block.attn
    window, shift = block.window_size, block.shift_size
    shortcut = x
    x = block.norm1(x)
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    windows = _partition(x, window)
    bn, n, _ = windows.shape
    qkv = attn.qkv(windows).reshape(bn, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    scores = scores + bias.unsqueeze(0)
    if any(shift):
        mask = _timm_mask(hp, wp, window, shift)
        scores = scores.view(-1, mask.size(0), attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, attn.num_heads, n, n)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, -1)
    out = attn.proj(out)
    x = _reverse(out, window, hp, wp)[:, :h, :w, :]
    if any(shift):
        x = torch.roll(x, shift, dims=(1, 2))
    x = shortcut + x
    x = x.reshape(b, -1, c)
    x = x + block.mlp(block.norm2(x))
    return x.reshape(b, h, w, c)


@pytest.mark.parametrize("size,window,shift", [((14, 14), 7, 3), ((10, 13), 7, 3), ((8, 8), 4, 0), ((5, 6), 7, 3),
                                               ((9, 9), (3, 4), (1, 2))])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_swin_block_matches_timms_code_path(size, window, shift, qkv_bias):
    torch.manual_seed(0)
    block = pk.nn.SwinBlock(24, input_resolution=size, num_heads=3, window_size=window, shift_size=shift,
                            qkv_bias=qkv_bias).double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        if qkv_bias:
            block.attn.qkv.bias.normal_()  # pad tokens then carry a visible key and value
    x = torch.randn(2, *size, 24, dtype=torch.double, requires_grad=True)
    got = block(x)
    expected = _timm_block(block, x)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    # Every parameter, the qkv bias included: where the map needs padding, its pad tokens' share of the
    # gradient must arrive as in timm.
    names, params = zip(*block.named_parameters())
    grads = torch.autograd.grad(got, [x, *params], g)
    expected_grads = torch.autograd.grad(expected, [x, *params], g)
    for name, a, e in zip(["x", *names], grads, expected_grads):
        torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize("size,window,shift", [((14, 14), 7, 3), ((10, 13), 7, 3), ((8, 8), 4, 0), ((5, 6), 7, 3)])
def test_swin_block_matches_timm(size, window, shift):
    """timm itself: its SwinTransformerBlock's weights loaded into ours, same input, values and gradients."""
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    theirs = swin.SwinTransformerBlock(24, size, num_heads=3, window_size=window, shift_size=shift).double()
    with torch.no_grad():
        theirs.attn.relative_position_bias_table.normal_()
        theirs.attn.qkv.bias.normal_()
    ours = pk.nn.SwinBlock(24, input_resolution=size, num_heads=3, window_size=window, shift_size=shift).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, *size, 24, dtype=torch.double, requires_grad=True)
    got, expected = ours(x), theirs(x)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    ours_grads = torch.autograd.grad(got, [x, *ours.parameters()], g)
    theirs_grads = dict(zip(["x", *dict(theirs.named_parameters())],
                            torch.autograd.grad(expected, [x, *theirs.parameters()], g)))
    for name, a in zip(["x", *dict(ours.named_parameters())], ours_grads):
        torch.testing.assert_close(a, theirs_grads[name], msg=name)


def test_swin_block_state_dict_has_timms_keys_and_clamped_table():
    block = pk.nn.SwinBlock(32, input_resolution=(56, 56), num_heads=4, window_size=7, shift_size=3)
    assert set(block.state_dict()) == TIMM_BLOCK_KEYS
    assert block.attn.relative_position_bias_table.shape == (13 * 13, 4)
    small = pk.nn.SwinBlock(32, input_resolution=(5, 5), num_heads=4, window_size=7, shift_size=3)
    assert small.window_size == (5, 5) and small.shift_size == (0, 0)
    assert small.attn.relative_position_bias_table.shape == (9 * 9, 4)
    copy = pk.nn.SwinBlock(32, input_resolution=(56, 56), num_heads=4, window_size=7, shift_size=3)
    copy.load_state_dict(block.state_dict(), strict=True)


def test_window_attention_module_rejects_what_it_cannot_fuse():
    attn = pk.nn.WindowAttention(16, 2, window_size=4, attn_drop=0.1)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        attn(torch.randn(1, 8, 8, 16))
    attn.eval()
    assert attn(torch.randn(1, 8, 8, 16)).shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, 16\]"):
        attn(torch.randn(1, 64, 16))


def test_swin_block_compiles_fullgraph():
    block = pk.nn.SwinBlock(16, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x).sum(), x), torch.autograd.grad(block(x).sum(), x))


# ------------------------------------------------------------------------------------------------ MSW-MSA


def _heads(module, x):
    b, h, w, _ = x.shape
    return module.qkv(x).reshape(b, h * w, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("size", [(8, 8), (12, 16)])
def test_mswmsa_module_matches_hidiffusions_sequence(size):
    torch.manual_seed(1)
    module = pk.nn.MSWMSA(32, 4).double()
    x = torch.randn(2, *size, 32, dtype=torch.double)
    window = ref.msw_msa_window(size)
    for i in range(4):
        shift = (window[0] // 4 * i, window[1] // 4 * i)
        q, k, v = _heads(module, x)
        expected = ref.msw_msa(q, k, v, size, shift)
        expected = module.proj(expected.transpose(1, 2).reshape(2, *size, -1))
        torch.testing.assert_close(module(x, shift=shift), expected)


def test_mswmsa_shifts_are_reproducible_with_a_generator():
    x = torch.randn(1, 8, 8, 16)
    module = pk.nn.MSWMSA(16, 2, generator=torch.Generator().manual_seed(5))
    first = [module(x) for _ in range(6)]
    module.generator = torch.Generator().manual_seed(5)
    again = [module(x) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({round(t.sum().item(), 4) for t in first}) > 1, "six draws should not all pick the same shift"


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def test_mswmsa_processor_is_hidiffusions_window_attention_in_a_unet():
    from pykernels.integrations.diffusers import MSWMSAProcessor, apply_msw_msa

    unet = _tiny_unet()
    blocks = ["down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.0.transformer_blocks.0"]
    sample, text = torch.randn(1, 4, 16, 12), torch.randn(1, 5, 32)
    with torch.no_grad():
        baseline = unet(sample, 1, encoder_hidden_states=text).sample
        with apply_msw_msa(unet, blocks=blocks, generator=torch.Generator().manual_seed(0)) as handle:
            assert all(isinstance(m.processor, MSWMSAProcessor) for m, _, _ in handle.installed.values())
            windowed = unet(sample, 1, encoder_hidden_states=text).sample
            # The grid comes from the UNet's input size, as in HiDiffusion: 16 x 12 latent tokens.
            assert handle.installed[blocks[0]][2].grid(16 * 12) == (16, 12)
        restored = unet(sample, 1, encoder_hidden_states=text).sample
    assert not torch.allclose(windowed, baseline)
    torch.testing.assert_close(restored, baseline)

    # One attn1 call, against HiDiffusion's partition -> attention -> reverse on the same tokens.
    attn = dict(unet.named_modules())[f"{blocks[0]}.attn1"]
    tokens = torch.randn(2, 16 * 12, attn.to_q.in_features)
    processor = MSWMSAProcessor(spatial_shape=(16, 12), generator=torch.Generator().manual_seed(3))
    shift = pk.window.msw_msa_shift((16, 12), torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = processor(attn, tokens)
        q, k, v = (f(tokens).view(2, -1, attn.heads, attn.to_q.out_features // attn.heads).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        out = ref.msw_msa(q, k, v, (16, 12), shift)
        expected = attn.to_out[0](out.transpose(1, 2).reshape(2, 16 * 12, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_apply_msw_msa_bad_input():
    from pykernels.integrations.diffusers import MSWMSAProcessor, apply_msw_msa

    unet = _tiny_unet()
    with pytest.raises(ValueError, match="model_type must be one of"):
        apply_msw_msa(unet, model_type="sd3")
    with pytest.raises(KeyError, match="no self-attention"):
        apply_msw_msa(unet, blocks=["down_blocks.9.attentions.0.transformer_blocks.0"])
    with pytest.raises(ValueError, match="not a square grid"):
        MSWMSAProcessor().grid(15)

"""MSW-MSA against the real HiDiffusion package (``hidiffusion`` on PyPI, 0.1.10): its patched diffusers
``BasicTransformerBlock`` and its ``apply_hidiffusion`` on a whole UNet, against :class:`MSWMSAProcessor` /
:func:`apply_msw_msa` with the same weights and the same random shift.

HiDiffusion (hidiffusion/hidiffusion.py, ``make_diffusers_transformer_block``) draws ``torch.rand(1)`` from the
global CPU generator once per patched block call, derives the token grid from the UNet input size recorded by a
forward pre-hook (``r = round(sqrt(H0 * W0 / N))``, ``(ceil(H0 / r), ceil(W0 / r))``), and partitions the grid
into 2 x 2 windows. The grids here are those of the image sizes people generate (512 to 2048 px, odd latent
sides, non-square) at the stages HiDiffusion patches: SD1.5's down_blocks.0 / up_blocks.3 at the latent size,
SDXL's down_blocks.1 / up_blocks.1 at half of it. Channels are kept tiny: the grid, not the width, is what is
under test. Everything runs in float64 so that the two agree to rounding.
"""
import copy
import importlib.util
import math
import warnings

import pytest
import torch

from pykernels.integrations.diffusers import MSW_MSA_BLOCKS, MSWMSAProcessor, apply_msw_msa
from pykernels.testing import import_hidiffusion

pytestmark = [
    pytest.mark.window,
    pytest.mark.skipif(importlib.util.find_spec("hidiffusion") is None, reason="needs hidiffusion (pip install "
                       "hidiffusion --no-deps)"),
]


@pytest.fixture(scope="module")
def hd():
    return import_hidiffusion()


@pytest.fixture(autouse=True)
def _quiet_odd_grid_warning():
    # HiDiffusion warns on every call with an odd grid that it resamples bicubically; both sides do so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HiDiffusion Warning")
        yield


def _seed_drawing(quarter: int) -> int:
    """A seed whose first ``torch.rand(1)`` falls in HiDiffusion's ``quarter`` (shift = quarter/4 of the window)."""
    for seed in range(1000):
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        if (quarter == 0 and u <= 0.25) or quarter / 4 < u <= (quarter + 1) / 4:
            return seed
    raise AssertionError(quarter)


def _down(n: int) -> int:
    """A side after diffusers' Downsample2D (conv, kernel 3, stride 2, padding 1)."""
    return (n - 1) // 2 + 1


def _stage(px, model):
    latent = (px[0] // 8, px[1] // 8)
    return latent, latent if model == "sd15" else (_down(latent[0]), _down(latent[1]))


# (height, width) in px, and which shift quarters to draw. Large grids cost seconds each, so they draw one shift;
# together the cases draw all four, on odd and even grids of both models.
BLOCK_CASES = [
    ("sd15", (512, 512), (0, 1, 2, 3)),
    ("sd15", (520, 776), (0, 1, 2, 3)),   # latent 65 x 97: odd sides, resampled
    ("sd15", (768, 512), (2,)),
    ("sd15", (1000, 1480), (3,)),         # latent 125 x 185
    ("sd15", (512, 2048), (1,)),          # 2048 px wide, 1:4
    ("sd15", (48, 1024), (1, 3)),         # latent 6 x 128: the vertical shift rounds to 0, and then HiDiffusion
                                          # does not roll at all, though the horizontal shift is not 0
    ("sdxl", (1024, 1024), (0, 1, 2, 3)),
    ("sdxl", (520, 776), (0, 1, 2, 3)),   # latent 65 x 97 -> 33 x 49
    ("sdxl", (1000, 1480), (1, 2)),       # latent 125 x 185 -> 63 x 93
    ("sdxl", (1080, 1920), (3,)),         # latent 135 x 240 -> 68 x 120: odd latent, even stage
    ("sdxl", (1040, 1040), (2,)),         # latent 130 -> 65: even latent, odd stage
    ("sdxl", (1536, 640), (1,)),
    ("sdxl", (2048, 2048), (3,)),         # latent 256 -> 128
]


@pytest.mark.parametrize("model", sorted(MSW_MSA_BLOCKS))
def test_block_lists_are_hidiffusions(hd, model):
    keys = {"sd15": hd.sd15_hidiffusion_key, "sdxl": hd.sdxl_hidiffusion_key,
            "sdxl_turbo": hd.sdxl_turbo_hidiffusion_key}[model]()
    assert list(MSW_MSA_BLOCKS[model]) == keys["windown_attn_module_key"]


def _block_pair(hd, dim=8, heads=2):
    torch.manual_seed(0)
    ours = _basic_block(dim, heads)
    theirs = copy.deepcopy(ours)
    theirs.__class__ = hd.make_diffusers_transformer_block(theirs.__class__)
    return ours, theirs


def _basic_block(dim, heads):
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock(dim, heads, dim // heads, cross_attention_dim=8).double().eval()


@pytest.mark.parametrize("model,px,quarters", BLOCK_CASES, ids=[f"{m}-{h}x{w}" for m, (h, w), _ in BLOCK_CASES])
def test_processor_matches_hidiffusions_patched_block(hd, model, px, quarters):
    latent, (h, w) = _stage(px, model)
    ours, theirs = _block_pair(hd)
    processor = MSWMSAProcessor()
    ours.attn1.set_processor(processor)
    theirs.info, processor.input_size = {"size": latent}, latent
    tokens = torch.randn(1, h * w, 8, dtype=torch.float64)
    text = torch.randn(1, 3, 8, dtype=torch.float64)
    for quarter in quarters:
        outs, after = [], []
        for block in (theirs, ours):
            torch.manual_seed(_seed_drawing(quarter))
            with torch.no_grad():
                outs.append(block(tokens, encoder_hidden_states=text))
            after.append(torch.rand(1))  # both consumed the same number of draws
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-11, atol=1e-11)
        assert after[0] == after[1]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_processor_with_a_seeded_generator_matches_hidiffusions_global_draw(hd, backend):
    latent, (h, w) = _stage((1000, 1480), "sdxl")
    ours, theirs = _block_pair(hd)
    seed = _seed_drawing(3)
    processor = MSWMSAProcessor(generator=torch.Generator().manual_seed(seed), backend=backend)
    ours.attn1.set_processor(processor)
    theirs.info, processor.input_size = {"size": latent}, latent
    tokens = torch.randn(1, h * w, 8, dtype=torch.float64)
    text = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = theirs(tokens, encoder_hidden_states=text)
        got = ours(tokens, encoder_hidden_states=text)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)


@pytest.fixture(scope="module")
def tiny_unets():
    """Built once per model: test_apply_msw_msa_matches_apply_hidiffusion_on_a_unet works on copies."""
    return {model: _tiny_unet(model) for model in ("sd15", "sdxl")}


def _tiny_unet(model):
    """Random UNets with SD1.5's and SDXL's block layout (module names), so that HiDiffusion's own layout check
    (its sd15/sdxl module key lists) recognises them and patches its blocks; widths are tiny."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 64, 64), cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, norm_num_groups=8)
    else:
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 64), cross_attention_dim=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4, norm_num_groups=8)
    return unet.double().eval()


# Latent sizes, small because every other attention of the UNet is global and everything runs in float64; the
# block test above covers the large grids. Odd sides at the patched stage, and (sdxl, 18 x 26) an even latent
# whose half is odd.
UNET_CASES = [("sd15", (16, 24)), ("sd15", (13, 21)), ("sdxl", (13, 21)), ("sdxl", (18, 26))]


@pytest.mark.parametrize("model,latent", UNET_CASES, ids=[f"{m}-{h}x{w}" for m, (h, w) in UNET_CASES])
def test_apply_msw_msa_matches_apply_hidiffusion_on_a_unet(hd, tiny_unets, model, latent):
    ours, theirs = copy.deepcopy(tiny_unets[model]), copy.deepcopy(tiny_unets[model])
    # apply_hidiffusion reads name_or_path (a pipeline's); a name that is not an official model makes it pick
    # the strategy from the module names, as it does for fine-tuned checkpoints.
    theirs.name_or_path = f"tiny-{model}"
    hd.apply_hidiffusion(theirs, apply_raunet=False, apply_window_attn=True)
    patched = [name for name, m in theirs.named_modules() if type(m).__name__ == "transformer_block"]
    assert patched == list(MSW_MSA_BLOCKS[model])

    sample = torch.randn(2, 4, *latent, dtype=torch.float64)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 16, dtype=torch.float64)}
    if model == "sdxl":
        size = [8 * latent[0], 8 * latent[1]]  # SDXL's micro-conditioning: original size, crop, target size
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, dtype=torch.float64),
                                       "time_ids": torch.tensor([size + [0, 0] + size] * 2, dtype=torch.float64)}
    with torch.no_grad():
        baseline = ours(sample, 10, **kwargs).sample
        with apply_msw_msa(ours, model_type=model):
            torch.manual_seed(1)
            got = ours(sample, 10, **kwargs).sample
            after_ours = torch.rand(1)
        torch.manual_seed(1)
        expected = theirs(sample, 10, **kwargs).sample
        after_theirs = torch.rand(1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert after_ours == after_theirs
    assert (got - baseline).abs().max() > 1e-3  # MSW-MSA is on: the comparison is not of two plain UNets

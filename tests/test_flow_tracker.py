"""AttentionFlowTracker on a tiny random diffusers UNet3DConditionModel: outputs, flows, Vico's loss, latent steps."""
import copy
import math

import pytest
import torch

pytestmark = pytest.mark.flow

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from pykernels.integrations import diffusers as integration  # noqa: E402
from pykernels.integrations.diffusers import AttentionFlowTracker  # noqa: E402
from pykernels.reference.flow import st_flow  # noqa: E402

BATCH, FRAMES, SIZE, TEXT, CROSS_DIM = 2, 6, 8, 7, 16
FULL_RES = ["down_blocks.0", "up_blocks.1"]  # the pairs at 8x8; the mid block runs at 4x4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=CROSS_DIM, attention_head_dim=4,
        norm_num_groups=8, sample_size=SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    ).eval()
    model.requires_grad_(False)
    return model


def _inputs(batch=BATCH):
    latents = torch.randn(batch, 4, FRAMES, SIZE, SIZE, generator=_gen(0))
    return latents, torch.tensor(10), torch.randn(batch, TEXT, CROSS_DIM, generator=_gen(1))


def test_unet_output_unchanged_and_processors_restored(unet):
    latents, t, context = _inputs()
    with torch.no_grad():
        expected = unet(latents, t, context).sample
        before = unet.attn_processors
        with AttentionFlowTracker(unet, [2, 4]) as tracker:
            assert tracker.pairs == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0",
                                     "up_blocks.1.attentions.1", "mid_block.attentions.0"]
            tracked = unet.attn_processors
            assert sum(isinstance(p, integration.FusedAttnProcessor) for p in tracked.values()) == 12
            fused = {n for n, p in tracked.items() if isinstance(p, integration.FusedAttnProcessor)}
            assert fused == {n for n in before if ".temp_attentions." in n or n.endswith("attn2.processor")
                             and ".attentions." in n}
            assert len(fused) == 12 and all(tracked[n] is before[n] for n in before.keys() - fused)
            actual = unet(latents, t, context).sample
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        assert all(unet.attn_processors[n] is p for n, p in before.items())
        torch.testing.assert_close(unet(latents, t, context).sample, expected, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="no maps recorded"):
        tracker.flows()


def test_hard_flows_layout(unet):
    """Hard flow bounds that hold only with the right layout: per (sample, location, token),
    min(C[f], 1/2) <= flow[f] <= max_f' C[f'], since the diagonal of T̃2 ⊗ T̃1 is at least 1/2."""
    latents, t, context = _inputs()
    with torch.no_grad(), AttentionFlowTracker(unet, [2], mode="hard", blocks=["down_blocks.0"]) as tracker:
        unet(latents, t, context)
        flow = tracker.flows()
    with torch.no_grad(), integration.record_attention_maps(
            unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]) as recorder:
        unet(latents, t, context)
        (cross,) = recorder.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert flow.shape == (BATCH, FRAMES, SIZE, SIZE, TEXT)
    cross = cross.view(BATCH, FRAMES, SIZE, SIZE, TEXT)
    assert (flow >= cross.clamp_max(0.5) - 1e-6).all()
    assert (flow <= cross.amax(1, keepdim=True) + 1e-6).all()
    assert (flow > cross + 1e-3).any()  # the temporal maps do move mass between frames


def test_flows_average_pairs_and_soft_tends_to_hard(unet):
    latents, t, context = _inputs(batch=1)

    def flows(**kwargs):
        with torch.no_grad(), AttentionFlowTracker(unet, [2], **kwargs) as tracker:
            unet(latents, t, context)
            return tracker.flows()

    hard = flows(mode="hard", blocks=FULL_RES)
    singles = [flows(mode="hard", blocks=[pair]) for pair in
               ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]]
    torch.testing.assert_close(hard, torch.stack(singles).mean(0))
    torch.testing.assert_close(flows(mode="hard", attn_res=(SIZE, SIZE)), hard)
    assert flows(mode="hard", attn_res=(4, 4)).shape == (1, FRAMES, 4, 4, TEXT)
    # Each soft (max, min) stage is within t (log 2 + log k) of the hard one.
    torch.testing.assert_close(flows(mode="soft", temperature=1e-4, blocks=FULL_RES), hard, atol=2e-3, rtol=0)
    assert (flows(mode="soft", temperature=0.05, blocks=FULL_RES) - hard).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_loss_matches_per_location_oracle(unet, mode):
    """float64, one location at a time: C[p] = cross[:, p, :], T[p] = temporal[p], flows averaged over the pairs,
    tokens 1 .. eot_index - 1, x100, softmax, smoothing, peak, max over tokens of max(0, 1 - peak)."""
    model = copy.deepcopy(unet).double()
    latents, t, context = (x.double() if x.is_floating_point() else x for x in _inputs(batch=1))
    temperature, eot_index, tokens = (0.01 if mode == "soft" else None), 5, [1, 3]
    pairs = ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    layers = {pair: [f"{pair}.transformer_blocks.0.attn2"] + [
        f"{pair.replace('attentions', 'temp_attentions')}.transformer_blocks.0.attn{i}" for i in (1, 2)]
        for pair in pairs}
    with torch.no_grad(), integration.record_attention_maps(model, sum(layers.values(), [])) as recorder:
        model(latents, t, context)
        maps = {name: found[0] for name, found in recorder.maps.items()}
    flow = torch.zeros(FRAMES, SIZE * SIZE, TEXT, dtype=torch.float64)
    for cross_name, *temporal_names in layers.values():
        for p in range(SIZE * SIZE):
            flow[:, p] += st_flow(maps[cross_name][:, p], [maps[n][p] for n in temporal_names], temperature)
    probs = torch.softmax(flow.view(FRAMES, SIZE, SIZE, TEXT)[..., 1:eot_index] / len(pairs) * 100, dim=-1)
    peaks = integration._vico_smoothing(probs[..., [i - 1 for i in tokens]].permute(3, 0, 1, 2)).amax((1, 2, 3))
    with torch.no_grad(), AttentionFlowTracker(model, tokens, mode=mode, eot_index=eot_index,
                                               blocks=FULL_RES) as tracker:
        model(latents, t, context)
        torch.testing.assert_close(tracker.peaks(), peaks.view(1, 2))
        torch.testing.assert_close(tracker.loss(), (1 - peaks).clamp_min(0).max())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_loss_is_finite_and_reaches_latents(unet, mode):
    latents, t, context = _inputs()
    latents.requires_grad_()
    with AttentionFlowTracker(unet, [2, 4], mode=mode, attn_res=(SIZE, SIZE)) as tracker:
        unet(latents, t, context)
        peaks = tracker.peaks()
        loss = tracker.loss()
        assert peaks.shape == (BATCH, 2) and ((peaks > 0) & (peaks <= 1)).all()
        torch.testing.assert_close(loss, (1 - peaks).clamp_min(0).amax(-1).sum())
        assert torch.isfinite(loss) and loss > 0
        (grad,) = torch.autograd.grad(loss, latents)
    assert torch.isfinite(grad).all() and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_step_raises_the_peak(unet, mode):
    latents, t, context = _inputs(batch=1)
    with AttentionFlowTracker(unet, 3, mode=mode, eot_index=TEXT - 1, attn_res=(SIZE, SIZE)) as tracker:
        latents = latents.requires_grad_()
        unet(latents, t, context)
        peak_before, loss_before = tracker.peaks().item(), tracker.loss()
        stepped = tracker.step(latents, lr=0.5, loss=loss_before)
        assert stepped.is_leaf and stepped.requires_grad and not torch.equal(stepped, latents)
        with pytest.raises(RuntimeError, match="no maps recorded"):
            tracker.loss()
        unet(stepped, t, context)
        assert tracker.peaks().item() > peak_before + 1e-4
        assert tracker.loss().item() < loss_before.item() - 1e-4
        stepped_again = tracker.step(stepped, lr=0.5)  # the loss of the last forward by default
        assert not torch.equal(stepped_again, stepped)


def test_vico_smoothing_kernel():
    impulse = torch.zeros(1, 5, 5, 5, dtype=torch.float64)
    impulse[0, 2, 2, 2] = 1
    smoothed = integration._vico_smoothing(impulse)
    # Vico's taps are exp(-(d / (2 sigma))^2) with sigma 0.5, i.e. [1/e, 1, 1/e] before normalisation.
    centre, edge = 1 / (1 + 2 / math.e), (1 / math.e) / (1 + 2 / math.e)
    torch.testing.assert_close(smoothed[0, 2, 2, 2], torch.tensor(centre ** 3, dtype=torch.float64))
    torch.testing.assert_close(smoothed[0, 1, 1, 1], torch.tensor(edge ** 3, dtype=torch.float64))
    torch.testing.assert_close(smoothed.sum(), torch.tensor(1.0, dtype=torch.float64))
    ramp = torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1).expand(1, 4, 3, 3)
    # Reflect padding: frames 0, 1, 2, 3 are padded to 1, 0, 1, 2, 3, 2.
    torch.testing.assert_close(integration._vico_smoothing(ramp)[0, [0, -1], 1, 1],
                               torch.tensor([2 * edge, 3 - 2 * edge], dtype=torch.float64))


def test_bad_inputs(unet):
    latents, t, context = _inputs(batch=1)
    with pytest.raises(ValueError, match="mode must be 'soft' or 'hard'"):
        AttentionFlowTracker(unet, [2], mode="flow_soft")
    for temperature in (0, -0.01, math.inf):
        with pytest.raises(ValueError, match="temperature must be positive"):
            AttentionFlowTracker(unet, [2], temperature=temperature)
    with pytest.raises(TypeError, match="temperature must be a number"):
        AttentionFlowTracker(unet, [2], temperature="0.01")
    with pytest.raises(ValueError, match=r"token_indices \[0\] out of range"):
        AttentionFlowTracker(unet, [0, 2])
    with pytest.raises(ValueError, match=r"token_indices \[4\] out of range"):
        AttentionFlowTracker(unet, [2, 4], eot_index=4)
    with pytest.raises(TypeError, match="token_indices must be a non-empty list of ints"):
        AttentionFlowTracker(unet, [])
    with pytest.raises(ValueError, match="eot_index must be an int >= 2"):
        AttentionFlowTracker(unet, [1], eot_index=1)
    with pytest.raises(ValueError, match=r"blocks \['up_blocks.0'\] hold no tracked pair"):
        AttentionFlowTracker(unet, [2], blocks=["up_blocks.0"])
    with pytest.raises(ValueError, match="has no spatial cross-attention with a temporal transformer"):
        AttentionFlowTracker(torch.nn.Linear(2, 2), [2])
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())

    with AttentionFlowTracker(unet, [6]) as tracker:  # without eot_index the last of the 7 tokens is dropped
        with pytest.raises(RuntimeError, match="no maps recorded"):
            tracker.loss()
        with torch.no_grad():
            unet(latents, t, context)
        with pytest.raises(ValueError, match=r"resolutions \[\(4, 4\), \(8, 8\)\]; pass attn_res"):
            tracker.flows()
    with AttentionFlowTracker(unet, [6], attn_res=(SIZE, SIZE)) as tracker:
        with torch.no_grad():
            unet(latents, t, context)
        with pytest.raises(ValueError, match=r"token_indices \[6\] out of range: .* tokens 1 \.\. 5"):
            tracker.loss()
    with AttentionFlowTracker(unet, [2], eot_index=TEXT, attn_res=(SIZE, SIZE)) as tracker:
        with torch.no_grad():
            unet(latents, t, context)
        with pytest.raises(ValueError, match="eot_index 7 is past the text sequence's last token"):
            tracker.loss()
    with AttentionFlowTracker(unet, [2], attn_res=(SIZE, SIZE)) as tracker:
        with torch.no_grad():
            unet(latents, t, context)
        with pytest.raises(ValueError, match="requires_grad=True"):
            tracker.step(latents, lr=0.1)
        with pytest.raises(RuntimeError, match="the loss has no autograd graph"):
            tracker.step(latents.clone().requires_grad_(), lr=0.1)
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            tracker.step(latents.clone().requires_grad_(), lr=0)
        leaf = latents.clone().requires_grad_()
        unet(leaf, t, context)
        with pytest.raises(ValueError, match="the loss does not depend on latents"):
            tracker.step(latents.clone().requires_grad_(), lr=0.1)

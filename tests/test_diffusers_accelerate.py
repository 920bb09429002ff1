"""pk.accelerate on diffusers UNets (2-D image and 3-D video), built from configs with random weights: outputs and
every parameter's gradient against the same model unaccelerated, the report, restore, fall-backs, compile."""
import copy

import pytest
import torch

import pykernels as pk

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

from pykernels.integrations.diffusers import RoutedAttnProcessor  # noqa: E402
from pykernels.testing import compile_recording  # noqa: E402

pytestmark = pytest.mark.usefixtures("serve_small_calls")

TOL64 = dict(atol=1e-10, rtol=1e-10)


def _unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _unet3d():
    torch.manual_seed(0)
    return diffusers.UNet3DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))


def _inputs(kind, dtype):
    g = torch.Generator().manual_seed(1)
    if kind == "2d":
        # 8 x 6 latents: a non-square map, as the attention layers only see tokens.
        return torch.randn(2, 4, 8, 6, generator=g, dtype=dtype), torch.randn(2, 5, 32, generator=g, dtype=dtype)
    return torch.randn(1, 4, 3, 8, 8, generator=g, dtype=dtype), torch.randn(1, 5, 16, generator=g, dtype=dtype)


def _attention_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, Attention)]


def _run(model, sample, text):
    """Output and every parameter's gradient of one forward and backward from a fixed RNG state (training mode:
    the video UNet's temporal convolutions draw dropout)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(sample, 7, encoder_hidden_states=text).sample
    out.backward(torch.ones_like(out))
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same_run(model, reference, sample, text, **tol):
    out, grads = _run(model, sample, text)
    ref_out, ref_grads = _run(reference, sample, text)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name, **tol)


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unet_matches_diffusers_values_and_gradients(kind, dtype):
    model = (_unet2d() if kind == "2d" else _unet3d()).to(dtype)
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    sample, text = _inputs(kind, dtype)
    tol = TOL64 if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    _assert_same_run(model, reference, sample, text, **tol)

    names = _attention_names(model)
    assert report.processors == names and report.routed == [""] and report.skipped == []
    assert all(type(dict(model.named_modules())[n].processor) is RoutedAttnProcessor for n in names)
    # Every attention layer of both runs (forward only counts calls) went through the fused kernel.
    assert report.served("sdpa") == len(names) and report.fallbacks("sdpa") == {}


def test_a_layer_called_on_its_own_is_served():
    model = _unet2d().double()
    report = pk.accelerate(model)
    attn = dict(model.named_modules())[report.processors[0]]
    tokens = torch.randn(2, 12, attn.to_q.in_features, dtype=torch.double)
    got = attn(tokens)
    assert report.served("sdpa") == 1
    pk.restore(model)
    torch.testing.assert_close(got, attn(tokens), **TOL64)


def test_restore_gives_back_the_same_processor_objects():
    model = _unet2d().double()
    before = {name: module.processor for name, module in model.named_modules() if isinstance(module, Attention)}
    sample, text = _inputs("2d", torch.double)
    with torch.no_grad():
        expected = model(sample, 7, encoder_hidden_states=text).sample
        pk.accelerate(model)
        pk.restore(model)
        after = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
        assert all(after[name] is processor for name, processor in before.items())
        assert "forward" not in model.__dict__
        torch.testing.assert_close(model(sample, 7, encoder_hidden_states=text).sample, expected, **TOL64)


def test_other_processors_are_skipped_and_accelerate_is_idempotent():
    model = _unet2d().double()
    names = _attention_names(model)
    legacy = dict(model.named_modules())[names[0]]
    legacy.set_processor(AttnProcessor())
    report = pk.accelerate(model)
    assert report.processors == names[1:]
    assert report.skipped == [(names[0], "diffusers processor AttnProcessor, not AttnProcessor2_0")]
    again = pk.accelerate(model)
    assert again.processors == [] and {why for _, why in again.skipped} >= {"processor already routed to pykernels"}


def test_families_without_attention_leave_processors_alone():
    model = _unet2d()
    report = pk.accelerate(model, families=("window", "graph"))
    assert report.processors == []
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if isinstance(m, Attention))


def test_autocast_falls_back_to_diffusers_and_is_counted():
    model = _unet2d().eval()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    sample, text = _inputs("2d", torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(sample, 7, encoder_hidden_states=text).sample
        expected = reference(sample, 7, encoder_hidden_states=text).sample
    assert torch.equal(got, expected)
    assert report.fallbacks("sdpa") == {"autocast": len(report.processors)} and report.served("sdpa") == 0


@pytest.mark.parametrize("root", ["unet", "transformer block"])
def test_compile_fullgraph_runs_the_fused_kernel(root):
    torch._dynamo.reset()
    model = _unet2d().eval()
    if root == "transformer block":
        # diffusers marks its blocks allow_in_graph: the routed forward must not make dynamo call the class.
        model = model.down_blocks[0].attentions[0].transformer_blocks[0]
        args, kwargs = (torch.randn(2, 12, 32),), {"encoder_hidden_states": torch.randn(2, 5, 32)}
    else:
        sample, text = _inputs("2d", torch.float32)
        args, kwargs = (sample, 7), {"encoder_hidden_states": text}
    reference = copy.deepcopy(model)
    pk.accelerate(model)
    graphs = []
    compiled = compile_recording(model, graphs)
    with torch.no_grad():
        got, expected = compiled(*args, **kwargs), reference(*args, **kwargs)
    got, expected = (out.sample if root == "unet" else out for out in (got, expected))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-4)
    code = "".join(gm.code for gm in graphs)
    attention_layers = len(_attention_names(model))
    assert code.count("pykernels.attention") == attention_layers and "scaled_dot_product_attention" not in code

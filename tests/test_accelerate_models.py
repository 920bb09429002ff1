"""pk.accelerate on the models people run: timm ViT (SDPA callers), timm Swin (window attention), user modules
calling F.scaled_dot_product_attention with every argument form, against the same model unaccelerated."""
import copy
import importlib
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.testing import compile_recording, engines_for

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")

pytestmark = pytest.mark.usefixtures("serve_small_calls")

TOL64 = dict(atol=1e-10, rtol=1e-10)
SWIN_BLOCKS = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=32, **kwargs).double()


def _swin(img_size=(56, 56), depths=(2, 2)):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=depths,
                              num_heads=(3, 6)[:len(depths)], embed_dim=48, img_size=img_size).double()
    # timm initialises the bias tables near zero and the qkv bias at zero, which would hide a wrong gather or
    # a pad token without its bias.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "qkv.bias")):
                p.normal_()
    return model


def _run(model, x, seed=0):
    """Output and every parameter's gradient (by name) of one forward and backward from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    out.backward(torch.ones_like(out))
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}
    return out.detach(), grads, x.grad


def _assert_same_run(model, reference, x, **tol):
    out, grads, x_grad = _run(model, x)
    ref_out, ref_grads, ref_x_grad = _run(reference, x)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(x_grad, ref_x_grad, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name, **tol)


# timm ViT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True])
def test_vit_matches_timm_values_and_gradients(training):
    model = _vit().train(training)
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    report = pk.accelerate(model)
    assert (report.swapped, report.routed, report.windowed, report.skipped) == ([], [""], [], [])
    assert list(model.parameters()) == params and model.training == training
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    _assert_same_run(model, reference, x, **TOL64)
    assert dict(report.calls) == {("sdpa", "served"): 2}
    assert report.served("sdpa") == 2 and report.fallbacks("sdpa") == {}


def test_vit_float32():
    model = _vit().float().eval()
    reference = copy.deepcopy(model)
    pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 3, 32, 32), atol=2e-5, rtol=2e-5)


def test_vit_attention_dropout_in_training_falls_back_and_draws_as_torch():
    model = _vit(attn_drop_rate=0.1).train()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 3, 32, 32, dtype=torch.double), **TOL64)
    assert report.fallbacks("sdpa") == {"dropout_p > 0": 2} and report.served("sdpa") == 0
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.double))
    assert report.served("sdpa") == 2


# timm Swin ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size", [(56, 56), (56, 84)], ids=["square", "non-square"])
@pytest.mark.parametrize("training", [False, True])
def test_swin_matches_timm_values_and_gradients(img_size, training):
    """The non-square map is 14 x 21 then 7 x 11: the last stage pads to whole windows and shifts only along W."""
    model = _swin(img_size).train(training)
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    report = pk.accelerate(model)
    assert report.windowed == SWIN_BLOCKS and report.routed == [""] and report.skipped == []
    assert list(model.parameters()) == params
    _assert_same_run(model, reference, torch.randn(2, 3, *img_size, dtype=torch.double), **TOL64)
    assert dict(report.calls) == {("swin", "served"): 4}


def test_swin_falls_back_to_timm_where_the_kernel_differs():
    model = _swin().train()
    model.layers[0].blocks[0].attn.attn_drop.p = 0.1
    handle = model.layers[1].blocks[0].attn.register_forward_hook(lambda *args: None)
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 3, 56, 56, dtype=torch.double), **TOL64)
    assert dict(report.calls) == {("swin", "served"): 2, ("swin", "attention dropout in training"): 1,
                                  ("swin", "hooks on the block's attn module"): 1}
    handle.remove()


def test_swin_v2_is_reported_skipped():
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, depths=(1, 1), num_heads=(2, 4),
                              embed_dim=32, img_size=64).eval()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families=("window",))
    assert report.windowed == [] and report.routed == []
    assert [name for name, _ in report.skipped] == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert all("SwinV2" in why for _, why in report.skipped)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


def test_families_limit_what_is_touched():
    model = _swin()
    assert pk.accelerate(model, families=("attention",)).windowed == []
    assert "_attn" not in model.layers[0].blocks[0].__dict__
    pk.restore(model)
    report = pk.accelerate(model, families="window")
    assert report.routed == [] and report.windowed == SWIN_BLOCKS and not model.forward.route_sdpa
    with pytest.raises(ValueError, match="unknown families"):
        pk.accelerate(model, families=("attn",))


# F.scaled_dot_product_attention: each argument form, served or handed back --------------------------------------

class _SDPACaller(nn.Module):
    """q, k, v from a projection of x, then F.scaled_dot_product_attention with the arguments ``make`` builds."""

    def __init__(self, make, heads=4, kv_heads=4, dtype=torch.float64):
        super().__init__()
        self.make, self.heads, self.kv_heads = make, heads, kv_heads
        self.proj = nn.Linear(8, 8 * (heads + 2 * kv_heads), dtype=dtype)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, -1, 8).transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], 1)
        args, kwargs = self.make(q, k, v)
        return F.scaled_dot_product_attention(*args, **kwargs)


def _bool_mask(*shape, all_masked_row=False):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    if all_masked_row:
        mask[..., 1, :] = False
    return mask


def _float_mask(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()


SERVED = {
    "plain": lambda q, k, v: ((q, k, v), {}),
    "bool mask": lambda q, k, v: ((q, k, v, _bool_mask(2, 1, 5, 5)), {}),
    "bool mask, fully masked row": lambda q, k, v: ((q, k, v), {"attn_mask": _bool_mask(5, 5, all_masked_row=True)}),
    "float mask": lambda q, k, v: ((q, k, v), {"attn_mask": _float_mask(2, 4, 5, 5)}),
    "causal and scale": lambda q, k, v: ((q, k, v), {"is_causal": True, "scale": 0.3}),
    "causal, fewer queries": lambda q, k, v: ((q[:, :, :3], k, v), {"is_causal": True}),
    "3-D": lambda q, k, v: ((q[:, 0], k[:, 0], v[:, 0]), {"attn_mask": _bool_mask(2, 5, 5)}),
    "positional": lambda q, k, v: ((q, k, v, None, 0.0, True), {}),
}


@pytest.mark.parametrize("case", list(SERVED))
def test_sdpa_calls_served(case):
    model = _SDPACaller(SERVED[case])
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 5, 8, dtype=torch.float64), **TOL64)
    assert dict(report.calls) == {("sdpa", "served"): 1}


def test_sdpa_grouped_query_attention_served():
    model = _SDPACaller(lambda q, k, v: ((q, k, v), {"enable_gqa": True, "is_causal": True}), heads=4, kv_heads=2)
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 5, 8, dtype=torch.float64), **TOL64)
    assert dict(report.calls) == {("sdpa", "served"): 1}


# The CPU size rule: measured in benchmarks, checked here only for where it cuts and what each side runs.
ACCELERATE = importlib.import_module("pykernels.accelerate")  # the module, not the function of the same name
CPU_MIN_WORK = ACCELERATE._CPU_MIN_WORK


@pytest.mark.parametrize("tokens, outcome", [(255, "small call on the CPU (torch's SDPA is faster below 4M "
                                                    "multiply-adds)"), (256, "served")])
def test_auto_hands_small_cpu_calls_back_to_torch(monkeypatch, tokens, outcome):
    monkeypatch.setattr(ACCELERATE, "_CPU_MIN_WORK", CPU_MIN_WORK)
    assert 2 * 4 * 256 * 256 * 8 == CPU_MIN_WORK  # batch x heads x queries x keys x head dim at the cut
    model = _SDPACaller(SERVED["plain"])
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, tokens, 8, dtype=torch.float64), **TOL64)
    assert dict(report.calls) == {("sdpa", outcome): 1}


def test_pinned_cpu_backend_serves_small_calls(monkeypatch):
    monkeypatch.setattr(ACCELERATE, "_CPU_MIN_WORK", CPU_MIN_WORK)
    model = _SDPACaller(SERVED["plain"])
    report = pk.accelerate(model, backend="cpu")
    model(torch.randn(2, 5, 8, dtype=torch.float64))
    assert dict(report.calls) == {("sdpa", "served"): 1}


def test_heads_wider_than_the_gpu_engines_take_run_torch():
    if "triton" not in engines_for("cpu"):
        pytest.skip("needs triton under TRITON_INTERPRET=1")

    class Wide(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    model = Wide()
    report = pk.accelerate(model, backend="triton")
    q = torch.randn(1, 1, 3, 264)
    torch.testing.assert_close(model(q), F.scaled_dot_product_attention(q, q, q))
    assert dict(report.calls) == {("sdpa", "head dim above 256 (the CUDA and Triton engines' limit)"): 1}


def test_sdpa_float_mask_gradient_matches():
    mask = _float_mask(1, 4, 5, 5)
    model = _SDPACaller(lambda q, k, v: ((q, k, v), {"attn_mask": mask}))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    model(x).sum().backward()
    expected, mask.grad = mask.grad, None
    pk.accelerate(model)
    model(x).sum().backward()
    torch.testing.assert_close(mask.grad, expected, **TOL64)


FALLS_THROUGH = {
    "dropout_p > 0": lambda q, k, v: ((q, k, v), {"dropout_p": 0.3}),
    "q, k, v not all 3-D or all 4-D": lambda q, k, v: ((q[None], k[None], v[None]), {}),
    "attn_mask dtype": lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(5, 5, dtype=torch.float32)}),
    "autocast": lambda q, k, v: ((q.float(), k.float(), v.float()), {"_autocast": True}),
}


@pytest.mark.parametrize("reason", list(FALLS_THROUGH))
def test_sdpa_calls_fall_through_with_torchs_result(reason):
    make = FALLS_THROUGH[reason]

    def call(q, k, v):
        args, kwargs = make(q, k, v)
        if kwargs.pop("_autocast", False):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.scaled_dot_product_attention(*args, **kwargs)
        return F.scaled_dot_product_attention(*args, **kwargs)

    class Caller(_SDPACaller):
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.proj(x).view(b, n, -1, 8).transpose(1, 2).split([4, 4, 4], 1)
            return call(q, k, v)

    model = Caller(None)
    reference = copy.deepcopy(model)
    report = pk.accelerate(model)
    _assert_same_run(model, reference, torch.randn(2, 5, 8, dtype=torch.float64), atol=0, rtol=0)
    assert dict(report.calls) == {("sdpa", reason): 1}


RAISES = {
    "is_causal with attn_mask": lambda q, k, v: ((q, k, v), {"attn_mask": _bool_mask(5, 5), "is_causal": True}),
    "head counts differ without enable_gqa": lambda q, k, v: ((q, k[:, :2], v[:, :2]), {}),
    "attn_mask shape": lambda q, k, v: ((q, k, v), {"attn_mask": _bool_mask(2, 5, 5)}),
    "dtypes": lambda q, k, v: ((q, k.float(), v), {}),
}


@pytest.mark.parametrize("reason", list(RAISES))
def test_sdpa_calls_torch_rejects_fall_through_to_its_error(reason):
    model = _SDPACaller(RAISES[reason])
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises((RuntimeError, TypeError, ValueError)) as expected:
        model(x)
    report = pk.accelerate(model)
    with pytest.raises(expected.type) as got:
        model(x)
    assert str(got.value) == str(expected.value)
    assert dict(report.calls) == {("sdpa", reason): 1}


# report, restore, idempotence, nesting, exceptions, copies -------------------------------------------------------

def test_restore_gives_back_the_original_model():
    model = nn.Sequential(_SDPACaller(SERVED["causal and scale"]), nn.Linear(32, 8, dtype=torch.float64))
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    model.add_module("mha", mha)
    model.forward = lambda x: mha(*(model[1](model[0](x).transpose(1, 2).flatten(2)),) * 3, need_weights=False)[0]
    previous_forward = model.forward
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = model(x)
    report = pk.accelerate(model)
    assert report.swapped == ["mha"] and report.routed == [""] and type(mha) is pk.nn.MultiheadAttention
    torch.testing.assert_close(model(x), expected, **TOL64)
    assert pk.restore(model) is model
    assert type(mha) is nn.MultiheadAttention and "backend" not in mha.__dict__
    assert model.forward is previous_forward
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert dict(report.calls) == {("sdpa", "served"): 1}


def test_restore_removes_swin_overrides():
    model = _swin()
    pk.accelerate(model)
    pk.restore(model)
    assert all("_attn" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())


def test_accelerate_is_idempotent_and_the_report_live():
    model = _vit().eval()
    first = pk.accelerate(model)
    second = pk.accelerate(model)
    assert (second.routed, second.windowed, second.swapped) == ([], [], [])
    assert second.skipped == [("", "forward already routes F.scaled_dot_product_attention")]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.double))
    assert first.calls is second.calls and first.served("sdpa") == 2
    assert "calls    sdpa served: 2" in str(first)


def test_accelerated_submodule_inside_accelerated_model_counts_once():
    inner = _SDPACaller(SERVED["plain"])
    outer = nn.Sequential(inner, nn.Linear(8, 8, dtype=torch.float64))
    inner_report = pk.accelerate(inner)
    outer_report = pk.accelerate(outer)
    outer(torch.randn(2, 5, 8, dtype=torch.float64))
    assert dict(outer_report.calls) == {("sdpa", "served"): 1} and inner_report.served("sdpa") == 0
    inner(torch.randn(2, 5, 8, dtype=torch.float64))
    assert inner_report.served("sdpa") == 1


def test_mode_is_left_on_exceptions():
    class Failing(_SDPACaller):
        def forward(self, x):
            super().forward(x)
            raise KeyError("boom")

    model = Failing(SERVED["plain"])
    report = pk.accelerate(model)
    with pytest.raises(KeyError, match="boom"):
        model(torch.randn(2, 5, 8, dtype=torch.float64))
    assert torch.overrides._get_current_function_mode_stack() == []
    assert report.served("sdpa") == 1


def _plain_call(q, k, v):
    return (q, k, v), {}


def test_copies_are_accelerated_and_count_apart():
    model = _SDPACaller(_plain_call)
    report = pk.accelerate(model)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.forward.module is copied
        torch.testing.assert_close(copied(x), model(x), atol=0, rtol=0)
    assert report.served("sdpa") == 2


def test_threads_route_only_the_accelerated_model():
    accelerated, plain = _SDPACaller(SERVED["bool mask"]), _SDPACaller(SERVED["bool mask"])
    plain.load_state_dict(accelerated.state_dict())
    report = pk.accelerate(accelerated)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = plain(x)
    barrier, results, rounds = threading.Barrier(2), {}, 50

    def run(name, model):
        barrier.wait()
        results[name] = [model(x) for _ in range(rounds)]

    threads = [threading.Thread(target=run, args=args) for args in (("pk", accelerated), ("torch", plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dict(report.calls) == {("sdpa", "served"): rounds}
    for out in results["pk"] + results["torch"]:
        torch.testing.assert_close(out, expected, **TOL64)


# torch.compile --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,families", [("vit", None), ("swin", None), ("swin", ("window",))])
def test_compile_fullgraph(make, families):
    # One Swin stage: a block without and one with a shift.
    model = (_vit() if make == "vit" else _swin(depths=(2,))).eval()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families=families)
    graphs = []
    compiled = compile_recording(model, graphs)
    x = torch.randn(1, 3, 32 if make == "vit" else 56, 32 if make == "vit" else 56, dtype=torch.double)
    _assert_same_run(compiled, reference, x, **TOL64)
    path = "sdpa" if make == "vit" else "swin"
    op = "pykernels.attention" if make == "vit" else "pykernels.window_attention"
    assert len(graphs) == 1 and op in graphs[0].code and "scaled_dot_product_attention" not in graphs[0].code
    # The counts run after each compiled call, as in eager.
    assert dict(report.calls) == {(path, "served"): 2}

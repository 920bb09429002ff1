"""The CPU engine's key split (flash-decoding): up to 64 query rows per kv head against keys long enough to cut
into chunks, merged per row; and few heads of many queries and long keys, whose row blocks are too few to
share among threads.
Checked against the float64 reference and torch's SDPA, for every dtype, mask kind and GQA, and for results
that do not depend on the thread count."""
import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.reference import attention as ref
from pykernels.testing import assert_close, assert_low_precision_error

pytestmark = pytest.mark.attention

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (B, H, Hkv, Nq, Nk, D, Dv). The query rows per kv head (the group's heads x Nq) pick the score kernel: 1 and 7
# rows take dot products (D = 40: a tail after whole vectors), 12 rows a gemm over the keys (rows <= D), 34, 40
# and 60 rows a gemm over transposed key blocks (rows > D). 1101, 523 and 1337 keys are no whole number of
# chunks (256 keys at least) nor of score strips; Dv = 24 and 48 are no whole vectors, and Dv = 24 not
# even a whole gemm panel, so values are padded rather than read in place.
SHAPES = [
    (1, 2, 2, 1, 1101, 64, 64),
    (1, 7, 1, 1, 523, 40, 80),
    (2, 4, 1, 3, 1337, 40, 24),
    (1, 2, 1, 17, 600, 32, 32),
    (1, 1, 1, 40, 1100, 16, 48),
    (1, 1, 1, 600, 700, 16, 16),  # 10 row blocks, too few to share: keys cut too (causal: past some blocks)
]


def _inputs(shape, dtype, seed=0):
    b, h, hkv, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    return t(b, h, nq, d), t(b, hkv, nk, d), t(b, hkv, nk, dv), t(b, h, nq, nk)


def _mask(kind, shape, bias):
    b, h, hkv, nq, nk, d, dv = shape
    if kind == "none":
        return None
    if kind == "full":
        return bias
    if kind == "broadcast":  # one row of key weights per batch, read with strides 0 elsewhere
        return bias[:, :1, :1, :]
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    mask[..., 0, :] = False  # the first query of every head sees no key
    return mask


def _float_bias(attn_bias):
    if attn_bias is None or attn_bias.dtype != torch.bool:
        return None if attn_bias is None else attn_bias.double()
    return torch.zeros(attn_bias.shape, dtype=torch.float64).masked_fill(~attn_bias, float("-inf"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", ["none", "full", "broadcast", "bool"])
def test_split_forward_matches_reference_and_sdpa(shape, dtype, causal, mask):
    q, k, v, bias = _inputs(shape, dtype, seed=sum(shape))
    attn_bias = _mask(mask, shape, bias)
    out = pk.fused_attention(q, k, v, attn_bias=attn_bias, causal=causal)
    leaves = [x.double() for x in (q, k, v)]
    bias64 = _float_bias(attn_bias)
    expected = ref.attention(*leaves, bias64, causal)
    if dtype in (torch.float16, torch.bfloat16):
        eager = ref.attention(q, k, v, None if bias64 is None else bias64.to(dtype), causal)
        assert_low_precision_error(out, expected, eager, msg="out")
    else:
        assert_close(out, expected, dtype, scale=4, msg="out")
    if not causal or mask == "none":  # SDPA takes a mask or is_causal, not both
        sdpa = F.scaled_dot_product_attention(*leaves, attn_mask=attn_bias if mask == "bool" else bias64,
                                              is_causal=causal, enable_gqa=shape[1] != shape[2])
        if mask == "bool":  # SDPA gives NaN for rows that see no key, the engines 0
            sdpa = sdpa.nan_to_num(0.0)
        if dtype in (torch.float16, torch.bfloat16):
            assert_low_precision_error(out, sdpa, eager, msg="out vs SDPA")
        else:
            assert_close(out, sdpa, dtype, scale=4, msg="out vs SDPA")


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_split_lse_and_gradients(shape, causal):
    # The backward recomputes the probabilities from the merged lse: both must match the reference.
    q, k, v, bias = _inputs(shape, torch.float32)
    bias = _float_bias(_mask("bool", shape, bias)).float().expand(bias.shape)
    out, lse = torch.ops.pykernels.attention(q, k, v, bias, causal, 0.3)
    scores = ref.attention_scores(q.double(), k.double(), bias.double(), causal, 0.3)
    assert_close(lse, scores.logsumexp(-1), torch.float32, scale=4, msg="lse")
    assert torch.isneginf(lse[:, :, 0]).all() and torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))

    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = pk.fused_attention(*leaves, attn_bias=bias, causal=causal)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    expected = torch.autograd.grad(ref.attention(*leaves64, bias.double(), causal), leaves64, grad_out.double())
    for name, a, b in zip("qkv", got, expected):
        assert_close(a, b, torch.float32, scale=16, msg=f"grad {name}")


@pytest.mark.parametrize("causal", [False, True])
def test_split_gradcheck_float64(causal):
    q, k, v, bias = _inputs((1, 2, 1, 3, 530, 3, 2), torch.float64)
    args = [x.requires_grad_() for x in (q, k, v, bias)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: pk.fused_attention(q, k, v, attn_bias=b, causal=causal), args, fast_mode=True)


@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 3000, 64, 64), (1, 1, 1, 40, 1100, 16, 48), (1, 2, 1, 17, 600, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_results_do_not_depend_on_the_thread_count(shape, dtype):
    # Chunks follow the shapes, and each row merges its chunks in chunk order, so any thread count gives the
    # same bits.
    q, k, v, bias = _inputs(shape, dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.pykernels.attention(q, k, v, bias, False, 0.2))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_split_nan_in_values_propagates_like_the_reference():
    q, k, v, _ = _inputs((1, 1, 1, 2, 700, 16, 16), torch.float32)
    v[0, 0, 650, 3] = float("nan")  # in the last chunk only
    out = pk.fused_attention(q, k, v)
    assert torch.equal(out.isnan(), ref.attention(q, k, v).isnan())


@pytest.mark.parametrize("b, h, nq", [(0, 2, 1), (2, 2, 0)])
def test_empty_calls_with_few_queries(b, h, nq):
    # Shapes the split would take were they not empty (found by the fuzz: batch 0 divided by zero there).
    q, k, v = torch.randn(b, h, nq, 8), torch.randn(b, h, 700, 8), torch.randn(b, h, 700, 8)
    out = pk.fused_attention(q, k, v)
    assert out.shape == (b, h, nq, 8)

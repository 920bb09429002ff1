"""attn_implementation="pykernels" on Hugging Face transformers models (BERT, Llama with GQA, ViT) built from tiny
configs with random weights, against the same model on transformers' "sdpa" (and "eager" for attention weights)."""
import copy
import subprocess
import sys

import pytest
import torch

import pykernels as pk
from pykernels.testing import compile_recording

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pkt = pytest.importorskip("pykernels.integrations.transformers")

pytestmark = pytest.mark.usefixtures("serve_small_calls")

TOL64 = dict(atol=1e-10, rtol=1e-10)
SERVED = ("transformers", "served")
WEIGHTS = ("transformers", "output_attentions (per-head weights): eager")

# transformers initialises with std 0.02, which makes every attention nearly uniform and would hide a wrong mask.
_INIT = dict(initializer_range=0.3)


def _bert_config(**kwargs):
    return transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32, **_INIT, **kwargs)


def _llama_config():
    return transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_INIT)


def _vit_config():
    return transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, **_INIT)


def _pair(config, model_class=transformers.AutoModel, reference="sdpa"):
    """A float64 model on ``reference`` and a deep copy (own config: from_config shares the one it is given) on
    "pykernels", with the same weights."""
    pkt.register()
    torch.manual_seed(0)
    ref = model_class.from_config(config, attn_implementation=reference).double()
    model = copy.deepcopy(ref)
    model.set_attn_implementation("pykernels")
    assert model.config._attn_implementation == "pykernels" and ref.config._attn_implementation == reference
    return model, ref


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(model, seed=0, **inputs):
    """Output and every parameter's gradient (by name) of one forward and backward from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = _output(model(**inputs))
    # A fixed random cotangent, so every output position and feature weighs differently in the gradients.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}


def _assert_same_run(model, ref, tol=TOL64, **inputs):
    out, grads = _run(model, **inputs)
    ref_out, ref_grads = _run(ref, **inputs)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    # The pooler of an encoder is not on the path to last_hidden_state; every other parameter has a gradient.
    assert {name for name, grad in grads.items() if grad is None} <= {"pooler.dense.weight", "pooler.dense.bias"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name, **tol)


def _served_delta(fn):
    before = pkt.calls[SERVED]
    fn()
    return pkt.calls[SERVED] - before


def _ids(batch, length, vocab=50):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def _padding(lengths, total, left=False):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        (mask[row, total - n:] if left else mask[row, :n]).fill_(1)
    return mask


def test_import_does_not_import_transformers():
    code = "import sys, pykernels; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_config_with_pykernels():
    pkt.register()
    model = transformers.AutoModel.from_config(_bert_config(), attn_implementation="pykernels").eval()
    assert model.config._attn_implementation == "pykernels"
    assert _served_delta(lambda: model(input_ids=_ids(2, 5))) == 2


# BERT: bidirectional encoder, padding mask -------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True])
def test_bert_padding_matches_sdpa(training):
    config = _bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, ref = _pair(config)
    model.train(training), ref.train(training)
    inputs = dict(input_ids=_ids(3, 9), attention_mask=_padding([9, 5, 2], 9))
    assert _served_delta(lambda: _assert_same_run(model, ref, **inputs)) == 2


def test_bert_attention_dropout_in_training_falls_back_to_sdpa():
    model, ref = _pair(_bert_config(attention_probs_dropout_prob=0.3))
    model.train(), ref.train()
    before = pkt.calls.copy()
    # The fallback is transformers' own SDPA call, so the same seed draws the same dropout masks.
    _assert_same_run(model, ref, input_ids=_ids(2, 6), attention_mask=_padding([6, 4], 6))
    assert pkt.calls - before == {("transformers", "dropout_p > 0: sdpa"): 2}


def test_bert_output_attentions_falls_back_to_eager():
    model, ref = _pair(_bert_config(), reference="eager")
    model.eval(), ref.eval()
    inputs = dict(input_ids=_ids(2, 6), attention_mask=_padding([6, 3], 6), output_attentions=True)
    before = pkt.calls.copy()
    out, ref_out = model(**inputs), ref(**inputs)
    assert pkt.calls - before == {WEIGHTS: 2}
    torch.testing.assert_close(out.last_hidden_state, ref_out.last_hidden_state, **TOL64)
    assert len(out.attentions) == 2
    for weights, ref_weights in zip(out.attentions, ref_out.attentions):
        torch.testing.assert_close(weights, ref_weights, **TOL64)


# Llama: causal decoder with GQA -------------------------------------------------------------------------------------

def test_llama_gqa_causal_matches_sdpa():
    model, ref = _pair(_llama_config(), transformers.AutoModelForCausalLM)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert _served_delta(lambda: _assert_same_run(model, ref, input_ids=_ids(2, 11))) == 2


def test_llama_padded_batch_matches_sdpa():
    # Left padding: the padded positions' query rows see no key at all. SDPA (torch >= 2.14 on CPU) and the fused
    # kernel both give them zeros, so the whole output and every gradient compare, not only the valid tokens.
    model, ref = _pair(_llama_config(), transformers.AutoModelForCausalLM)
    inputs = dict(input_ids=_ids(3, 8), attention_mask=_padding([8, 5, 1], 8, left=True))
    assert _served_delta(lambda: _assert_same_run(model, ref, **inputs)) == 2


def test_llama_decoding_with_cache_matches_sdpa():
    model, ref = _pair(_llama_config(), transformers.AutoModelForCausalLM)
    ids, mask = _ids(2, 7), _padding([7, 4], 7, left=True)
    with torch.no_grad():
        outs = []
        for m in (model, ref):
            first = m(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            second = m(input_ids=ids[:, 6:], attention_mask=mask, cache=first.past_key_values, use_cache=True)
            outs.append((first.logits, second.logits))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **TOL64)


def test_llama_output_attentions_falls_back_to_eager():
    # The causal mask of the SDPA mask interface is None (is_causal); the eager fallback gets it as a float mask.
    model, ref = _pair(_llama_config(), reference="eager")
    before = pkt.calls.copy()
    out, ref_out = model(input_ids=_ids(2, 6), output_attentions=True), ref(input_ids=_ids(2, 6),
                                                                             output_attentions=True)
    assert pkt.calls - before == {WEIGHTS: 2}
    torch.testing.assert_close(out.last_hidden_state, ref_out.last_hidden_state, **TOL64)
    for weights, ref_weights in zip(out.attentions, ref_out.attentions, strict=True):
        torch.testing.assert_close(weights, ref_weights, **TOL64)


def test_mistral_sliding_window_matches_sdpa():
    # sdpa_attention_forward ignores its sliding_window argument: the mask carries the window, and is served.
    config = transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, **_INIT)
    model, ref = _pair(config)
    assert _served_delta(lambda: _assert_same_run(model, ref, input_ids=_ids(2, 9))) == 2


def test_position_bias_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    before = pkt.calls.copy()
    out, weights = pkt.attention_forward(module, q, k, v, None, is_causal=False, position_bias=bias)
    assert pkt.calls - before == {("transformers", "position_bias argument: sdpa"): 1} and weights is None
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None, is_causal=False,
                                                           position_bias=bias)[0], **TOL64)


# ViT ---------------------------------------------------------------------------------------------------------------

def test_vit_matches_sdpa():
    model, ref = _pair(_vit_config())
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert _served_delta(lambda: _assert_same_run(model, ref, pixel_values=pixels)) == 2


def test_vit_float32_matches_sdpa():
    model, ref = _pair(_vit_config())
    model.float(), ref.float()
    _assert_same_run(model, ref, tol=dict(atol=2e-5, rtol=2e-5), pixel_values=torch.randn(2, 3, 16, 16))


# accelerate / restore ----------------------------------------------------------------------------------------------

def test_accelerate_switches_and_restore_switches_back():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="sdpa").double()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    report = pk.accelerate(model)
    assert (report.routed, report.switched, report.skipped) == ([""], [""], [])
    assert model.config._attn_implementation == "pykernels" and list(model.parameters()) == params
    assert "switched <root>: transformers attn_implementation='pykernels'" in str(report)
    inputs = dict(input_ids=_ids(2, 8), attention_mask=_padding([8, 6], 8, left=True))
    _assert_same_run(model, ref, **inputs)
    assert dict(report.calls) == {SERVED: 2}
    again = pk.accelerate(model)
    assert again.switched == [] and ("", "transformers attn_implementation already 'pykernels'") in again.skipped
    pk.restore(model)
    assert model.config._attn_implementation == "sdpa" and "_pykernels_attn_implementation" not in model.__dict__
    _assert_same_run(model, ref, **inputs)
    assert dict(report.calls) == {SERVED: 2}


def test_accelerated_fallback_to_sdpa_is_counted_once():
    # The interface hands the call to transformers' SDPA code, whose F.scaled_dot_product_attention call the
    # accelerated forward's route sees: that route alone counts it.
    model = transformers.AutoModel.from_config(_bert_config(attention_probs_dropout_prob=0.3),
                                               attn_implementation="sdpa").double().train()
    before = pkt.calls.copy()
    report = pk.accelerate(model)
    model(input_ids=_ids(2, 6), attention_mask=_padding([6, 4], 6))
    assert dict(report.calls) == {("sdpa", "dropout_p > 0"): 2} and pkt.calls == before


def test_accelerate_a_model_inside_a_user_module():
    torch.manual_seed(0)
    wrapper = torch.nn.Sequential(transformers.AutoModel.from_config(_vit_config(), attn_implementation="eager"))
    report = pk.accelerate(wrapper)
    assert report.switched == ["0"] and wrapper[0].config._attn_implementation == "pykernels"
    wrapper(torch.randn(1, 3, 16, 16))
    assert report.served("transformers") == 2
    pk.restore(wrapper)
    assert wrapper[0].config._attn_implementation == "eager"


def test_accelerate_with_pinned_backend_leaves_attn_implementation():
    model = transformers.AutoModel.from_config(_vit_config(), attn_implementation="sdpa")
    report = pk.accelerate(model, backend="reference")
    assert report.switched == [] and report.skipped[0][0] == ""
    assert model.config._attn_implementation == "sdpa"
    model(torch.randn(1, 3, 16, 16))
    assert report.served("sdpa") == 2


def test_accelerated_llama_compiles_fullgraph():
    model, ref = _pair(_llama_config())
    model.set_attn_implementation("sdpa")
    report = pk.accelerate(model)
    graphs = []
    compiled = compile_recording(model, graphs)
    _assert_same_run(compiled, ref, input_ids=_ids(2, 8), attention_mask=_padding([8, 5], 8, left=True))
    assert len(graphs) == 1 and "pykernels.attention" in graphs[0].code
    assert "scaled_dot_product_attention" not in graphs[0].code
    assert dict(report.calls) == {SERVED: 2}

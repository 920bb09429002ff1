"""The models benchmark times what it says: the accelerated copy computes the stock model's outputs, accelerate
serves its calls, and a training step trains."""
import importlib.util

import pytest
import torch

from pykernels.bench import models as models_bench
from pykernels.bench.runner import markdown_table, run_family

pytestmark = pytest.mark.usefixtures("serve_small_calls")

CPU = torch.device("cpu")


def _tiny_specs():
    pytest.importorskip("timm")
    pytest.importorskip("torch_geometric")
    return [
        models_bench.ModelSpec("tiny ViT", "timm", "fwd",
                               models_bench._timm("vit_small_patch16_224", 2, image=32, depth=2)),
        models_bench.ModelSpec("tiny Swin", "timm", "fwd",
                               models_bench._timm("swin_tiny_patch4_window7_224", 2, image=56, depths=(2,),
                                                  num_heads=(3,), embed_dim=48)),
        models_bench.ModelSpec("tiny GAT", "torch_geometric", "train step",
                               models_bench._gnn("GATConv", (60, 400, 16, 5))),
        models_bench.ModelSpec("tiny SAGE", "torch_geometric", "train step",
                               models_bench._gnn("SAGEConv", (60, 400, 16, 5))),
    ]


def test_every_model_case_matches_stock_and_is_served():
    for case in models_bench.cases(CPU, quick=True, spec_list=_tiny_specs()):
        max_diff, served = case.check()
        assert max_diff < 1e-4, case.name
        assert "served" in served and "fallback" not in served, (case.name, served)


def test_the_msw_msa_case_matches_the_hidiffusion_package():
    if importlib.util.find_spec("hidiffusion") is None:
        pytest.skip("needs hidiffusion (pip install hidiffusion --no-deps)")
    spec = models_bench.ModelSpec("tiny SD 1.5 layout + MSW-MSA", "hidiffusion", "fwd",
                                  models_bench._unet(16, channels=(32, 64, 128, 128)), output=lambda out: out.sample,
                                  prepare=models_bench._msw_msa)
    (case,) = models_bench.cases(CPU, quick=True, spec_list=[spec])
    max_diff, served = case.check()
    assert max_diff < 1e-4 and "sdpa served" in served
    stock, accelerated, *_ = models_bench._pair(spec, CPU, True)
    hidiffusion_blocks = [n for n, m in stock.named_modules() if type(m).__name__ == "transformer_block"]
    assert len(hidiffusion_blocks) == 5, "the stock model must run HiDiffusion's own MSW-MSA blocks"


def test_a_training_step_changes_both_models_alike():
    spec = _tiny_specs()[2]
    (case,) = models_bench.cases(CPU, quick=True, spec_list=[spec])
    stock, accelerated, *_ = models_bench._pair(spec, CPU, True)
    before = stock.conv1.lin.weight.detach().clone()
    losses = [fn().item() for fn in case.providers.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert not torch.equal(before, stock.conv1.lin.weight)
    torch.testing.assert_close(accelerated.conv1.lin.weight, stock.conv1.lin.weight, atol=1e-6, rtol=1e-5)


def test_the_table_shows_the_difference_and_what_was_served(monkeypatch):
    monkeypatch.setattr(models_bench, "SPECS", _tiny_specs()[:1])
    rows = run_family("models", CPU, quick=True, min_run_time=0.001)
    assert [r["provider"] for r in rows] == ["pykernels (accelerate)", "stock"]
    table = markdown_table(rows)
    assert "| max abs diff | served |" in table and "sdpa served ×2" in table


def test_a_decoding_step_repeats_the_same_step_and_hands_its_small_calls_to_torch(monkeypatch):
    transformers = pytest.importorskip("transformers")
    accelerate_module = importlib.import_module("pykernels.accelerate")
    monkeypatch.setattr(accelerate_module, "_CPU_MIN_WORK", 1 << 22)  # the real rule, not the fixture's

    def tiny_llama(device, quick):
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
        return model, lambda: ((), {"input_ids": ids, "use_cache": False})

    spec = models_bench.ModelSpec("tiny decode", "transformers", "fwd", models_bench._decoding(tiny_llama),
                                  output=lambda out: out.logits)
    (case,) = models_bench.cases(CPU, quick=True, spec_list=[spec])
    first = case.check()
    steps = [fn().logits for fn in case.providers.values()]
    assert case.check() == first and first[0] < 1e-5
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)
    assert "small call on the CPU" in first[1] and " served" not in first[1]
    _, _, inputs, _, _ = models_bench._pair(spec, CPU, True)
    assert inputs()[1]["cache"].get_seq_length() == 9

"""The attention benchmark measures each case on its own shape, and its providers agree."""
import pytest
import torch

from pykernels.bench import attention as attention_bench

pytestmark = pytest.mark.attention

SPECS = [attention_bench.AttnSpec("one", 1, 2, 5, 7, 8), attention_bench.AttnSpec("two", 2, 2, 3, 4, 16)]


def test_every_provider_runs_its_own_case_shape():
    cases = attention_bench.cases(torch.device("cpu"), quick=True, spec_list=SPECS)
    assert len(cases) == 3 * len(SPECS)
    for case in cases:
        spec = next(s for s in SPECS if s.label in case.name)
        for name, fn in case.providers.items():
            result = fn()
            if case.mode != "fwd":
                continue
            out = result[0] if isinstance(result, tuple) else result
            assert out.shape == (spec.batch, spec.heads, spec.nq, spec.dim), f"{case.name}: {name}"


def test_forward_providers_agree():
    for case in attention_bench.cases(torch.device("cpu"), quick=True, spec_list=SPECS):
        if case.mode != "fwd":
            continue
        outputs = {name: fn().detach() for name, fn in case.providers.items()}
        ours = outputs.pop("pykernels")
        for name, out in outputs.items():
            torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5, msg=f"{case.name}: {name}")

"""The attention benchmark measures each case on its own shape, and its providers agree."""
import pytest
import torch

from pykernels.bench import attention as attention_bench

pytestmark = pytest.mark.attention

SPECS = [attention_bench.AttnSpec("one", 1, 2, 5, 7, 8), attention_bench.AttnSpec("two", 2, 2, 3, 4, 16)]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def test_every_provider_runs_its_own_case_shape():
    cases = attention_bench.cases(torch.device("cpu"), quick=True, spec_list=SPECS)
    # attention and attention + map, each forward and forward + backward
    assert sorted((c.name.split(" · ")[0], c.mode) for c in cases) == sorted(
        [(title, mode) for title in ("attention", "attention + head-mean map") for mode in ("fwd", "fwd+bwd")]
        * len(SPECS))
    for case in cases:
        spec = next(s for s in SPECS if s.label in case.name)
        for name, fn in case.providers.items():
            result = fn()
            if case.mode != "fwd":
                continue
            outs = _outputs(result)
            assert outs[0].shape == (spec.batch, spec.heads, spec.nq, spec.dim), f"{case.name}: {name}"
            if len(outs) > 1:
                assert outs[1].shape == (spec.batch, spec.nq, spec.nk), f"{case.name}: {name}"


def test_forward_providers_agree():
    for case in attention_bench.cases(torch.device("cpu"), quick=True, spec_list=SPECS):
        if case.mode != "fwd":
            continue
        (ours_name, ours), *others = case.providers.items()
        expected = _outputs(ours())
        for name, fn in others:
            got = _outputs(fn())
            assert len(got) == len(expected), f"{case.name}: {name}"
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{case.name}: {name} vs {ours_name}")

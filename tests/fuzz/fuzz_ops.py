"""The fuzzer's registry: every public op and nn layer, its strategy and builder (fuzz_attention, fuzz_flow,
fuzz_graph, fuzz_nn), the invalid mutations it is drawn with, its known engine defects and its CI budget.

A strategy (parent process) draws the plain-data ``params`` of a case and, sometimes, one ``invalid`` mutation
from the op's list; the builder (worker process) turns the case into tensors, the call and the expected
outcome. Every invalid mutation names the exception type the op documents and the argument its message must
name.
"""
from __future__ import annotations

from fuzz_attention import (_build_attention, _build_msw, _build_na, _build_window, _attention_params, _msw_params,
                            _na_params, _window_params)
from fuzz_core import Built
from fuzz_flow import (_build_flow, _build_max_flow, _build_max_flow_layered, _build_maxmin, _build_rollout,
                       _build_st_flow, _flow_params, _max_flow_params, _maxmin_params, _st_flow_params)
from fuzz_graph import (GRAPH_INVALID, _build_csr, _build_edge_softmax, _build_graph_attention, _build_scatter,
                        _build_sddmm, _build_spmm, _csr_params, _graph_params, _scatter_params)
from fuzz_nn import _nn_builder, _nn_params
from fuzz_spec import OpSpec


def _spec(public, params, build, invalid=(), **kw):
    return OpSpec(public, params, build, tuple(invalid), **kw)


ATTN_INVALID = ("q_int", "k_dtype", "q_rank", "v_device", "heads", "head_dim", "bias_shape", "bias_int", "scale_str",
                "scale_nan", "backend")
FLOW_INVALID = ("a_int", "b_dtype", "a_1d", "inner_mismatch", "inner_zero", "batch_mismatch")
SOFT_INVALID = FLOW_INVALID + ("tau_zero", "tau_negative", "tau_nan", "tau_inf", "tau_tensor")
MAPS_INVALID = ("residual_range", "maps_empty", "maps_chain", "maps_int", "maps_dtype_mixed", "maps_1d")
CPU_ONLY = ("cpu",)
NN_BUDGET = {"cpu": 24}

OPS = {
    "fused_attention": _spec("pykernels.fused_attention", _attention_params, _build_attention, ATTN_INVALID,
                             budget={"cpu": 360, "triton": 12}),
    "window_attention": _spec("pykernels.window_attention", _window_params, _build_window,
                              ("window_zero", "window_float", "shift_ge_window", "shift_negative", "spatial_mismatch",
                               "bias_shape", "pad_kv_shape", "scale_str", "k_shape", "q_int"),
                              budget={"cpu": 300, "triton": 10}),
    "msw_msa": _spec("pykernels.msw_msa", _msw_params, _build_msw,
                     ("shift_ge_window", "shift_negative", "spatial_mismatch", "spatial_zero"),
                     budget={"cpu": 150, "triton": 6}),
    "neighborhood_attention_2d": _spec("pykernels.neighborhood_attention_2d", _na_params, _build_na,
                                       ("kernel_even", "kernel_larger_than_map", "dilation_zero", "kernel_negative",
                                        "rpb_shape", "spatial_mismatch", "v_tokens"),
                                       budget={"cpu": 300, "triton": 10}),
    "maxmin_matmul": _spec("pykernels.maxmin_matmul", _maxmin_params, _build_maxmin, FLOW_INVALID,
                           budget={"cpu": 300, "triton": 10}),
    "soft_maxmin_matmul": _spec("pykernels.soft_maxmin_matmul", _maxmin_params,
                                lambda c, m: _build_maxmin(c, m, soft=True), SOFT_INVALID,
                                budget={"cpu": 300, "triton": 10}),
    "attention_flow": _spec("pykernels.attention_flow", _flow_params, _build_flow,
                            MAPS_INVALID + ("mode", "tau_zero", "exact_negative"), budget={"cpu": 180, "triton": 6}),
    "attention_rollout": _spec("pykernels.attention_rollout", _flow_params, _build_rollout, MAPS_INVALID,
                               engines=("reference",), budget={"reference": 120}),
    "st_flow": _spec("pykernels.st_flow", _st_flow_params, _build_st_flow,
                     ("temporal_frames", "cross_1d", "tau_negative", "cross_int", "temporal_dtype"),
                     budget={"cpu": 180, "triton": 6}),
    "max_flow": _spec("pykernels.max_flow", _max_flow_params, _build_max_flow,
                      ("capacity_negative", "capacity_nan", "capacity_inf", "capacity_int", "capacity_length",
                       "source_eq_sink", "source_range", "sink_negative", "num_nodes_small", "edge_negative",
                       "edge_float", "num_nodes_negative", "queries_length"),
                      engines=CPU_ONLY, values=("normal", "huge", "denormal"), dtypes=("float32", "float64"),
                      budget={"cpu": 180}),
    "max_flow_layered": _spec("pykernels.max_flow_layered", _flow_params, _build_max_flow_layered,
                              ("sources_range", "sinks_negative", "maps_negative", "maps_nan", "residual_range",
                               "only_sources", "maps_int"),
                              engines=CPU_ONLY, values=("normal",), budget={"cpu": 120}),
    "CSR.from_edge_index": _spec("pykernels.CSR.from_edge_index", _csr_params, _build_csr,
                                 ("num_nodes_small", "num_nodes_negative", "num_nodes_triple", "num_nodes_float",
                                  "weight_length", "index_negative", "edge_index_1d"),
                                 engines=CPU_ONLY, values=("normal",), budget={"cpu": 180}),
    "scatter": _spec("pykernels.scatter", _scatter_params, _build_scatter,
                     ("index_range", "index_negative", "dim_range", "index_2d", "index_float", "index_length",
                      "dim_size_negative", "reduce", "src_int", "index_device", "dim_size_small"),
                     budget={"cpu": 360, "triton": 10}),
    "spmm": _spec("pykernels.spmm", _graph_params, _build_spmm,
                  GRAPH_INVALID + ("weight_length", "weight_heads", "reduce", "x_rows"),
                  budget={"cpu": 360, "triton": 10}),
    "sddmm": _spec("pykernels.sddmm", _graph_params, _build_sddmm, GRAPH_INVALID + ("features_differ", "b_dtype"),
                   budget={"cpu": 240, "triton": 8}),
    "edge_softmax": _spec("pykernels.edge_softmax", _graph_params, _build_edge_softmax,
                          tuple(x for x in GRAPH_INVALID if not x.startswith("feature"))
                          + ("scores_length", "scores_int", "no_num_targets"), budget={"cpu": 240, "triton": 8}),
    "graph_attention": _spec("pykernels.graph_attention", _graph_params, _build_graph_attention,
                             GRAPH_INVALID + ("kv_rows", "bias_length", "k_dim", "scale_str"),
                             budget={"cpu": 300, "triton": 8}),
}
for _layer in ("MultiheadAttention", "GCNConv", "GATConv", "SAGEConv", "TransformerConv", "WindowAttention",
               "SwinBlock", "MSWMSA"):
    OPS[f"nn.{_layer}"] = _spec(f"pykernels.nn.{_layer}", _nn_params, _nn_builder(_layer), engines=CPU_ONLY,
                                values=("normal", "large"), layouts=("contiguous",),
                                dtypes=("float32", "float64"), budget=NN_BUDGET)


def _build_harness_check(case, mk):
    """Cases that kill or stall the worker, for the runner's own test (never drawn by the fuzzer)."""
    import os
    import time

    def call(engine, t):
        if case["params"]["kind"] == "abort":
            os.abort()
        time.sleep(3600)
    return Built({}, call)


HARNESS_CHECKS = {"harness.check": _spec("harness.check", None, _build_harness_check, engines=())}

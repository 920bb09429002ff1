"""End-to-end models, stock against ``pk.accelerate(model)``: the same weights (a deep copy), the same inputs, the
same run. Inference models time a forward without autograd; the GNNs time one training step (forward, loss,
backward, Adam). Each row also gives the largest difference between the two models' outputs and what
``accelerate`` served, so a speed-up that comes from computing something else, or from nothing being served,
shows in the table.

Models are built from configs with random weights (nothing is downloaded). ``--quick`` keeps every model but
shrinks what only scales the cost (batch, depth, width), and says so in the case name."""
from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import pykernels as pk

from ..testing import random_graph
from .cases import Case, LazyData

FAMILY = "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    library: str  # the peer library the model comes from; the case is left out when it is not installed
    mode: str  # "fwd" or "train step"
    # (device, quick) -> (stock model, inputs); inputs() gives the call's positional and keyword arguments.
    build: Callable[[torch.device, bool], tuple[nn.Module, Callable[[], tuple[tuple, dict]]]]
    # Picks the tensor to compare out of what the model returns.
    output: Callable[[object], torch.Tensor] = lambda out: out
    # Run on each model of the pair before accelerate(): (model, accelerated?) -> None.
    prepare: Callable[[nn.Module, bool], None] | None = None
    quick_label: str = ""
    full_label: str = ""
    quick: bool = True

    def label(self, quick: bool) -> str:
        detail = self.quick_label if quick else self.full_label
        return f"{self.name} ({detail})" if detail else self.name


def _seeded(make):
    torch.manual_seed(0)
    return make()


def _timm(name: str, batch: int, image: int = 224, **kwargs):
    def build(device, quick):
        import timm

        model = _seeded(lambda: timm.create_model(name, pretrained=False, img_size=image, **kwargs)).eval()
        model = model.to(device)
        x = torch.randn(2 if quick else batch, 3, image, image, generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        return model, lambda: ((x,), {})
    return build


def _bert(device, quick):
    import transformers

    layers, batch = (4, 2) if quick else (12, 4)
    config = transformers.BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    model = _seeded(lambda: transformers.BertModel(config)).eval().to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, 512), generator=g).to(device)
    mask = torch.ones(batch, 512, dtype=torch.long, device=device)
    mask[-1, 300:] = 0  # one padded sequence: the padding-mask path, as a batch of real texts has
    return model, lambda: ((), {"input_ids": ids, "attention_mask": mask})


def _llama(device, quick):
    import transformers

    layers, tokens = (2, 512) if quick else (8, 1024)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      attn_implementation="sdpa")
    model = _seeded(lambda: transformers.LlamaForCausalLM(config)).eval().to(device)
    ids = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    return model, lambda: ((), {"input_ids": ids, "use_cache": False})


def _decoding(prefill_build):
    """A decoder's step of one generated token after the prompt that ``prefill_build`` gives, reading the
    prompt's cache: single-query attention calls, which ``accelerate`` hands back to torch under its CPU size rule."""
    def build(device, quick):
        model, prefill = prefill_build(device, quick)
        args, kwargs = prefill()
        with torch.no_grad():
            # Not .past_key_values: transformers 5.25 logs a deprecation warning for it, into the report.
            cache = model(*args, **{**kwargs, "use_cache": True}).cache
        prompt = cache.get_seq_length()
        token = kwargs["input_ids"][:, -1:]

        def inputs():
            # Each step appends to the cache; dropping that token again makes every call decode the same step.
            grown = cache.get_seq_length() - prompt
            if grown:
                cache.crop(-grown)
            return (), {"input_ids": token, "cache": cache, "use_cache": True}
        return model, inputs
    return build


# Stable Diffusion 1.5's UNet config; --quick halves the channels (so each head is half as wide), the token
# counts and head counts stay SD 1.5's.
_SD15_CHANNELS = (320, 640, 1280, 1280)


def _unet(latent: int, channels: tuple[int, ...] | None = None):
    def build(device, quick):
        import diffusers

        widths = channels or (tuple(c // 2 for c in _SD15_CHANNELS) if quick else _SD15_CHANNELS)
        model = _seeded(lambda: diffusers.UNet2DConditionModel(
            sample_size=latent, block_out_channels=widths, cross_attention_dim=768, attention_head_dim=8,
            layers_per_block=2)).eval().to(device)
        g = torch.Generator().manual_seed(1)
        sample = torch.randn(2, 4, latent, latent, generator=g).to(device)  # batch 2: classifier-free guidance
        text = torch.randn(2, 77, 768, generator=g).to(device)
        return model, lambda: ((sample, 500), {"encoder_hidden_states": text})
    return build


def _msw_msa(model: nn.Module, accelerated: bool) -> None:
    """HiDiffusion's MSW-MSA on SD 1.5's blocks. Stock: the hidiffusion package's own patched blocks (RAU-Net off);
    accelerated: :func:`pykernels.integrations.diffusers.apply_msw_msa`, the fused window kernel on the
    un-partitioned map. Both draw each block's shift from the global generator, as HiDiffusion does."""
    if accelerated:
        from ..integrations.diffusers import apply_msw_msa

        apply_msw_msa(model, "sd15")
    else:
        from ..testing import import_hidiffusion

        # apply_hidiffusion reads a pipeline's name_or_path; an unofficial name makes it go by the module names.
        model.name_or_path = "sd15-config"
        import_hidiffusion().apply_hidiffusion(model, apply_raunet=False, apply_window_attn=True)


class _GNN(nn.Module):
    def __init__(self, conv: str, features: int, hidden: int, classes: int):
        super().__init__()
        import torch_geometric.nn as pyg_nn

        if conv == "GATConv":
            heads = 4
            self.conv1 = pyg_nn.GATConv(features, hidden // heads, heads=heads)
            self.conv2 = pyg_nn.GATConv(hidden, classes, heads=1)
        else:
            self.conv1 = pyg_nn.SAGEConv(features, hidden)
            self.conv2 = pyg_nn.SAGEConv(hidden, classes)

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)


# ogbn-arxiv's size: 169,343 nodes, 1,166,243 edges, 128 features, 40 classes.
_ARXIV = (169_343, 1_166_243, 128, 40)


def _gnn(conv: str, sizes: tuple[int, int, int, int] = _ARXIV):
    def build(device, quick):
        nodes, edges, features, classes = sizes
        model = _seeded(lambda: _GNN(conv, features, 128, classes)).to(device)
        edge_index = random_graph(nodes, edges, power_law=0.8, seed=1).to(device)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(nodes, features, generator=g).to(device)
        labels = torch.randint(0, classes, (nodes,), generator=g).to(device)
        model.labels = labels
        return model, lambda: ((x, edge_index), {})
    return build


SPECS = [
    ModelSpec("timm swin_tiny_patch4_window7_224", "timm", "fwd", _timm("swin_tiny_patch4_window7_224", 8),
              quick_label="batch 2, 224²", full_label="batch 8, 224²"),
    ModelSpec("timm vit_small_patch16_224", "timm", "fwd", _timm("vit_small_patch16_224", 8),
              quick_label="batch 2, 224²", full_label="batch 8, 224²"),
    ModelSpec("transformers BERT-base encoder", "transformers", "fwd", _bert, output=lambda out: out.last_hidden_state,
              quick_label="4 of 12 layers, batch 2, 512 tokens, padding", full_label="batch 4, 512 tokens, padding"),
    ModelSpec("transformers Llama-style decoder, GQA 16/4 heads", "transformers", "fwd", _llama, output=lambda out: out.logits,
              quick_label="2 layers, prefill 512 tokens", full_label="8 layers, hidden 1024, prefill 1024 tokens"),
    ModelSpec("transformers Llama-style decoder, GQA 16/4 heads", "transformers", "fwd", _decoding(_llama),
              output=lambda out: out.logits, quick_label="2 layers, decode 1 token after 512",
              full_label="8 layers, hidden 1024, decode 1 token after 1024"),
    ModelSpec("diffusers UNet, SD 1.5 attention shapes", "diffusers", "fwd", _unet(64), output=lambda out: out.sample,
              quick_label="512², batch 2, half channels", full_label="512², batch 2"),
    ModelSpec("diffusers UNet + HiDiffusion MSW-MSA", "hidiffusion", "fwd", _unet(128), output=lambda out: out.sample,
              prepare=_msw_msa,
              quick_label="1024², batch 2, half channels", full_label="1024², batch 2", quick=False),
    ModelSpec("PyG GAT, 2 layers, hidden 128", "torch_geometric", "train step", _gnn("GATConv"),
              quick_label="ogbn-arxiv size", full_label="ogbn-arxiv size"),
    ModelSpec("PyG GraphSAGE, 2 layers, hidden 128", "torch_geometric", "train step", _gnn("SAGEConv"),
              quick_label="ogbn-arxiv size", full_label="ogbn-arxiv size"),
]

_data = LazyData()


def _pair(spec: ModelSpec, device: torch.device, quick: bool):
    """The stock model, its accelerated copy, the inputs and the accelerate report, built once per spec."""
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock, inputs = spec.build(device, quick)
            accelerated = copy.deepcopy(stock)
            if spec.prepare is not None:
                spec.prepare(stock, False)
                spec.prepare(accelerated, True)
            report = pk.accelerate(accelerated)
        optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-3) for m in (stock, accelerated)}
        return stock, accelerated, inputs, report, optimizers
    return _data.get((spec, device, quick), build)


def _runner(spec: ModelSpec, device: torch.device, quick: bool, which: int):
    def run():
        stock, accelerated, inputs, _, optimizers = _pair(spec, device, quick)
        model = accelerated if which == 0 else stock
        args, kwargs = inputs()
        if spec.mode == "fwd":
            with torch.no_grad():
                return model(*args, **kwargs)
        optimizer = optimizers[id(model)]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(spec.output(model(*args, **kwargs)), model.labels)
        loss.backward()
        optimizer.step()
        return loss
    return run


def _check(spec: ModelSpec, device: torch.device, quick: bool):
    """Largest output difference (before any timed training step changes the weights) and what was served."""
    def check():
        stock, accelerated, inputs, report, _ = _pair(spec, device, quick)
        before = report.calls.copy()
        outputs = []
        with torch.no_grad():
            for model in (accelerated, stock):
                args, kwargs = inputs()  # each call's own: a decoding step's cache changes as it runs
                # The same global RNG state for both: HiDiffusion's MSW-MSA draws its shifts from it.
                torch.manual_seed(0)
                outputs.append(spec.output(model(*args, **kwargs)))
        ours, theirs = outputs
        served = {(path, outcome): n - before[(path, outcome)] for (path, outcome), n in report.calls.items()
                  if n > before[(path, outcome)]}
        return (ours - theirs).abs().max().item(), _served_note(report, served)
    return check


def _served_note(report, calls) -> str:
    parts = [f"{report.changed} modules changed"]
    for (path, outcome), n in sorted(calls.items()):
        parts.append(f"{path} {outcome} ×{n}")
    return "; ".join(parts)


def cases(device: torch.device, quick: bool, spec_list: list[ModelSpec] | None = None) -> list[Case]:
    out = []
    for spec in SPECS if spec_list is None else spec_list:
        if (quick and not spec.quick) or importlib.util.find_spec(spec.library) is None:
            continue
        providers = {"pykernels (accelerate)": _runner(spec, device, quick, 0),
                     "stock": _runner(spec, device, quick, 1)}
        out.append(Case(FAMILY, f"{spec.label(quick)}", spec.mode, providers, check=_check(spec, device, quick),
                        interleave=True))
    return out

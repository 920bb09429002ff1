"""pykernels layers under torch.distributed: 2-process DDP (gloo, CPU) matches single-process gradients."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pykernels as pk
from pykernels.testing import random_graph

pytestmark = [pytest.mark.graph, pytest.mark.distributed]

NODES, EDGES, FEATS = 30, 120, 12


class TinyGNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = pk.nn.GCNConv(FEATS, 16)
        self.conv2 = pk.nn.GATConv(16, 8, heads=2)
        self.conv3 = pk.nn.SAGEConv(16, 4, aggr="max")

    def forward(self, x, edge_index):
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.relu(self.conv2(h, edge_index))
        return self.conv3(h, edge_index)


def _shard(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(NODES, FEATS, generator=g)
    target = torch.randn(NODES, 4, generator=g)
    return x, random_graph(NODES, EDGES, seed=rank), target


def _loss(model, rank):
    x, ei, target = _shard(rank)
    return torch.nn.functional.mse_loss(model(x, ei), target)


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyGNN())
    _loss(model, rank).backward()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "grads.pt")
        mp.spawn(_worker, args=(world, _free_port(), out_path), nprocs=world, join=True)
        ddp_grads = torch.load(out_path)
    torch.manual_seed(0)
    model = TinyGNN()
    # DDP averages gradients over ranks: the single-process equivalent is the mean of the two losses.
    (sum(_loss(model, rank) for rank in range(world)) / world).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)

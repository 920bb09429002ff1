"""torch.nn modules built on pykernels ops: PyG-compatible graph layers and torch.nn.MultiheadAttention.

Each loads the state_dict of the layer it replaces as is.
"""
from .attention import MultiheadAttention
from .gat import GATConv
from .gcn import GCNConv
from .sage import SAGEConv
from .transformer import TransformerConv

__all__ = ["GATConv", "GCNConv", "MultiheadAttention", "SAGEConv", "TransformerConv"]

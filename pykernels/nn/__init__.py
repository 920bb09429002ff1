"""torch.nn modules built on pykernels ops: PyG-compatible graph layers (load a PyG layer's state_dict as is)."""
from .gat import GATConv
from .gcn import GCNConv
from .sage import SAGEConv
from .transformer import TransformerConv

__all__ = ["GATConv", "GCNConv", "SAGEConv", "TransformerConv"]

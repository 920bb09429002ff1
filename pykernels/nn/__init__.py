"""torch.nn modules built on pykernels ops: PyG-compatible graph layers, torch.nn.MultiheadAttention, and
timm-compatible Swin window attention.

Each loads the state_dict of the layer it replaces as is.
"""
from .attention import MultiheadAttention
from .gat import GATConv
from .gcn import GCNConv
from .sage import SAGEConv
from .transformer import TransformerConv
from .window import MSWMSA, SwinBlock, WindowAttention

__all__ = ["GATConv", "GCNConv", "MSWMSA", "MultiheadAttention", "SAGEConv", "SwinBlock", "TransformerConv",
           "WindowAttention"]

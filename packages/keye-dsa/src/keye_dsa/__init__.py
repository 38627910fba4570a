"""keye-dsa: DeepSeek Sparse Attention for GQA models (DESIGN §3-§4)."""

__version__ = "0.1.0"

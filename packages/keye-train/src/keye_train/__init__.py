"""keye-train: the Keye-VL model, its processor, and Lightning trainers for every stage (DESIGN §8)."""

__version__ = "0.1.0"

"""keye-vision: native-resolution ViT, projector, image and video processing (DESIGN §6)."""

__version__ = "0.1.0"

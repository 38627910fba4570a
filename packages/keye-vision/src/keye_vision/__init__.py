"""keye-vision: native-resolution ViT, projector, image and video processing (DESIGN §6)."""

from .attention import available_backends, varlen_attention
from .config import VisionConfig
from .image import load_image, smart_resize, to_patches
from .model import KeyeViT
from .projector import Projector
from .video import VideoSample, decode_chunks, frame_sizes, load_video, sample_count, sample_indices
from .weights import LoadReport, load_prefixed, load_vision_weights

__version__ = "0.1.0"

__all__ = [
    "KeyeViT",
    "LoadReport",
    "Projector",
    "VideoSample",
    "VisionConfig",
    "available_backends",
    "decode_chunks",
    "frame_sizes",
    "load_image",
    "load_prefixed",
    "load_video",
    "load_vision_weights",
    "sample_count",
    "sample_indices",
    "smart_resize",
    "to_patches",
    "varlen_attention",
]

"""KeyeProcessor: chat messages with images and videos -> token ids, labels, M-RoPE positions, patches.

Why one class owns all of it: the number of pad tokens an image gets, the patches the vision tower
sees and the positions the decoder uses must agree exactly, or vision embeddings land on the wrong
tokens. Every image and every video frame is one ``t = 1`` item of ``(h / 28) * (w / 28)`` merged tokens;
its patches are flattened in (C, P, P) order, row-major, as ``keye_vision.KeyeViT`` reads them.

Token layout (Keye-VL-1.5): an image is ``<|vision_start|>`` + pads + ``<|vision_end|>``; a video is
``<|vision_start|>``, then per frame ``<|frame|>`` + its timestamp (``"%.1f"`` seconds) + pads (fast
frames wrapped in ``<|fast_start|>`` ... ``<|fast_end|>``), then ``<|vision_end|>``. Vision tokens are
spliced in as ids, so text around them tokenizes exactly as the whole string would (special tokens
always split a tokenizer's input).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from keye_train.chat import MediaPiece, Piece, TextPiece, render_chat
from keye_train.rope_index import rope_index
from keye_train.tokenizer import KeyeTokenizer

IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"


@dataclass
class VisionFrame:
    """One image or video frame, already resized: uint8 ``[3, H, W]`` with H, W multiples of 28."""

    pixels: torch.Tensor
    timestamp: float | None = None  # seconds, video frames only
    fast: bool = False  # a fast (low-resolution) video frame


@dataclass
class EncodedChat:
    """One conversation, ready for collation. Vision items are in token order."""

    input_ids: torch.Tensor  # long [T]
    labels: torch.Tensor  # long [T], -100 outside assistant turns
    position_ids: torch.Tensor  # long [3, T]
    rope_delta: int  # a generated token at index n gets position n + rope_delta
    pixel_values: torch.Tensor  # float [P, 3 * 14 * 14]
    grid_thw: torch.Tensor  # long [N, 3], patch grid of each vision item (t = 1)

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class ProcessorConfig:
    """Image/video budgets; ``None`` keeps keye-vision's Keye-VL-1.5 defaults."""

    patch_size: int = 14
    merge_size: int = 2
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video_fps: float = 2.0
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_total_pixels: int | None = None
    video_max_frames: int | None = None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


class KeyeProcessor:
    """Turns chat messages (OpenAI format, with image and video parts) into Keye-VL model inputs."""

    def __init__(self, tokenizer: KeyeTokenizer | None = None, config: ProcessorConfig | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else KeyeTokenizer.default()
        self.config = config if config is not None else ProcessorConfig()
        ids = self.tokenizer.ids
        self.image_token_id = ids.image_pad
        self.video_token_id = ids.video_pad
        self.pad_token_id = ids.endoftext

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> KeyeProcessor:
        """``tokenizer.json`` and ``processor_config.json`` from a checkpoint directory; the embedded
        tokenizer and the defaults for whichever is absent."""
        path = Path(path)
        tokenizer = KeyeTokenizer.from_file(path) if (path / "tokenizer.json").is_file() else None
        config = None
        if (path / PROCESSOR_CONFIG).is_file():
            raw = json.loads((path / PROCESSOR_CONFIG).read_text())
            known = {k: v for k, v in raw.items() if k in ProcessorConfig.__dataclass_fields__}
            config = ProcessorConfig(**known)
        return cls(tokenizer, config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(path)
        (path / PROCESSOR_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    # ------------------------------------------------------------------ media
    def tokens_per_frame(self, frame: VisionFrame) -> int:
        """Merged tokens the projector emits for this frame: ``(H / 28) * (W / 28)``."""
        _, height, width = frame.pixels.shape
        return (height // self.config.factor) * (width // self.config.factor)

    def load_media(self, part: Mapping[str, Any]) -> list[VisionFrame]:
        """Decode and resize one image or video part with keye-vision (Keye-VL-1.5 preprocessing).

        A video may also come pre-decoded: ``{"type": "video", "video": [uint8 [3, H, W], ...],
        "timestamps": [...], "frame_types": ["slow" | "fast", ...]}`` with frames already resized.
        """
        import keye_vision

        cfg = self.config
        if part["type"] == "image":
            options = {k: part[k] for k in ("resized_height", "resized_width") if k in part}
            for key in ("min_pixels", "max_pixels"):
                value = part.get(key, getattr(cfg, f"image_{key}"))
                if value is not None:
                    options[key] = value
            return [VisionFrame(keye_vision.load_image(part["image"], **options))]
        source = part["video"]
        if isinstance(source, (list, tuple)):
            frames, timestamps = list(source), part.get("timestamps")
            types = part.get("frame_types") or ["slow"] * len(frames)
        else:
            options = {}
            for key in ("min_pixels", "max_pixels", "total_pixels", "max_frames"):
                value = part.get(key, getattr(cfg, f"video_{key}"))
                if value is not None:
                    options[key] = value
            sample = keye_vision.load_video(source, fps=part.get("fps", cfg.video_fps), **options)
            frames, timestamps, types = list(sample.frames), list(sample.timestamps), list(sample.frame_types)
        if timestamps is None or len(timestamps) != len(frames) or len(types) != len(frames):
            raise ValueError(
                f"a video part needs one timestamp and one frame type per frame; got {len(frames)} frames, "
                f"{None if timestamps is None else len(timestamps)} timestamps, {len(types)} frame types"
            )
        return [
            VisionFrame(f, float(t), fast=(kind == "fast"))
            for f, t, kind in zip(frames, timestamps, types, strict=True)
        ]

    # ------------------------------------------------------------------ encoding
    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
    ) -> EncodedChat:
        """Render, load the media, tokenize and build labels and positions for one conversation."""
        pieces = render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        media = [self.load_media(p.part) for p in pieces if isinstance(p, MediaPiece)]
        return self.encode_pieces(pieces, media)

    def _frame_tokens(self, frame: VisionFrame, in_video: bool) -> list[int]:
        ids = self.tokenizer.ids
        pad = ids.video_pad if in_video else ids.image_pad
        out: list[int] = []
        if in_video:
            if frame.timestamp is None:
                raise ValueError("every video frame needs a timestamp (seconds)")
            out += [ids.frame, *self.tokenizer.encode(format(frame.timestamp, ".1f"))]
            if frame.fast:
                out.append(ids.fast_start)
        out += [pad] * self.tokens_per_frame(frame)
        if in_video and frame.fast:
            out.append(ids.fast_end)
        return out

    def encode_pieces(self, pieces: Sequence[Piece], media: Sequence[Sequence[VisionFrame]]) -> EncodedChat:
        """Token ids, labels, positions and patches from rendered pieces and their loaded media."""
        n_media = sum(isinstance(p, MediaPiece) for p in pieces)
        if len(media) != n_media:
            raise ValueError(f"the chat holds {n_media} image/video parts but {len(media)} were loaded")
        ids_out: list[int] = []
        labels_out: list[int] = []
        frames: list[VisionFrame] = []
        media_iter = iter(media)
        run: list[TextPiece] = []

        def flush() -> None:
            text = "".join(p.text for p in run)
            spans, at = [], 0
            for p in run:
                if p.trainable:
                    spans.append((at, at + len(p.text)))
                at += len(p.text)
            token_ids, offsets = self.tokenizer.encode_with_offsets(text)
            if self.image_token_id in token_ids or self.video_token_id in token_ids:
                raise ValueError(
                    "message text contains a literal <|image_pad|> or <|video_pad|> token; images and videos "
                    "must be given as content parts, not written into the text"
                )
            ids_out.extend(token_ids)
            labels_out.extend(
                tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                for tok, (start, _) in zip(token_ids, offsets)
            )
            run.clear()

        vid = self.tokenizer.ids
        for piece in pieces:
            if isinstance(piece, TextPiece):
                run.append(piece)
                continue
            flush()
            item_frames = list(next(media_iter))
            if not item_frames:
                raise ValueError(f"a {piece.kind} part produced no frames")
            if piece.kind == "image" and len(item_frames) != 1:
                raise ValueError(f"an image part must load as one frame; got {len(item_frames)}")
            tokens = [vid.vision_start]
            for frame in item_frames:
                tokens += self._frame_tokens(frame, in_video=piece.kind == "video")
            tokens.append(vid.vision_end)
            ids_out.extend(tokens)
            labels_out.extend([IGNORE_INDEX] * len(tokens))
            frames.extend(item_frames)
        flush()

        input_ids = torch.tensor(ids_out, dtype=torch.long)
        merged = [
            (f.pixels.shape[1] // self.config.factor, f.pixels.shape[2] // self.config.factor) for f in frames
        ]
        positions, delta = rope_index(input_ids, merged, (self.image_token_id, self.video_token_id))
        if frames:
            from keye_vision import to_patches

            pixel_values, grid_thw = to_patches(
                [f.pixels for f in frames], self.config.patch_size, self.config.merge_size
            )
        else:
            pixel_values = torch.zeros(0, 3 * self.config.patch_size**2)
            grid_thw = torch.zeros(0, 3, dtype=torch.long)
        return EncodedChat(
            input_ids=input_ids,
            labels=torch.tensor(labels_out, dtype=torch.long),
            position_ids=positions,
            rope_delta=delta,
            pixel_values=pixel_values,
            grid_thw=grid_thw,
        )

    # ------------------------------------------------------------------ batching
    def collate(
        self,
        samples: Sequence[EncodedChat],
        *,
        packing: bool = False,
        padding_side: str = "left",
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch encoded chats: padded to ``[B, T]`` with ``attention_mask``, or packed into ``[1, sum T]``
        with ``cu_seqlens`` (int32, ``[B + 1]``). Padding goes on the left by default: the one layout every
        attention backend (DSA included) and cached generation accept. Positions are ``[3, B, T]``; the
        vision items of all samples are concatenated in token order (``pixel_values``, ``grid_thw``)."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        vision = {
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
            "grid_thw": torch.cat([s.grid_thw for s in samples]),
            "rope_deltas": torch.tensor([s.rope_delta for s in samples], dtype=torch.long),
        }
        if packing:
            lengths = torch.tensor([len(s) for s in samples])
            cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lengths, 0)
            labels = torch.cat([s.labels for s in samples])
            labels[cu[:-1].long()] = IGNORE_INDEX  # no sequence predicts across a boundary
            return {
                "input_ids": torch.cat([s.input_ids for s in samples])[None],
                "labels": labels[None],
                "position_ids": torch.cat([s.position_ids for s in samples], dim=1)[:, None],
                "cu_seqlens": cu,
                **vision,
            }
        length = max(len(s) for s in samples)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        position_ids = torch.zeros(3, batch, length, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s)
            cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[b, cols] = s.input_ids
            labels[b, cols] = s.labels
            attention_mask[b, cols] = 1
            position_ids[:, b, cols] = s.position_ids
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **vision,
        }

    def __call__(
        self,
        conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        packing: bool = False,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """One conversation (a list of messages) or a batch of them -> a collated batch."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]  # type: ignore[list-item]
        samples = [
            self.encode_chat(
                c,  # type: ignore[arg-type]
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
            )
            for c in conversations
        ]
        return self.collate(samples, packing=packing, padding_side=padding_side)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

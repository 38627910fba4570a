"""KeyeVLForConditionalGeneration: vision tower -> projector -> token embeddings -> MoE decoder.

The tower and the decoder come from the plugin registries (``keye_vision_encoders``,
``keye_decoders``; DESIGN §2), so a third-party package can swap either. The decoder's ``model`` and
``lm_head`` are registered directly on this module, so ``state_dict()`` already uses the released
checkpoint names of DESIGN §7 (``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``, ``lm_head.*``);
the decoder object itself is kept as a plain attribute that shares those submodules and runs them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from keye_train.config import KeyeVLConfig
from keye_train.registry import component


class VisionTower(nn.Module):
    """Holds the encoder under ``vision_model`` (the released ``visual.vision_model.*`` names)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.vision_model = encoder

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values, grid_thw)


def vision_runs(is_vision: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of vision tokens in ``is_vision [B, T]``, in row-major order."""
    flat = torch.nn.functional.pad(is_vision, (1, 1)).to(torch.int8)
    edges = flat.diff(dim=1)
    starts = (edges == 1).nonzero()
    ends = (edges == -1).nonzero()
    return ends[:, 1] - starts[:, 1]


class TextDeltas:
    """A ``generate`` streamer that turns row 0's new tokens into text deltas for ``on_text``.

    A byte-level token can end inside a multi-byte character, which decodes to U+FFFD until later tokens
    complete it, so text is held back while the decode ends in U+FFFD. Only a short window is decoded
    each step (the tokens of the last delta, for context, and the unsent ones), so the cost stays linear
    in the reply's length; for byte-level BPE (Qwen's) the deltas concatenate to the decode of all the
    tokens. ``close`` releases whatever is still held at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None]):
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window starts at ``prefix``; tokens before ``read`` were sent

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        self._send(final=False)

    def close(self) -> None:
        self._send(final=True)

    def _send(self, final: bool) -> None:
        sent = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(sent) and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(sent) :])
            self.prefix, self.read = self.read, len(self.ids)


class KeyeVLForConditionalGeneration(nn.Module):
    """The Keye-VL model. ``forward(**processor_batch)`` trains; ``generate`` and ``chat`` decode."""

    def __init__(self, config: KeyeVLConfig):
        super().__init__()
        self.config = config
        encoder = component("keye_vision_encoders", "vision encoder", config.vision_encoder)(
            config.vision_config
        )
        decoder = component("keye_decoders", "decoder", config.decoder)(config.text_config)
        children = {name for name, _ in decoder.named_children()}
        direct = [n for n, _ in decoder.named_parameters(recurse=False)] + [
            n for n, _ in decoder.named_buffers(recurse=False)
        ]
        if children != {"model", "lm_head"} or direct:
            raise TypeError(
                f"decoder {config.decoder!r} must hold exactly the submodules 'model' and 'lm_head' and no "
                f"parameters of its own (the checkpoint layout); it has submodules {sorted(children)} and "
                f"direct tensors {direct}"
            )
        self.visual = VisionTower(encoder)
        from keye_vision import Projector

        vision = config.vision_config
        self.mlp_AR = Projector(vision.hidden_size, config.hidden_size, vision.spatial_merge_size)
        self.model = decoder.model
        self.lm_head = decoder.lm_head
        self.__dict__["decoder"] = decoder  # shares model/lm_head; not registered twice

    decoder: nn.Module

    def train(self, mode: bool = True) -> KeyeVLForConditionalGeneration:
        super().train(mode)
        self.decoder.training = mode  # its children are ours and already switched
        return self

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each vision and decoder layer in the backward pass instead of storing activations."""
        self.visual.vision_model.gradient_checkpointing = enable
        self.decoder.gradient_checkpointing = enable

    # ------------------------------------------------------------------ embeddings
    def vision_embeddings(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[sum_i h_i * w_i / 4, hidden]``: tower then projector, items in ``grid_thw`` order."""
        dtype = next(self.mlp_AR.parameters()).dtype
        features = self.visual(pixel_values.to(dtype), grid_thw)
        return self.mlp_AR(features, grid_thw)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each vision item's embeddings scattered over its run of pad tokens."""
        embeds = self.model.embed_tokens(input_ids)
        is_vision = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        n_pads = int(is_vision.sum())
        has_pixels = pixel_values is not None and pixel_values.numel() > 0
        if not has_pixels:
            if n_pads:
                raise ValueError(
                    f"input_ids hold {n_pads} image/video pad tokens but no pixel_values were given"
                )
            return embeds
        if grid_thw is None:
            raise ValueError("pixel_values need grid_thw [num_items, 3] (one row per image or video frame)")
        merge = self.config.vision_config.spatial_merge_size
        per_item = (grid_thw.prod(-1) // merge**2).tolist()
        runs = vision_runs(is_vision).tolist()
        if runs != per_item:
            raise ValueError(
                f"input_ids hold vision pad runs of lengths {runs} (total {n_pads}) but grid_thw "
                f"{grid_thw.tolist()} makes the projector emit {per_item} (total {sum(per_item)}) "
                "embeddings; "
                "each image or frame needs exactly (h/14/2)*(w/14/2) pad tokens, in the same order"
            )
        vision = self.vision_embeddings(pixel_values, grid_thw).to(embeds.dtype)
        return embeds.masked_scatter(is_vision[..., None], vision)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        rope_deltas: torch.Tensor | None = None,
        **decoder_kwargs: Any,
    ):
        """Run the model on a ``KeyeProcessor`` batch (``model(**batch)``); returns the decoder's output
        (``.logits``, ``.loss``, ``.aux_loss``, ``.aux_losses``). ``rope_deltas`` is only for decoding."""
        del rope_deltas
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError(
                    "pass input_ids [B, T] (with pixel_values for images/videos) or inputs_embeds"
                )
            inputs_embeds = self.embed(input_ids, pixel_values, grid_thw)
            if position_ids is None:
                position_ids = self.position_ids(input_ids, grid_thw, attention_mask, cu_seqlens)
        return self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            labels=labels,
            **decoder_kwargs,
        )

    def position_ids(
        self,
        input_ids: torch.Tensor,
        grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions ``[3, B, T]`` for a batch the processor did not annotate (see ``rope_index``)."""
        from keye_train.rope_index import rope_index

        merge = self.config.vision_config.spatial_merge_size
        grids = [] if grid_thw is None else [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]
        pads = (self.config.image_token_id, self.config.video_token_id)
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        cpu_ids = input_ids.cpu()
        rows: list[tuple[int, slice]] = []
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            rows = [(0, slice(a, b)) for a, b in itertools.pairwise(bounds)]
        else:
            for b in range(input_ids.shape[0]):
                if attention_mask is None:
                    rows.append((b, slice(0, input_ids.shape[1])))
                else:
                    real = attention_mask[b].nonzero().flatten()
                    rows.append((b, slice(int(real[0]), int(real[-1]) + 1) if real.numel() else slice(0, 0)))
        used = 0
        for b, cols in rows:
            ids = cpu_ids[b, cols]
            n = int(((ids == pads[0]) | (ids == pads[1])).sum())
            mine, count = [], 0
            while count < n:
                mine.append(grids[used + len(mine)])
                count += mine[-1][0] * mine[-1][1]
            positions, _ = rope_index(ids, mine, pads)
            out[:, b, cols] = positions.to(out.device)
            used += len(mine)
        return out

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        strict: bool = True,
        attn_implementation: str | None = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> KeyeVLForConditionalGeneration:
        """Load a composite checkpoint folder (DESIGN §7); ``model.load_report`` says what was loaded,
        ignored, missing (non-strict) and whether the DSA indexers started fresh. ``attn_implementation``
        (``sdpa``, ``dsa``, ...) overrides the decoder's attention backend; ``config_overrides`` change
        the checkpoint's config (``KeyeVLConfig.replace`` arguments) before the model is built."""
        from keye_train.checkpoint import load_pretrained

        return load_pretrained(
            cls,
            path,
            dtype=dtype,
            device=device,
            strict=strict,
            attn_implementation=attn_implementation,
            config_overrides=config_overrides,
        )

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        processor: Any = None,
        max_shard_size: int | str = "5GB",
        expert_format: str = "per_expert",
    ) -> None:
        """Write sharded safetensors, the index and ``config.json`` (plus the processor's files)."""
        from keye_train.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, expert_format=expert_format)
        if processor is not None:
            processor.save_pretrained(path)

    @staticmethod
    def parameter_counts(config: KeyeVLConfig) -> dict[str, int]:
        """Parameters per part (``vision``, ``projector``, ``decoder``, ``total``), counted on the meta
        device: instant even for the 30B preset, and no memory is allocated."""
        with torch.device("meta"):
            model = KeyeVLForConditionalGeneration(config)
        counts = {
            "vision": sum(p.numel() for p in model.visual.parameters()),
            "projector": sum(p.numel() for p in model.mlp_AR.parameters()),
            "decoder": sum(p.numel() for p in model.decoder.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        rope_deltas: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New tokens ``[B, n]`` for a left-padded ``KeyeProcessor`` batch (``model.generate(**batch)``).

        The prompt (text, images, video frames) is embedded once and prefilled with its M-RoPE
        positions; decoding then runs the decoder's cached loop (KV cache, plus the DSA index cache when
        DSA is on), each new token at one past the largest position so far. Options (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``stop_strings`` with ``decode``,
        ``eos_token_id``, ``use_cache``, ``streamer``...) are the decoder's ``generate``'s.
        """
        del labels, rope_deltas
        if attention_mask is not None and bool(attention_mask[:, -1].eq(0).any()):
            raise ValueError("generate needs left-padded prompts; collate them with padding_side='left'")
        embeds = self.embed(input_ids, pixel_values, grid_thw)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, grid_thw, attention_mask)
        return self.decoder.generate(
            None,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **generate_kwargs,
        )

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        processor: Any = None,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool = True,
        max_new_tokens: int = 512,
        stream: Callable[[str], None] | None = None,
        **generate_kwargs: Any,
    ) -> str:
        """One call from chat messages (text, images, videos; OpenAI format) to the reply text.

        Tool calls and thinking stay in the text (``<tool_call>...</tool_call>``, ``<think>...</think>``)
        for the caller to parse; chat control tokens are dropped. ``stream``, when given, receives the
        reply's text deltas while it is generated (see ``TextDeltas``); they concatenate to the returned
        text. ``processor`` defaults to the embedded tokenizer's ``KeyeProcessor``, which only fits the
        ``tiny`` vocabulary."""
        from keye_train.processor import KeyeProcessor

        processor = processor if processor is not None else KeyeProcessor()
        vocab = self.config.text_config.vocab_size
        if len(processor.tokenizer) > vocab:
            raise ValueError(
                f"the processor's tokenizer ({processor.tokenizer.source}) has {len(processor.tokenizer)} "
                f"tokens but the model's vocabulary has {vocab}; pass the checkpoint's "
                "KeyeProcessor.from_pretrained(...)"
            )
        if generate_kwargs.get("stop_strings") and "decode" not in generate_kwargs:
            generate_kwargs["decode"] = processor.decode
        batch = processor(messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking)
        device = next(self.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        deltas = None
        if stream is not None:
            if "streamer" in generate_kwargs:
                raise ValueError("chat takes stream= (text deltas) or streamer= (token ids), not both")
            deltas = generate_kwargs["streamer"] = TextDeltas(processor.decode, stream)
        new = self.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        if deltas is not None:
            deltas.close()
        return processor.decode(new[0])

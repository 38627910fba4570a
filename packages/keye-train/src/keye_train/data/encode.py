"""The default sample encoder: ``KeyeProcessor`` for one chat, and its packing collation for a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ProcessorEncoder:
    """Adapts a ``KeyeProcessor`` to the data pipeline (picklable, so it runs in worker processes)."""

    def __init__(self, processor: Any):
        self.processor = processor

    @classmethod
    def build(cls, path: str | None = None, **options: Any) -> ProcessorEncoder:
        """From a checkpoint folder (``tokenizer.json``, ``processor_config.json``) or the embedded
        tokenizer; ``options`` override ``ProcessorConfig`` fields (e.g. ``video_max_pixels``)."""
        import dataclasses

        from keye_train.processor import KeyeProcessor, ProcessorConfig

        processor = KeyeProcessor.from_pretrained(path) if path else KeyeProcessor()
        unknown = set(options) - {f.name for f in dataclasses.fields(ProcessorConfig)}
        if unknown:
            raise ValueError(
                f"unknown processor option(s) {sorted(unknown)}; see keye_train.processor.ProcessorConfig"
            )
        processor.config = dataclasses.replace(processor.config, **options)
        return cls(processor)

    def encode(self, messages: list[dict[str, Any]]) -> Any:
        return self.processor.encode_chat(messages)

    def collate(self, samples: Sequence[Any]) -> dict[str, Any]:
        return self.processor.collate(samples, packing=True)

    def encode_prompt(self, messages: list[dict[str, Any]]) -> Any:
        """The conversation up to the assistant's turn, ready for generation (thinking off)."""
        return self.processor.encode_chat(messages, add_generation_prompt=True, enable_thinking=False)

    def collate_prompts(self, samples: Sequence[Any]) -> dict[str, Any]:
        return self.processor.collate(samples, padding_side="left")

    def decode(self, ids: Any) -> str:
        return self.processor.decode(ids)

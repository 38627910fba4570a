"""Autoregressive decoding with the KV cache: greedy or sampled, stop ids and stop strings, ragged batches.

Prompts of different lengths are left-padded (``attention_mask`` marks real tokens); each row stops on
its own and is padded with ``pad_token_id`` afterwards. Stop strings need a ``decode`` callback (ids ->
text) because keye-moe has no tokenizer. A ``streamer`` callback sees each step's new tokens as they are
picked, for showing or serving a reply token by token. ``use_cache=False`` recomputes the full forward
every step: the slow path the tests compare the cache against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from keye_moe.cache import KVCache

if TYPE_CHECKING:
    from keye_moe.model import KeyeMoeForCausalLM


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token ``[B]`` from last-position logits ``[B, V]``."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def generate(
    model: KeyeMoeForCausalLM,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Return the new tokens ``[B, n]`` (n <= max_new_tokens; rows that stopped early are padded).

    The prompt is ``input_ids [B, T]`` or ``inputs_embeds [B, T, hidden]`` (the VLM's path, with M-RoPE
    ``position_ids [3, B, T]``), left-padded with ``attention_mask`` when rows differ in length. A row
    stops after emitting ``eos_token_id`` (default: the config's) or any of ``stop_token_ids``, or once
    ``decode(new_ids)`` contains one of ``stop_strings``; the stop token or string stays in the output.

    ``streamer(tokens)``, when given, is called once per decoding step with that step's new tokens ``[B]``
    (never with prompt tokens), exactly the column appended to the result: the step that emits a stop id
    or completes a stop string is streamed, rows that stopped earlier get ``pad_token_id``, and no call
    follows the step after which every row has stopped. The streamed columns stacked equal the result.
    """
    cfg = model.config
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode= (a callable turning token ids into text)")
    stops = set(_as_list(eos_token_id if eos_token_id is not None else cfg.eos_token_id)) | set(
        _as_list(stop_token_ids)
    )
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    )
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt is None:
        raise ValueError("generate needs input_ids [B, T] or inputs_embeds [B, T, hidden]")
    b, t = prompt.shape[:2]
    device = prompt.device
    mask = (
        attention_mask.to(torch.bool)
        if attention_mask is not None
        else torch.ones(b, t, dtype=torch.bool, device=device)
    )
    cache = KVCache(cfg.num_hidden_layers, capacity=t + max_new_tokens) if use_cache else None
    out = model(
        input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        logits_to_keep=1,
        compute_aux_loss=False,
    )
    positions = (
        position_ids if position_ids is not None else model._positions(None, b, t, device, None, mask, None)
    )
    next_pos = (positions if positions.dim() == 2 else positions.amax(0)).amax(-1) + 1
    embeds = inputs_embeds
    ids = input_ids
    new_tokens: list[torch.Tensor] = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    texts_done = [False] * b
    for step in range(max_new_tokens):
        token = sample_next(
            out.logits[:, -1],
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if streamer is not None:
            streamer(token)
        if stops:
            done |= torch.isin(token, torch.tensor(sorted(stops), device=device))
        if stop_strings:
            rows = torch.stack(new_tokens, 1).tolist()
            for r in range(b):
                if not texts_done[r] and not bool(done[r]):
                    text = decode(rows[r])  # type: ignore[misc]
                    texts_done[r] = any(s in text for s in stop_strings)
            done |= torch.tensor(texts_done, device=device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        step_pos = next_pos[:, None]
        if positions.dim() == 3:
            step_pos = step_pos[None].expand(3, b, 1)
        next_pos = next_pos + 1
        if cache is not None:
            out = model(token[:, None], position_ids=step_pos, cache=cache, compute_aux_loss=False)
            continue
        # uncached: rerun the whole sequence so far
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], 1)
        positions = torch.cat([positions, step_pos], -1)
        if embeds is not None:
            embeds = torch.cat([embeds, model.model.embed_tokens(token[:, None])], 1)
        else:
            ids = torch.cat([ids, token[:, None]], 1)  # type: ignore[list-item]
        out = model(
            ids if embeds is None else None,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=1,
            compute_aux_loss=False,
        )
    if not new_tokens:
        return torch.empty(b, 0, dtype=torch.long, device=device)
    return torch.stack(new_tokens, 1)

"""M-RoPE position ids as Keye-VL-1.5 builds them (DESIGN §3).

Text tokens carry three equal rows that count up by one. A vision item (an image, or one video frame:
every frame is its own ``t = 1`` grid, time being told by the timestamp text before it) of merged size
``h x w`` takes positions ``(s, s + i, s + j)`` for its token at row ``i``, column ``j``, where ``s`` is
the position the next text token would have had; text after it resumes at one past the largest
position used so far. This is Qwen2-VL's ``get_rope_index`` with every grid split into frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vision_positions(start: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Positions ``[3, h * w]`` of one merged ``t = 1`` grid, row-major, starting at ``start``."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + start


def rope_index(
    input_ids: Sequence[int] | torch.Tensor,
    grids: Sequence[tuple[int, int]],
    vision_token_ids: Sequence[int],
) -> tuple[torch.Tensor, int]:
    """Positions ``[3, T]`` for one sequence, and the decode offset ``delta``.

    ``grids`` lists the merged ``(h, w)`` of each vision item in order of appearance; each item's
    ``h * w`` tokens are the next run of ``vision_token_ids`` in ``input_ids``. A generated token at
    sequence index ``n`` later gets position ``n + delta`` in all three rows.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    is_vision = torch.isin(ids, torch.as_tensor(list(vision_token_ids), dtype=ids.dtype))
    vision_at = is_vision.nonzero().flatten().tolist()
    expected = sum(h * w for h, w in grids)
    if len(vision_at) != expected:
        raise ValueError(
            f"input_ids hold {len(vision_at)} vision pad tokens but the grids {list(grids)} need {expected}"
        )
    spans: list[torch.Tensor] = []
    cursor = 0  # next token index to place
    next_pos = 0  # next text position
    used = 0  # vision tokens consumed
    for h, w in grids:
        start = vision_at[used]
        if start > cursor:
            spans.append(torch.arange(next_pos, next_pos + start - cursor).expand(3, -1))
            next_pos += start - cursor
        n = h * w
        if vision_at[used + n - 1] != start + n - 1:
            raise ValueError(
                f"the vision item with merged grid {h}x{w} starting at token {start} needs {n} contiguous "
                "pad tokens; the run is interrupted"
            )
        block = vision_positions(next_pos, h, w)
        spans.append(block)
        next_pos = int(block.max()) + 1
        cursor = start + n
        used += n
    if cursor < ids.numel():
        spans.append(torch.arange(next_pos, next_pos + ids.numel() - cursor).expand(3, -1))
        next_pos += ids.numel() - cursor
    positions = torch.cat(spans, dim=1) if spans else torch.zeros(3, 0, dtype=torch.long)
    return positions, next_pos - ids.numel()

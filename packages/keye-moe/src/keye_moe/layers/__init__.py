"""Building blocks of the decoder: normalization, rotary embeddings, attention, MoE."""

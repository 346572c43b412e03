"""Everything that touches the host's cross-attention: per-stage K/V context swap, map capture."""

"""Command-line batch work without a ComfyUI server (see docs/batch.md)."""

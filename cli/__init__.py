"""Command-line batch work without a ComfyUI server (see README "Many identities")."""

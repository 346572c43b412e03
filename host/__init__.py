"""Bridges from the ComfyUI-free core to ComfyUI objects (CLIP, MODEL, VAE). Imports comfy lazily."""

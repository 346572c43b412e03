"""ComfyUI-free core of SeFi-IDE: token generator, stage mapping, losses, identity files, training loop."""

"""Photos and ComfyUI IMAGE / MASK -> the (1,3,R,R) reference the training loop takes, with clear errors."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import SeFiError

MIN_SIDE = 64
MAX_SIDE = 4096
_INPUT_FOLDER_LOCK = threading.Lock()


def read_photo(path: str | Path) -> torch.Tensor:
    """A photo file anywhere -> IMAGE (1,H,W,3): the pixels the host's own Load Image gives for it.

    The host's decoder is used, not a copy of it: Load Image changed under us (0.28 decodes with PyAV: other JPEG
    pixels, 16-bit PNGs read properly), and the batch command must learn what a graph on the same host learns.
    Load Image reads only inside ComfyUI's input folder (0.28+ refuses other paths), so for this call that folder is
    the photo's own. A photo that cannot be decoded gets an error naming the file and what is wrong.
    """
    import folder_paths

    import nodes as comfy_nodes

    photo = Path(path).expanduser().resolve()  # relative paths: from the caller's folder, not ComfyUI's input
    if not photo.is_file():
        raise SeFiError(f"Photo '{photo}' does not exist or is not a file.")
    with _INPUT_FOLDER_LOCK:
        before = folder_paths.get_input_directory()
        folder_paths.set_input_directory(str(photo.parent))
        try:
            image = comfy_nodes.LoadImage().load_image(photo.name)[0]
        except Exception as exc:  # PIL / PyAV raise many types: OSError, ValueError, av.error.*, SyntaxError, ...
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise SeFiError(f"Photo '{photo}' cannot be read ({reason}): the file is damaged, cut short or not an "
                            f"image. Open and re-save it as PNG or JPEG, or replace it.") from exc
        finally:
            folder_paths.set_input_directory(before)
    if image.shape[0] != 1:
        raise SeFiError(f"Photo '{photo}' holds {image.shape[0]} frames; save the frame with the face as a still "
                        f"PNG or JPEG.")
    return image


def prepare_reference(image: torch.Tensor, mask: torch.Tensor | None, resolution: int):
    """IMAGE (B,H,W,C) -> (1,3,R,R) in [0,1], resized on the short side and centre-cropped.

    Grayscale is repeated to RGB and alpha is dropped; MASK (H,W) or (B,H,W) follows the same crop.
    """
    if image is None or image.ndim != 4:
        raise SeFiError("Expected one IMAGE (a batch of 1). Connect a Load Image node.")
    if image.shape[0] != 1:
        raise SeFiError(f"Got a batch of {image.shape[0]} images; SeFi-IDE learns from ONE face photo. "
                        f"Pick one with an 'ImageFromBatch' node.")
    h, w, c = image.shape[1:]
    if min(h, w) < MIN_SIDE:
        raise SeFiError(f"The image is {w}x{h} px; use a face photo of at least {MIN_SIDE}x{MIN_SIDE} px "
                        f"(512 px or more gives the best identity).")
    if max(h, w) > MAX_SIDE:
        raise SeFiError(f"The image is {w}x{h} px; downscale it to at most {MAX_SIDE} px with an 'Upscale Image' "
                        f"node first.")
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise SeFiError(f"The image has {c} channels; expected RGB (3), RGBA (4) or grayscale (1).")
    pixels = image.float().clamp(0, 1)
    if (pixels.amax(dim=(1, 2)) - pixels.amin(dim=(1, 2))).max() < 1e-3:  # flat in every channel
        raise SeFiError("The image is blank (a single flat colour). Connect a photo of a face.")
    x = pixels.permute(0, 3, 1, 2)
    m = None
    if mask is not None:
        m = mask.float()
        m = m.reshape(1, 1, *m.shape[-2:]) if m.ndim in (2, 3) and (m.ndim == 2 or m.shape[0] == 1) else None
        if m is None or m.shape[-2:] != (h, w):
            raise SeFiError(f"The MASK must be one {w}x{h} mask matching the image.")
        if m.sum() < 1:
            raise SeFiError("The MASK is empty; paint the face region or disconnect the mask.")
    return _square(x, resolution), (_square(m, resolution) if m is not None else None)


def _square(x: torch.Tensor, resolution: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[..., top: top + resolution, left: left + resolution].clamp(0, 1).contiguous()

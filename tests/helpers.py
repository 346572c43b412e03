"""Shared test helpers: identities from real vocabulary rows, sampling, stage maths (in-process tests) and
queueing prompts over the server's HTTP API (server tests)."""
from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# float32 results of the same computation batched differently, or on another CPU / thread count: relative + absolute
CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, **CLOSE)


def assert_same_identity(got, expected, base: dict[str, torch.Tensor]) -> None:
    """Equal to float tolerance, measured against how far the tokens moved: Adam divides each gradient element by its
    own size, so float-level differences in elements whose gradient is near zero become visible in those elements
    (measured: at most 0.13 % of the distance moved per token on the tiny models)."""
    for enc in expected.k:
        for table in ("k", "v"):
            a, b = getattr(got, table)[enc], getattr(expected, table)[enc]
            moved = (b - base[enc]).norm(dim=-1)
            assert ((a - b).norm(dim=-1) <= 0.01 * moved + 1e-6).all(), (enc, table, (a - b).norm(dim=-1), moved)


class OpCounter(TorchDispatchMode):
    """How many times each torch op (by name) is dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def random_identity(clip, stages=5, seed=0, placeholder="<alice>"):
    """Tokens drawn from the real vocabulary rows, per encoder, different for every stage and for K/V."""
    from sefi_ide.core.identity import Identity
    from sefi_ide.host.text import detect_family

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1000, 40000, (2, stages), generator=g)
    k, v = {}, {}
    for enc in ("clip_l", "clip_g"):
        if hasattr(clip.cond_stage_model, enc):
            table = getattr(clip.cond_stage_model, enc).transformer.get_input_embeddings().weight
            k[enc], v[enc] = table[idx[0]].float().clone(), table[idx[1]].float().clone()
    return Identity(family=detect_family(clip), placeholder=placeholder, init_word="person", k=k, v=v)


def sample(model, clip, positive, sampler="euler", scheduler="normal", steps=6, batch=1, seed=1, cfg=5.0,
           negative=None):
    import comfy.sample

    if negative is None:
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True)


def expected_stage(model, sigmas: torch.Tensor, stages: int) -> list[int]:
    # independent of the pack: nearest discrete timestep of each sigma, then floor(t*S/1000)
    log_sigmas = model.get_model_object("model_sampling").sigmas.log()
    t = (sigmas.log()[:, None] - log_sigmas[None]).abs().argmin(dim=1)
    return [min(stages - 1, int(x) * stages // 1000) for x in t]


def photo() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 96, 80, 3, generator=g) * 0.3
    img[:, 20:70, 20:60] += 0.6  # a bright "face" blob
    return img.clamp(0, 1)


def attn2_probe(records: list):
    """An attn2 patch that records what cross-attention will use (install it after ours)."""

    def probe(n, context, value, extra):
        records.append((extra["sigmas"].clone(), list(extra["cond_or_uncond"]), context.clone(), value.clone()))
        return n, context, value

    return probe


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wait_for_prompt(server: dict, prompt_id: str, timeout: float = 600) -> dict:
    """The prompt's /history entry once it has finished (successfully or not)."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = requests.get(f"{server['url']}/history/{prompt_id}", timeout=30).json()
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def run_prompt(server: dict, graph: dict, timeout: float = 600) -> dict:
    """POST an API-format graph to /prompt and return its /history entry when it has finished."""
    import requests

    r = requests.post(f"{server['url']}/prompt", json={"prompt": graph, "client_id": str(uuid.uuid4())}, timeout=30)
    assert r.ok, r.text
    return wait_for_prompt(server, r.json()["prompt_id"], timeout)

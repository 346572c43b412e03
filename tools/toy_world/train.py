"""Trains the toy SD1 checkpoint's weights on the toy world (issue 24 item 2): the slim UNet and the text rows.

    OMP_NUM_THREADS=1 ~/.cache/sefi-ide/venv/bin/python -m tools.toy_world.train --steps 6000 \\
        --out tools/toy_world/toy_sd1.safetensors

Everything runs on one CPU thread without ComfyUI, on exactly what the built checkpoint computes inside ComfyUI:
latents from the analytic VAE (vae.encode; tests check it equals the VAE run by ComfyUI), the slim UNet (equal to
its zero-padded export, all 8 of SD1's heads in use), the slim text encoder (text.py: CLIP-scale rows, positions, one
causal layer), SD1's noise schedule and epsilon-prediction. A share --no-subject of the pictures shows no head
(captions "a photo of a ball, on the left, at night" or "a photo, at night"), so "face" and "person" mean a head;
captions leave out each attribute with probability --omit, every identity attribute with probability --no-identity
(then only "person" says a head is there) and are empty with probability --empty (the unconditional prompt for
classifier-free guidance), so a prompt may name any subset.
With --localise w (world v2) the loss adds w x (1 - the share of the subject words' ("face", "person") cross-attention
that falls on the head), over every layer and head, for the pictures with a subject whose caption names it: SD learns
from its data that "person" looks at the person, but every toy subject caption opens with the same words, which carry
no place unless told (FastComposer trains its localisation the same way, from segmentation masks). --attn-lr speeds
up the cross-attention queries and keys (10-channel heads at the shell's 1/sqrt(40) start with small logits).
Progress is measured the issue's way: pictures sampled from full captions of trained identities, read back by the
reader, share of attributes right (and how often the subject-less captions draw no head). The run resumes from
--state after an interruption.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import vae
from .attributes import ATTRIBUTES, IDENTITY_ATTRIBUTES, SUBJECT_PROMPT, Scene
from .checkpoint import load_notes, save_trained
from .grounding import grounded_words, grounding_loss, region_cover, scene_cells
from .reader import Reader, agreement, subject_present, visible
from .render import LABEL_SUBJECT, render
from .text import POSITION_INIT_STD, TextConfig, TextEncoder
from .tokens import load_token_ids, tokenize
from .unet import SlimConfig, SlimUNet
from .world import caption, scene_caption, scenes, trained_identities

DATA_VERSION = 2
CACHE = Path.home() / ".cache" / "sefi-ide" / "toy-world"


# --- SD1's noise schedule (ComfyUI's ModelSamplingDiscrete for SD15: scaled linear betas) ---------------------------
def alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# --- data -----------------------------------------------------------------------------------------------------------
def latent_set(count: int, seed: int, no_subject: float, log=print) -> tuple[torch.Tensor, list[Scene]]:
    """Latents (count x 4 x 16 x 16, before SD1's scale) of renders of trained identities and their scenes; cached."""
    path = CACHE / f"latents-v{DATA_VERSION}-{seed}-{count}-{no_subject}.pt"
    if path.exists():
        data = torch.load(path, weights_only=False)
        return data["latents"], data["scenes"]
    latents, chosen, start = [], [], time.time()
    for i, scene in enumerate(scenes(seed, count, trained_identities(), no_subject=no_subject)):
        pixels = torch.from_numpy(render(scene).image).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents.append(vae.encode(pixels)[0].half())
        chosen.append(scene)
        if (i + 1) % 2000 == 0:
            log(f"rendered {i + 1}/{count} ({time.time() - start:.0f} s)")
    data = {"latents": torch.stack(latents), "scenes": chosen}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data["latents"], data["scenes"]


def training_caption(scene: Scene, rng: np.random.Generator, omit: float, empty: float, no_identity: float) -> str:
    if rng.random() < empty:
        return ""
    left_out = [a for a in ATTRIBUTES if rng.random() < omit]
    if scene.subject and rng.random() < no_identity:
        left_out += list(IDENTITY_ATTRIBUTES)
    return scene_caption(scene, omit=left_out)


# --- where the subject words look (world v2's localisation term) ---------------------------------------------------

def subject_grid(scene: Scene, memo: dict[int, torch.Tensor], key: int) -> torch.Tensor:
    """The share of each latent cell (16 x 16, flattened) that the subject's head covers, from the scene's render
    (its label cells, memoised in `memo` under `key`, shared with the grounding term)."""
    return region_cover(scene_cells(scene, memo, key), LABEL_SUBJECT)


def subject_word_columns(words: list[str]) -> list[int]:
    """Token columns of `words` in every subject caption (they stand in its fixed opening)."""
    tokens, ids = tokenize(SUBJECT_PROMPT), load_token_ids()
    return [tokens.index(ids[w]) for w in words]


def localisation_loss(maps: list[torch.Tensor], rows: torch.Tensor, masks: torch.Tensor,
                      columns: list[int]) -> torch.Tensor:
    """1 - the share of the subject words' cross-attention that falls on the subject, averaged over the layers,
    heads and words of the captions in `rows` (pictures with a subject whose caption names it; masks: len(rows) x
    256 cell coverage). SD learns from its data that "person" looks at the person; the toy world's captions open
    with the same words for every subject, so without this term they carry no place (interim v2: 1.02x the
    subject's area)."""
    shares = []
    for probs in maps:
        cols = probs[rows][..., columns]  # n x heads x 256 x words
        inside = (cols * masks[:, None, :, None]).sum(2)
        shares.append(inside / cols.sum(2).clamp_min(1e-8))
    return 1 - torch.stack(shares).mean()


# --- sampling and the measure ---------------------------------------------------------------------------------
@torch.no_grad()
def sample(unet: SlimUNet, text: TextEncoder, prompts: list[str], seed: int, steps: int = 20,
           guidance: float = 4.0) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance against the empty prompt; returns pictures B x 3 x 128 x 128 in
    [0, 1] through the analytic VAE's decoder."""
    acp = alphas_cumprod()
    timesteps = torch.linspace(999, 0, steps).round().long()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 16, 16, generator=gen)
    cond, uncond = text(prompts), text([""] * len(prompts))
    for i, t in enumerate(timesteps):
        a = acp[t]
        a_prev = acp[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        tt = t.float().expand(len(prompts))
        eps_c, eps_u = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond])).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return ((vae.decode(x / vae.SD1_SCALE) + 1) / 2).clamp(0, 1)


def evaluate(unet: SlimUNet, text: TextEncoder, reader: Reader, count: int = 48, seed: int = 0,
             steps: int = 20, guidance: float = 4.0) -> dict[str, float]:
    """Share of attributes read back right from pictures of full captions of trained identities (the bar: 0.9),
    overall and per attribute; `no_head`: share of pictures of subject-less captions read as showing no head."""
    chosen = list(scenes(10_000 + seed, count, trained_identities()))
    pictures = sample(unet, text, [caption(s.values) for s in chosen], seed, steps, guidance)
    read = reader.read(pictures)
    out = {"all": float(np.mean([agreement(r, s.values) for r, s in zip(read, chosen)]))}
    for a in ATTRIBUTES:
        hits = [r[a] == s.values[a] for r, s in zip(read, chosen) if a in visible(s.values)]
        out[a] = float(np.mean(hits))
    empty = list(scenes(20_000 + seed, count // 2, trained_identities(), no_subject=1.0))
    read = reader.read(sample(unet, text, [scene_caption(s) for s in empty], seed, steps, guidance))
    out["no_head"] = float(np.mean([not subject_present(r) for r in read]))
    return out


# --- training ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fresh_start(unet: SlimUNet, text: TextEncoder, q_gain: float, position_init: float, text_init: float) -> None:
    """Scales a fresh run's initial weights (a resumed or warm-started run loads its own over them): the
    cross-attention queries by `q_gain`, the position embeddings to std `position_init` and the text layers' output
    projections by `text_init`. At 0 and 0 the encoder starts as exactly the bag of words final_layer_norm(row): at
    their defaults (0.01, 1) a CLIP-scale row (0.4 long) starts under random positions and mixing as long as itself,
    which the UNet first has to see through (world v2's slow start, docs/toy-world.md)."""
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_q"):
            m.weight.mul_(q_gain)
    if text.position is not None:
        text.position.mul_(position_init / POSITION_INIT_STD)
    for layer in text.layers:
        for m in (layer.out_proj, layer.fc2):
            m.weight.mul_(text_init)


def contextual_parameters(text: TextEncoder) -> list[torch.nn.Parameter]:
    """The text layers' and position embeddings' weights (--text-lr), apart from the word rows."""
    return list(text.layers.parameters()) + ([text.position] if text.position is not None else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=80, help="active UNet channels of 320 (multiple of 40)")
    p.add_argument("--data", type=int, default=40_000, help="renders of trained identities to train on")
    p.add_argument("--omit", type=float, default=0.15, help="chance a caption leaves out an attribute")
    p.add_argument("--heads", type=int, default=8, help="attention heads in use, width // heads channels each "
                   "(world v2: all 8 of SD1's; v1 had width // 40)")
    p.add_argument("--no-subject", type=float, default=0.2, help="share of pictures without a head")
    p.add_argument("--no-identity", type=float, default=0.1,
                   help="chance a caption with a subject leaves out every identity attribute")
    p.add_argument("--text-layers", type=int, default=1, help="trained contextual CLIP layers (0: v1 bag of words)")
    p.add_argument("--empty", type=float, default=0.1, help="chance of an empty caption (classifier-free guidance)")
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (about 1.6x faster on AVX-512 CPUs)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-count", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("toy_sd1.safetensors"))
    p.add_argument("--state", type=Path, default=CACHE / "train-state.pt", help="resume file")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long; 0: no limit")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this trained-weights file (its EMA weights; new optimiser and schedule)")
    p.add_argument("--localise", type=float, default=0.0,
                   help="weight of the subject words' localisation term (world v2: 0.05; 0 for v1)")
    p.add_argument("--localise-words", default="face,person", help="the subject words the term places on the head")
    p.add_argument("--ground", type=float, default=0.0,
                   help="weight of the grounding term: every caption word's attention on its region (grounding.py)")
    p.add_argument("--ground-subject-only", action="store_true",
                   help="ground only the subject words ('face', 'person'): the balanced form raises their mass on "
                        "the head, where --localise's share can be met by a word attending little")
    p.add_argument("--q-gain", type=float, default=1.0,
                   help="scale of the fresh cross-attention queries' init (2: a 10-channel head's logits at the "
                        "scale 1/sqrt(10) would give, under the shell's 1/sqrt(40))")
    p.add_argument("--position-init", type=float, default=POSITION_INIT_STD,
                   help="std of the fresh position embeddings' init (0: start from none, as v1's words)")
    p.add_argument("--text-init", type=float, default=1.0,
                   help="scale of the fresh text layer's output projections' init (0: the layer starts as exactly "
                        "the bag of words; at 1 its random outputs are as long as a CLIP-scale word row)")
    p.add_argument("--text-lr", type=float, default=1.0,
                   help="lr multiplier of the text layers and position embeddings (the word rows keep the lr)")
    p.add_argument("--attn-lr", type=float, default=1.0,
                   help="lr multiplier of the cross-attention queries and keys (10-channel heads' logits start small)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the committed runs: see docs/toy-world.md)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    latents, data_scenes = latent_set(args.data, args.seed, args.no_subject)
    unet = SlimUNet(SlimConfig(args.width, 2 * args.width, 4 * args.width, heads=args.heads))
    text = TextEncoder(TextConfig(layers=args.text_layers) if args.text_layers else TextConfig.bag_of_words(),
                       args.seed)
    fresh_start(unet, text, args.q_gain, args.position_init, args.text_init)
    params = list(unet.parameters()) + list(text.parameters())
    fast = {id(m.weight) for name, m in unet.named_modules() if name.endswith(("attn2.to_q", "attn2.to_k"))}
    contextual = {id(q) for q in contextual_parameters(text)}
    groups = [{"params": [q for q in params if id(q) not in fast | contextual], "mult": 1.0},
              {"params": [q for q in params if id(q) in fast], "mult": args.attn_lr},
              {"params": [q for q in params if id(q) in contextual], "mult": args.text_lr}]
    groups = [g for g in groups if g["params"]]  # a bag-of-words encoder has no contextual part
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    columns = subject_word_columns(args.localise_words.split(","))
    cells_memo: dict[int, torch.Tensor] = {}  # each data picture's label cells, rendered once
    token_ids = load_token_ids()
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    step, history, earlier = 0, [], 0  # earlier: steps of the file a warm start began from
    if args.state.exists():
        state = torch.load(args.state, weights_only=False)
        trained_as = {"heads": 8} | state["args"]  # states from before --heads used all 8
        if all(trained_as.get(k) == getattr(args, k) for k in ("width", "heads", "no_subject", "text_layers")):
            unet.load_state_dict(state["unet"])
            text.load_state_dict(state["text"])
            ema.load_state_dict(state["ema"])
            ema_text.load_state_dict(state["ema_text"])
            opt.load_state_dict(state["opt"])
            step, history, earlier = state["step"], state["history"], state.get("earlier", 0)
            print(f"resumed at step {step}")
    elif args.init_from:  # warm start from a committed file's (EMA) weights: a fresh optimiser and lr schedule
        from .checkpoint import load_trained

        start_unet, start_text = load_trained(args.init_from)
        if start_unet.cfg != unet.cfg or start_text.cfg != text.cfg:
            raise SystemExit(f"--init-from {args.init_from}: trained as {start_unet.cfg} / {start_text.cfg}, "
                             f"this run is {unet.cfg} / {text.cfg}")
        for target in (unet, ema):
            target.load_state_dict(start_unet.state_dict())
        for target in (text, ema_text):
            target.load_state_dict(start_text.state_dict())
        notes = load_notes(args.init_from)
        history, earlier = json.loads(notes.get("history", "[]")), int(notes.get("steps", 0))
        print(f"warm start from {args.init_from} (trained {earlier} steps)")
    rng = np.random.default_rng(args.seed + step)
    gen = torch.Generator().manual_seed(args.seed + step)
    acp = alphas_cumprod()
    start, losses, shares, grounds = time.time(), [], [], []

    def save() -> None:
        save_trained(args.out, ema, ema_text, notes={"steps": str(earlier + step), "history": json.dumps(history)})
        args.state.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"args": vars(args) | {"out": str(args.out), "state": str(args.state)}, "unet": unet.state_dict(),
                    "text": text.state_dict(), "ema": ema.state_dict(), "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(), "step": step, "history": history, "earlier": earlier}, args.state)

    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"]
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        x0 = latents[idx].float() * vae.SD1_SCALE
        t = torch.randint(1000, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prompts = [training_caption(data_scenes[i], rng, args.omit, args.empty, args.no_identity)
                   for i in idx.tolist()]
        placed = [n for n, (i, text_n) in enumerate(zip(idx.tolist(), prompts))
                  if data_scenes[i].subject and text_n.startswith(SUBJECT_PROMPT)] if args.localise else []
        grounded = [grounded_words(tokenize(text_n, token_ids), data_scenes[i],
                                   scene_cells(data_scenes[i], cells_memo, i), token_ids,
                                   attributes=not args.ground_subject_only)
                    if text_n else [] for i, text_n in zip(idx.tolist(), prompts)] if args.ground else []
        maps: list[torch.Tensor] = []
        for m in attn2:
            m.kept_probs = maps if placed or any(grounded) else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = unet(xt, t.float(), text(prompts))
        for m in attn2:
            m.kept_probs = None
        maps = [mp.float() for mp in maps]  # bfloat16 under autocast; the terms below are float32 sums
        per_item = F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3))
        if args.min_snr > 0:  # epsilon-prediction min-SNR weight: min(snr, gamma) / snr
            snr = (a / (1 - a)).flatten()
            per_item = per_item * torch.clamp(snr, max=args.min_snr) / snr
        loss = per_item.mean()
        losses.append(loss.item())
        if placed:
            rows = torch.tensor(placed)
            masks = torch.stack([subject_grid(data_scenes[i], cells_memo, i) for i in idx[rows].tolist()])
            local = localisation_loss(maps, rows, masks, columns)
            shares.append((1 - local.item()) / masks.mean().item())
            loss = loss + args.localise * local
        if any(grounded):
            ground = grounding_loss(maps, grounded)
            grounds.append(ground.item())
            loss = loss + args.ground * ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # the average warms up: early on it would mostly hold the initial weights
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, m in ((ema, unet), (ema_text, text)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        if step % 50 == 0:
            rate = (time.time() - start) / len(losses)
            placed_share = f" subject words {np.mean(shares[-50:]):.2f}x area" if shares else ""
            placed_share += f" grounding {np.mean(grounds[-50:]):+.4f}" if grounds else ""
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} {rate:.2f} s/step{placed_share}",
                  flush=True)
        out_of_time = args.max_minutes and time.time() - start > 60 * args.max_minutes
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            t0 = time.time()
            score = evaluate(ema, ema_text, Reader(), args.eval_count)
            history.append({"step": earlier + step, "seconds": round(time.time() - start), **score})
            print(f"eval step {step}: attributes read back {score['all']:.3f} ({time.time() - t0:.0f} s) "
                  + " ".join(f"{a}={v:.2f}" for a, v in score.items() if a != "all"), flush=True)
            save()
        if out_of_time:
            break


if __name__ == "__main__":
    main()

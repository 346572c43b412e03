"""Which ONE token should a textual-inversion export of an identity carry? Measured on the real host.

    python bench/export_vector.py [--steps 200] [--seeds 0,1,2] [--families sd1,sdxl]

For each candidate of `core.textual_inversion.CANDIDATES` the identity is exported to an embedding file, and
ComfyUI's own CLIP Text Encode encodes prompts with `embedding:<name>` where the placeholder was (the host's
tokenizer reads the file, as in any workflow). That context C(x) is compared with what 'Apply Per-Stage ID Tokens'
gives for the same prompt: at a step in stage s, cross-attention takes K from C^K_s and V from C^V_s. The distance
of a candidate is the mean over stages s and over K/V of the Frobenius norm ‖C(x) − C^K_s‖ (resp. C^V_s), averaged
over the prompts; the stages are weighted equally (each is a fifth of the timesteps; a 'normal' schedule spends
equal steps in each). It is printed relative to the same distance for the prompt with the init word instead of the
identity (1.0 = no closer to our conditioning than writing 'person'; 0 = equal). SDXL also gets the pooled output's
distance to ours (the middle stage's K path), relative in the same way.

Identities: learned by the advanced learn node on the tiny test checkpoints (CPU, 64 px, --steps, one per seed of
--seeds, the default settings otherwise), and one of random vocabulary rows per family (every stage's K and V a
different real word: a stress case, far more spread than a learned identity). The choice is the candidate nearest on
average over the learned identities.
The test models have random weights (no weights can be downloaded here): the text encoders are the real
architectures (SD1: full-size CLIP-L; SDXL: CLIP-L and OpenCLIP-G widths, 3 layers), not trained ones.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import harness

PROMPTS = ("a photo of <id> at the beach", "<id> holding a basketball, eyes closed",
           "an oil painting of <id> in a garden, smiling")
PLACEHOLDER = "<id>"


def load_models(family: str, embeddings: str) -> tuple:
    """(MODEL, CLIP, VAE) whose CLIP reads `embedding:NAME` from `embeddings`, as CheckpointLoaderSimple's does."""
    import comfy.sd
    import tiny_models

    with torch.inference_mode():
        if family == "sd1":
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(tiny_models.tiny_sd1_checkpoint(seed=0)), output_vae=True, output_clip=True,
                embedding_directory=[embeddings])
            return model, clip, vae
        # tiny_models.tiny_sdxl(seed=0), its CLIP with an embeddings folder
        model = tiny_models.random_unet_model("sdxl", tiny_models.TINY_SDXL_UNET, 0, torch.float32)
        clip = tiny_models.random_text_encoder("sdxl", 1, embedding_directory=[embeddings], num_hidden_layers=3,
                                               intermediate_size=512)
        return model, clip, tiny_models._random_vae(2)


def learned_identity(models: tuple, steps: int, seed: int):
    import helpers
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.nodes.learn import TOKEN_OPTIONS, FaceAttentionLossTrainer

    d = TrainSettings()
    with torch.inference_mode():
        return FaceAttentionLossTrainer().train(
            *models, helpers.photo(), PLACEHOLDER, steps, seed, d.init_word, d.reference_prompt, d.attn_lambda,
            next(iter(TOKEN_OPTIONS)), d.layers, d.num_stages, d.kv_split, d.lr, 64, d.color_jitter, d.flip_p,
            d.scale_min, d.scale_max, d.batch_size)[0]


def encode(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's CLIP Text Encode node: (context (T, D), pooled (D,) or None)."""
    import nodes as comfy_nodes

    with torch.inference_mode():
        cond = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    pooled = cond[0][1].get("pooled_output")
    return cond[0][0][0].float(), None if pooled is None else pooled[0].float()


def ours(clip, text: str, identity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What 'Apply Per-Stage ID Tokens' builds: per-stage K and V contexts (S, T, D) and the pooled output."""
    from sefi_ide.host.conditioning import build_stage_contexts

    with torch.inference_mode():
        ck, cv, _, pooled, *_ = build_stage_contexts(clip, text, [identity])
    return ck.float(), cv.float(), None if pooled is None else pooled[0].float()


def distance(context: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor) -> float:
    """Mean over stages and K/V of the Frobenius distance between one context and the per-stage contexts."""
    return float(torch.cat([(ck - context).flatten(1).norm(dim=1), (cv - context).flatten(1).norm(dim=1)]).mean())


def measure(clip, identity, embeddings: Path, tag: str) -> dict[str, tuple[float, float | None]]:
    """{candidate: (relative context distance, relative pooled distance (SDXL) or None)}, the init word as 1.0."""
    from sefi_ide.core.textual_inversion import CANDIDATES, export_embedding

    names = {}
    for i, vector in enumerate(CANDIDATES):
        names[vector] = f"{tag}_{i}"
        export_embedding(identity, embeddings, names[vector], overwrite=True, vector=vector)
    sums: dict[str, list[float]] = {v: [0.0, 0.0] for v in ["init word", *CANDIDATES]}
    for text in PROMPTS:
        ck, cv, our_pooled = ours(clip, text, identity)
        our_pooled = our_pooled if identity.family == "sdxl" else None  # SD1's UNet takes no pooled output
        for label, total in sums.items():
            word = identity.init_word if label == "init word" else f"embedding:{names[label]}"
            context, pooled = encode(clip, text.replace(PLACEHOLDER, word))
            if context.shape != ck.shape[1:]:
                raise SystemExit(f"{label}: {tuple(context.shape)} vs ours {tuple(ck.shape[1:])} (not picked up?)")
            total[0] += distance(context, ck, cv)
            if our_pooled is not None:
                total[1] += float((pooled - our_pooled).norm())
    base = sums.pop("init word")
    return {label: (d / base[0], (p / base[1]) if our_pooled is not None else None) for label, (d, p) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="learning steps of each learned identity")
    parser.add_argument("--seeds", default="0,1,2", help="one learned identity per seed")
    parser.add_argument("--families", default="sd1,sdxl")
    args = parser.parse_args()
    harness.register_pack_namespace()
    harness.import_comfy_in_process()
    import helpers

    rows = []
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            models = load_models(family, tmp)
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.monotonic()
                learned = learned_identity(models, args.steps, seed)
                print(f"{family}: learned {args.steps} steps (seed {seed}) in {time.monotonic() - started:.0f} s",
                      flush=True)
                measured = measure(models[1], learned, Path(tmp), f"{family}{seed}")
                rows.append((family, f"learned, seed {seed}", measured))
            vocab = helpers.random_identity(models[1], placeholder=PLACEHOLDER)
            rows.append((family, "vocabulary rows", measure(models[1], vocab, Path(tmp), f"{family}v")))
    candidates = list(rows[0][2])
    learned = [m for _, kind, m in rows if kind.startswith("learned")]
    mean = {c: sum(m[c][0] for m in learned) / len(learned) for c in candidates}
    print(f"\nRelative distance to the per-stage conditioning (init word = 1.00; lower is closer); learned: "
          f"{args.steps} steps; {len(PROMPTS)} prompts, CPU, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads\n")
    print("| candidate | mean over learned | " + " | ".join(f"{f} {k}" for f, k, _ in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for c in candidates:
        cells = []
        for _, _, m in rows:
            ctx, pooled = m[c]
            cells.append(f"{ctx:.3f}" + (f" (pooled {pooled:.3f})" if pooled is not None else ""))
        print(f"| {c} | **{mean[c]:.3f}** | " + " | ".join(cells) + " |")
    print(f"\nnearest on average over the learned identities: {min(mean, key=mean.get)} ({min(mean.values()):.3f})")


if __name__ == "__main__":
    main()

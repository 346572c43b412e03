"""SeFi-IDE benchmark: training-step breakdown, learning time, peak memory, conditioning build time and the
sampling-time ratio with vs without identity tokens, measured in one run on whatever device is present.

    python bench/run.py --family sd1 --arch full          # SD1.4-architecture, random weights, 512 px
    python bench/run.py --family sdxl --arch full         # SDXL-architecture, random weights, 1024 px
    python bench/run.py --family sd1 --arch tiny --steps 5 --resolution 64   # the test models (CPU smoke run)
    python bench/run.py --family sd1 --arch narrow --resolution 64          # host overhead, see below
    python bench/run.py --family sdxl --identities 1,4,8 --sample-steps 0  # several identities per pass, a row each

`--arch narrow` keeps the full architecture's depth (every block, layer and op of SD1.4 / SDXL) at a tiny
width (UNet channels 32 / 64): each op costs almost nothing, so its step time is the per-op host cost
(Python, dispatch, kernel launches) that bounds training on a fast GPU, measurable on any CPU.

Speed and memory do not depend on the weights' values, so full-size architectures use random weights
built through ComfyUI's own classes. Prints a table and appends a dated row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import harness

FULL_SD1_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end: output block 0 last
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
FULL_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


NARROW_WIDTH = {"sd1": 32, "sdxl": 64}  # model_channels of --arch narrow (GroupNorm needs multiples of 32)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class HostWaits:
    """How often the host waits for the GPU (CUDA's synchronising calls: a copy to or from pageable memory, .item(),
    nonzero, ...) until `stop()`, counted with torch's sync debug mode (CUDA only)."""

    def __init__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> int:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        return sum("synchronizing" in str(w.message) for w in self._seen)


def build(family: str, arch: str, dtype: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) under inference mode, as the host would hand them to a node."""
    import tiny_models

    with torch.inference_mode():
        if arch == "tiny":
            if family == "sdxl":
                return tiny_models.tiny_sdxl()
            import comfy.sd

            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_sd1_checkpoint()),
                                                                        output_vae=True, output_clip=True)
            return model, clip, vae
        config = dict(FULL_SD1_UNET if family == "sd1" else FULL_SDXL_UNET)
        if arch == "narrow":
            config["model_channels"] = NARROW_WIDTH[family]
        return tiny_models.random_family_models(family, config, dtype=dtype)


class TimedBackend:
    """Wraps the ComfyUI training backend and accumulates time per phase of a training step."""

    def __init__(self, backend):
        self._b = backend
        self.times = {"text encoding": 0.0, "reference pass": 0.0, "target forward": 0.0, "vae latents": 0.0}

    def __getattr__(self, name):
        return getattr(self._b, name)

    def _timed(self, key, fn, *args, **kwargs):
        sync()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        self.times[key] += time.perf_counter() - t
        return out

    def target_contexts(self, rows, pooled_of=None):
        return self._timed("text encoding", self._b.target_contexts, rows, pooled_of)

    def latents(self, images):
        return self._timed("vae latents", self._b.latents, images)

    def predict_noise(self, *args, **kwargs):
        key = "target forward" if torch.is_grad_enabled() else "reference pass"
        return self._timed(key, self._b.predict_noise, *args, **kwargs)


def main() -> None:
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # CPU peak memory is read from the resident set; glibc would keep freed blocks resident and reuse
        # them unseen, so large blocks are mapped and unmapped one by one (set before the process starts)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--arch", choices=["tiny", "narrow", "full"], default="full")
    ap.add_argument("--steps", type=int, default=20, help="training steps measured (after 2 warm-up steps)")
    ap.add_argument("--resolution", type=int, default=0, help="0 = native (512 SD1, 1024 SDXL)")
    ap.add_argument("--sample-steps", type=int, default=30,
                    help="0 skips the conditioning and sampling measurement (after the last --identities)")
    ap.add_argument("--layers", default="auto", help="attention-loss layers (TrainSettings.layers)")
    ap.add_argument("--unet-dtype", choices=["host", "fp32", "fp16", "bf16"], default="host",
                    help="weights' dtype of the full-size UNet (host = what ComfyUI picks on this device)")
    ap.add_argument("--reference-in-batch", choices=["auto", "on", "off"], default="auto",
                    help="reference pass in the target's UNet batch (TrainSettings.reference_in_batch)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute UNet blocks in backward (TrainSettings.gradient_checkpointing)")
    ap.add_argument("--identities", default="1",
                    help="identities learned together, in one UNet batch per step (train_identities); "
                         "a list such as 1,4,8 measures each on the same models, one row each")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for steps 3-4")
    ap.add_argument("--compile", choices=["off", "inductor", "reduce-overhead"], default="off",
                    help="learn through ComfyUI's TorchCompileModel wrapper (torch.compile of the diffusion model; "
                         "reduce-overhead: inductor with CUDA graphs); compiling happens in the warm-up steps")
    ap.add_argument("--phases", action="store_true",
                    help="time each phase of a step (text, reference, target forward, VAE); the timer waits for the "
                         "GPU around each phase, which makes the step itself slower: off for the step-time rows")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    prepare_host()
    dtypes = {"host": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    model, clip, vae = build(args.family, args.arch, dtypes[args.unet_dtype])
    counts = [int(n) for n in str(args.identities).split(",")]
    done: list[tuple[dict, object]] = []
    for n in counts:  # one model build, one row per identity count
        try:
            measured, identity = measure_training(args, n, model, clip, vae)
        except torch.OutOfMemoryError:
            print(f"{n} identities per pass: out of memory on {device_name()}; larger counts skipped")
            torch.cuda.empty_cache()
            break
        measured["n"] = n
        if done:
            report(args, done[-1][0], model)
        done.append((measured, identity))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not done:
        raise SystemExit("no identity count fitted in memory")
    last, identity = done[-1]
    if args.sample_steps > 0:  # sampling does not depend on how many were learned together: measured once
        last.update(measure_sampling(args, model, clip, identity))
    report(args, last, model)


def measure_training(args, n: int, model, clip, vae) -> tuple[dict, object]:
    """Learn `n` identities together for warm-up + args.steps steps; step time, phases and peak memory."""
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import IdentityJob, train_identities
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope

    warmup = 4 if args.profile or args.compile != "off" else 2  # unmeasured: profiled steps (3-4) are slower, and
    # compiling takes the first steps (the reference and the target pass, each compiled once)
    uncompiled = model
    if args.compile != "off":
        from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper

        model = model.clone()
        set_torch_compile_wrapper(model, backend="inductor", mode=None if args.compile == "inductor" else args.compile)
    in_batch = {"auto": None, "on": True, "off": False}[args.reference_in_batch]
    settings = TrainSettings(steps=args.steps + warmup, resolution=args.resolution, layers=args.layers,
                             reference_in_batch=in_batch,
                             gradient_checkpointing=args.gradient_checkpointing).with_family_resolution(args.family)
    R = settings.resolution
    g = torch.Generator().manual_seed(0)
    jobs = [IdentityJob(torch.rand(1, 3, R, R, generator=g), replace(settings, seed=i, placeholder=f"<id{i}>"))
            for i in range(n)]

    rss_at_start = reset_peak_memory()
    step_times: list[float] = []
    warm: dict[str, float] = {}
    last = [time.perf_counter()]
    profiler = torch.profiler.profile() if args.profile else None

    waits: list[int] = []
    counting: list[HostWaits] = []

    def on_step(step, steps, record):
        if counting and not waits:  # the step after the one that started the count has ended
            waits.append(counting[0].stop())
        if step == 2 and profiler is not None:
            profiler.start()
        if step == 4 and profiler is not None:
            profiler.stop()
        if step == warmup:
            warm.update(getattr(backend, "times", {}))
        sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        if step == warmup - 1 and torch.cuda.is_available():
            counting.append(HostWaits())  # counts the last warm-up step

    with training_scope():
        backend = ComfyTrainingBackend(model, clip, vae, settings)
        if args.phases:
            backend = TimedBackend(backend)
        sync()
        last[0] = time.perf_counter()
        result = train_identities(backend, jobs, on_step=on_step)[0]
    print("losses:", " ".join(f"{r['loss']:.5f}" for r in result.history))
    if profiler is not None:
        for key in ("self_cpu_time_total", "self_cuda_time_total"):
            print(profiler.key_averages().table(sort_by=key, row_limit=14))
    timed = step_times[warmup:]
    per_step = sum(timed) / len(timed)
    phases = {k: (v - warm[k]) / len(timed) for k, v in getattr(backend, "times", {}).items()}  # after warm-up
    if phases:
        phases["backward + optimiser"] = max(0.0, per_step - sum(phases.values()))
    measured = {"R": R, "per_step": per_step, "phases": phases, "peak": peak_memory(rss_at_start),
                "host_waits": waits[0] if waits else None}
    if args.compile != "off":  # the same jobs uncompiled: the captured step must learn the same tokens
        with training_scope():
            plain = ComfyTrainingBackend(uncompiled, clip, vae, settings)
            expected = train_identities(plain, jobs)[0].identity
        measured["compile_deviation"] = token_deviation(result.identity, expected, plain.base_vectors())
    return measured, result.identity


def token_deviation(got, expected, base: dict[str, torch.Tensor]) -> float:
    """The largest |got - expected| of any token, relative to how far that token moved from the init word."""
    worst = 0.0
    for enc in expected.k:
        for table in ("k", "v"):
            a, b = getattr(got, table)[enc], getattr(expected, table)[enc]
            moved = (b - base[enc].to(b)).norm(dim=-1).clamp_min(1e-12)
            worst = max(worst, float(((a - b).norm(dim=-1) / moved).max()))
    return worst


def measure_sampling(args, model, clip, identity) -> dict:
    """Conditioning build time and the median sampling-time ratio with / without the identity."""
    import comfy.sample
    from sefi_ide.host.conditioning import apply_identities

    R = args.resolution or (512 if args.family == "sd1" else 1024)
    text = f"a photo of {identity.placeholder} holding a basketball, eyes closed"
    with torch.inference_mode():
        for _ in range(2):
            apply_identities(model, clip, text, [identity])
        sync()
        t = time.perf_counter()
        n_cond = 5
        for _ in range(n_cond):
            patched, positive = apply_identities(model, clip, text, [identity])
        sync()
        cond_ms = (time.perf_counter() - t) / n_cond * 1000
        plain = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of person holding a basketball, eyes closed"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, R // 8, R // 8)
        noise = comfy.sample.prepare_noise(latent, 0)

        def timed_sample(m, pos):
            sync()
            t0 = time.perf_counter()
            comfy.sample.sample(m, noise, args.sample_steps, 7.0, "euler", "normal", pos, negative, latent, seed=0,
                                disable_pbar=True)
            sync()
            return time.perf_counter() - t0

        timed_sample(model, plain), timed_sample(patched, positive)  # warm-up
        # interleaved pairs, median ratio: sampling time drifts between runs (clocks, CPU launch speed)
        pairs = [(timed_sample(model, plain), timed_sample(patched, positive)) for _ in range(7)]
    return {"cond_ms": cond_ms, "t_plain": statistics.median(p for p, _ in pairs),
            "t_id": statistics.median(i for _, i in pairs), "ratio": statistics.median(i / p for p, i in pairs)}


def report(args, m: dict, model) -> None:
    """Print one run's table and (unless --no-record) append its row to bench/RESULTS.md."""
    import comfy.model_management as mm
    from sefi_ide.core.settings import DEFAULT_STEPS

    N, R, per_step = m["n"], m["R"], m["per_step"]
    device = mm.get_torch_device()
    resident = torch.cuda.memory_allocated(device) / 2**30 if torch.cuda.is_available() else float("nan")
    unet = model.model.diffusion_model
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    rows = [("device", device_name()), ("family / arch / px", f"{args.family} / {args.arch} / {R}"),
            ("UNet", f"{params:.1f} M params, {next(unet.parameters()).dtype}, loss layers: {args.layers}"),
            ("reference pass in target batch", args.reference_in_batch), ("identities per pass", N),
            ("gradient checkpointing", "on" if args.gradient_checkpointing else "off"), ("torch.compile", args.compile)]
    rows += [(f"step: {k}", f"{v * 1000:.1f} ms") for k, v in m["phases"].items()]
    if m.get("compile_deviation") is not None:
        rows += [("compiled vs uncompiled tokens: max |Δ| / moved", f"{m['compile_deviation']:.2e}")]
    if m.get("host_waits") is not None:
        rows += [("host waits for the GPU, per step", str(m["host_waits"]))]
    rows += [("step: total", f"{per_step * 1000:.1f} ms"),
             (f"learning time at {DEFAULT_STEPS} steps, per identity", f"{per_step * DEFAULT_STEPS / N:.1f} s"),
             ("peak GPU memory (training)" if torch.cuda.is_available() else "peak host memory added by training",
              f"{m['peak']:.2f} GiB"),
             ("GPU memory held after training (weights)", f"{resident:.2f} GiB")]
    sampled = "ratio" in m
    if sampled:
        rows += [("conditioning build (all stages, K and V)", f"{m['cond_ms']:.1f} ms"),
                 (f"sampling {args.sample_steps} steps: plain / identity", f"{m['t_plain']:.2f} s / {m['t_id']:.2f} s"),
                 ("sampling overhead (median of 7 pairs)", f"{(m['ratio'] - 1) * 100:+.1f} %")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    if not args.no_record:
        model_cell = f"{args.family} {args.arch} {R}px" + (f" x{N} identities" if N > 1 else "")
        cond = f"{m['cond_ms']:.0f} ms" if sampled else "-"
        overhead = f"{(m['ratio'] - 1) * 100:+.1f} %" if sampled else "-"
        line = (f"| {datetime.date.today()} | {device_name()} | {model_cell} | {per_step * 1000:.0f} ms | "
                f"{per_step * DEFAULT_STEPS / N:.0f} s | {m['peak']:.2f} GiB | {cond} | {overhead} | "
                f"`python bench/run.py {' '.join(sys.argv[1:])}` |\n")
        record_row(RUN_TABLE, line)


RUN_TABLE = "| date | device | model | step |"  # header of the table bench/run.py rows go to


def record_row(table_header: str, line: str) -> None:
    """Add `line` as the last row of the bench/RESULTS.md table whose header row starts with `table_header`."""
    path = ROOT / "bench" / "RESULTS.md"
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, row in enumerate(lines) if row.startswith(table_header)), None)
    if start is None:
        raise RuntimeError(f"bench/RESULTS.md has no table starting '{table_header}'")
    end = start
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines.insert(end + 1, line)
    path.write_text("".join(lines))


def prepare_host() -> None:
    """The pack importable as `sefi_ide` and ComfyUI importable (on a GPU machine: the carried tree as is)."""
    harness.register_pack_namespace()
    if not torch.cuda.is_available():
        harness.import_comfy_in_process()
        return
    host = harness.find_comfyui()
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> int:
    """Start a peak-memory window: GPU allocator stats, or (CPU, Linux) the process's peak resident set."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return 0
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _rss_kib("VmRSS")


def peak_memory(rss_at_start: int) -> float:
    """GiB: peak GPU memory allocated, or (CPU) peak resident memory above the window's start."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return (_rss_kib("VmHWM") - rss_at_start) / 2**20


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()

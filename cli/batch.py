"""Batch learning and rendering with ComfyUI as a library (its loader, samplers, model management; no server) and
the same code as the nodes.

    python sefi_batch.py learn  --checkpoint FILE --photos DIR --out DIR [--settings JSON] [--identities-per-pass N]
                                [--export-embeddings [DIR]] [--overwrite-embeddings]
    python sefi_batch.py render --checkpoint FILE --identities DIR --jobs FILE.jsonl --out DIR
    both: [--comfyui PATH] [--cpu] [--ray local|auto|ADDRESS] [--workers N]

Every item (a photo, or an identity x job) gets one line in DIR/manifest.jsonl (input, sha256, inputs, status,
seconds, output, error) as soon as it finishes, so a rerun skips what is done and retries what failed, and a killed
run loses nothing that finished. An item's fingerprint covers everything its result depends on (learn: the photo,
the training settings, the checkpoint, the identity file format; render: the identity file, the job, the
checkpoint): a rerun redoes exactly the items whose inputs changed and says why for each item. A bad photo or job is
recorded and skipped; it never stops the batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MANIFEST = "manifest.jsonl"
log = logging.getLogger("sefi_batch")


# --- the manifest ---------------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(inputs: dict) -> str:
    """One sha256 over all of an item's inputs (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class Manifest:
    """JSONL, one line per finished attempt; the last line of an item wins. Appended and flushed line by line."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.last: dict[str, dict] = {}
        self._cut_last_line = False
        if self.path.exists():
            text = self.path.read_text(errors="replace")
            # a run killed mid-write leaves a last line without its newline: end it before appending, or the next
            # entry would be glued onto it and lost with it
            self._cut_last_line = bool(text) and not text.endswith("\n")
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    self._read_line(n, line)

    def _read_line(self, n: int, line: str) -> None:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (cut by a killed run?); ignored: that item runs again.", self.path, n)
            return
        if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
            log.warning('%s line %d has no "input" (not written by sefi_batch.py?); ignored. Remove the line, or '
                        'leave it: it is skipped each time.', self.path, n)
            return
        self.last[entry["input"]] = entry

    def why(self, item: Item, out_dir: Path) -> tuple[bool, str]:
        """(skip?, why): "skipped (already done)" only when the last attempt succeeded with the same fingerprint and
        its output is still there; else what makes the item run again."""
        entry = self.last.get(item.key)
        if entry is None:
            return False, "new"
        if entry.get("status") != "done":
            return False, "retried: failed before"
        output = entry.get("output")
        if not isinstance(output, str) or not output or not (out_dir / output).is_file():
            return False, "redone: output file missing"
        if entry.get("sha256") == item.sha256:
            return True, "skipped (already done)"
        return False, "redone: " + changed_inputs(entry.get("inputs"), item.inputs)

    def is_done(self, item: Item, out_dir: Path) -> bool:
        return self.why(item, out_dir)[0]

    def record(self, entry: dict) -> None:
        self.last[entry["input"]] = entry
        with open(self.path, "a") as f:
            if self._cut_last_line:
                f.write("\n")
                self._cut_last_line = False
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


# the words a rerun uses for each input of a fingerprint
INPUT_NAMES = {"photo": "photo", "settings": "settings", "checkpoint": "checkpoint",
               "identity_format": "identity file format", "identity": "identity file", "job": "job"}


def changed_inputs(before: dict | None, now: dict) -> str:
    """'settings changed (steps, lr)', 'checkpoint changed', ...: which of the item's inputs differ from the run that
    made its output."""
    if not isinstance(before, dict):
        return "made by an older sefi_batch.py that did not record its settings and checkpoint"
    parts = []
    for name, value in now.items():
        if before.get(name) == value:
            continue
        detail = ""
        if isinstance(value, dict) and isinstance(before.get(name), dict):
            keys = sorted(k for k in value.keys() | before[name].keys() if value.get(k) != before[name].get(k))
            detail = f" ({', '.join(keys)})"
        parts.append(f"{INPUT_NAMES.get(name, name)} changed{detail}")
    return ", ".join(parts) or "fingerprint changed"


@dataclass
class Item:
    """One unit of work: `key` names it in the manifest; `inputs` is everything its result depends on and `sha256`
    their fingerprint."""

    key: str
    sha256: str
    output: str  # file name in the output folder
    source: str  # the photo (learn) or identity file (render), an absolute path (Ray workers may run elsewhere)
    placeholder: str = ""
    job: dict | None = None  # render: the job line
    error: str = ""  # known bad before running (e.g. a placeholder collision)
    inputs: dict = field(default_factory=dict)


def make_item(key: str, inputs: dict, output: str, source: Path, **extra) -> Item:
    return Item(key, fingerprint(inputs), output, str(source), inputs=inputs, **extra)


def entry(item: Item, status: str, seconds: float, error: str = "") -> dict:
    return {"input": item.key, "sha256": item.sha256, "inputs": item.inputs, "status": status,
            "seconds": round(seconds, 3), "output": item.output if status == "done" else "", "error": error}


# --- fingerprints ---------------------------------------------------------------------------------------------------

def checkpoint_stamp(checkpoint: Path) -> dict:
    """The checkpoint as path + size + modification time: hashing gigabytes at every run would cost more than a
    small batch. Another file, or the same one rewritten (or touched), counts as another checkpoint."""
    path = checkpoint.expanduser().resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def normalised_settings(settings: dict) -> dict:
    """The training settings as the run uses them: every default filled in, whole numbers of float settings as
    floats, so '{}', '{"steps": 400}' and '{"lr": 5e-3}' are the same settings. The placeholder is left out (each
    photo's comes from its file name). `resolution` 0 (the family's native size) stays 0: the family is only
    known once the checkpoint is loaded."""
    from ..core.settings import TrainSettings

    parsed = TrainSettings(**settings)
    values = asdict(parsed)
    for f in fields(TrainSettings):
        value = values[f.name]
        if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[f.name] = float(value)
    values["token_option"] = int(parsed.token_option)
    values.pop("placeholder")
    return values


def parse_settings(text: str) -> dict:
    """--settings: a JSON object of training settings, checked as the learn node checks them. Raises ValueError or
    TypeError naming the problem."""
    from ..core.settings import TrainSettings

    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc}); give an object such as '{{\"steps\": 400, \"seed\": 0}}'") from None
    if not isinstance(settings, dict):
        raise TypeError("give a JSON object such as '{\"steps\": 400, \"seed\": 0}'")
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
    parsed = TrainSettings(**settings)
    # resolution 0 means the family's native size (512 or 1024, known once the checkpoint is loaded): valid here
    (parsed.with_family_resolution("sd1") if parsed.resolution == 0 else parsed).validate()
    normalised_settings(settings)  # e.g. a token_option that is no number
    return settings


# --- planning -------------------------------------------------------------------------------------------------------

def placeholder_for(stem: str) -> str:
    """'Alice Smith.jpg' -> '<alice_smith>': letters, digits, _ and - only, lower case."""
    name = re.sub(r"[^a-z0-9_-]+", "_", stem.lower()).strip("_-")
    return f"<{name}>" if name else ""


def plan_learn(photos: Path, settings: dict, checkpoint: Path) -> list[Item]:
    """One item per photo, sorted by name; placeholders from file names, collisions and blanks marked as errors.
    Each item's inputs: the photo's bytes, the normalised settings, the checkpoint, the identity file format."""
    from ..core import identity as identity_format

    items, seen = [], {}
    shared = {"settings": normalised_settings(settings), "checkpoint": checkpoint_stamp(checkpoint),
              "identity_format": identity_format.FORMAT_VERSION}
    photos = photos.expanduser().resolve()  # a relative folder is the caller's, whatever ComfyUI's input folder is
    for path in sorted(p for p in photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()):
        placeholder = placeholder_for(path.stem)
        item = make_item(path.name, {"photo": sha256_file(path), **shared}, f"{placeholder[1:-1]}.safetensors", path,
                         placeholder=placeholder)
        if not placeholder:
            item.error = f"the file name '{path.name}' gives no usable placeholder; rename the photo"
        elif placeholder in seen:
            item.error = (f"placeholder {placeholder} collides with '{seen[placeholder]}'; rename one of the photos")
        else:
            seen[placeholder] = path.name
        items.append(item)
    return items


def plan_render(identities: Path, jobs_file: Path, checkpoint: Path) -> list[Item]:
    """identities x jobs; a job line: {"prompt": "a photo of {id} ...", "negative", "seed", "steps", "cfg",
    "sampler", "scheduler", "width", "height"} ({id} becomes each identity's placeholder). Each item's inputs: the
    identity file's bytes, the job (defaults filled in), the checkpoint."""
    identities = identities.expanduser().resolve()  # the caller's folder, as --photos; Ray workers may run elsewhere
    stamp = checkpoint_stamp(checkpoint)
    jobs = []
    for n, line in enumerate(jobs_file.read_text().splitlines()):
        if line.strip():
            try:
                jobs.append((n, RenderJob.parse(json.loads(line))))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                jobs.append((n, exc))
    items = []
    for path in sorted(identities.glob("*.safetensors")):
        sha = sha256_file(path)
        for n, job in jobs:
            key = f"{path.name}#{n}"
            if isinstance(job, Exception):
                items.append(make_item(key, {"identity": sha, "checkpoint": stamp}, "", path,
                                       error=f"job line {n + 1}: {job}"))
                continue
            items.append(make_item(key, {"identity": sha, "job": asdict(job), "checkpoint": stamp},
                                   f"{path.stem}__{n:04d}.png", path, job=asdict(job)))
    return items


@dataclass
class RenderJob:
    prompt: str
    negative: str = "blurry, lowres, deformed, watermark, text"
    seed: int = 0
    steps: int = 30
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512

    @classmethod
    def parse(cls, data: dict) -> RenderJob:
        if not isinstance(data, dict):
            raise TypeError("a job line is a JSON object such as {\"prompt\": \"a photo of {id}\"}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        job = cls(**data)
        if isinstance(job.cfg, int) and not isinstance(job.cfg, bool):
            job.cfg = float(job.cfg)  # "cfg": 7 and 7.0 are the same job
        if "{id}" not in job.prompt:
            raise ValueError("the prompt needs {id} where the person goes")
        if job.width % 8 or job.height % 8 or not 64 <= min(job.width, job.height) or max(job.width, job.height) > 4096:
            raise ValueError("width and height must be multiples of 8 in 64..4096")
        return job


# --- the work, in this process (also what each Ray worker runs) -----------------------------------------------------

class Worker:
    """Loads the checkpoint once (ComfyUI's own loader), then learns or renders items, writing into the output
    folder. Returns one manifest entry per item."""

    def __init__(self, checkpoint: str, out_dir: str, comfyui: str, cpu: bool | None = None):
        from .bootstrap import use_comfyui

        use_comfyui(Path(comfyui), cpu)
        import comfy.sd
        import torch

        self.out_dir = Path(out_dir)
        with torch.inference_mode():
            self.model, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(
                checkpoint, output_vae=True, output_clip=True)

    def learn(self, items: list[dict], settings: dict, per_pass: int) -> list[dict]:
        """Photos -> identity files, `per_pass` identities in each UNet pass (0: as many as fit)."""
        import torch

        from ..core.errors import SeFiError
        from ..core.identity import save_identity
        from ..core.settings import TrainSettings
        from ..core.training import TrainingStopped
        from ..host.batch import batch_jobs, learn_identities
        from ..host.grad_scope import training_scope
        from ..host.images import prepare_reference, read_photo
        from ..host.text import detect_family

        items = [Item(**i) for i in items]
        base = TrainSettings(**settings).with_family_resolution(detect_family(self.clip, self.model))
        results, ready = [], []
        for item in items:  # load and check each photo the way 'Load Image' + the learn node do on this host
            started = time.monotonic()
            try:
                image = read_photo(item.source)
                ready.append((item, prepare_reference(image, None, base.resolution)[0], started))
            except (SeFiError, OSError, ValueError) as exc:
                results.append(entry(item, "failed", time.monotonic() - started, _message(exc)))
        if not ready:
            return results
        started = time.monotonic()
        jobs = batch_jobs([r for _, r, _ in ready], [None] * len(ready), [i.placeholder for i, _, _ in ready], base)
        for job in jobs:  # every identity uses the settings' seed, as the learn node with that seed does
            job.settings.seed = base.seed
        with torch.inference_mode(), training_scope():
            try:
                learned = learn_identities(self.model, self.clip, self.vae, jobs, per_pass)
            except TrainingStopped as stopped:
                raise stopped.cause from None
        each = (time.monotonic() - started) / len(ready)
        for (item, _, _), result in zip(ready, learned):
            if result.error is not None:
                results.append(entry(item, "failed", each, str(result.error)))
                continue
            save_identity(result.identity, self.out_dir / item.output, overwrite=True, include_generator=False)
            results.append(entry(item, "done", each))
        return results

    def render(self, items: list[dict]) -> list[dict]:
        """identity x job -> PNG with the prompt and settings in its metadata, as ComfyUI's Save Image writes them."""
        from ..core.errors import SeFiError
        from ..core.identity import load_identity

        results = []
        for raw in items:
            item = Item(**raw)
            started = time.monotonic()
            try:
                job = RenderJob(**item.job)
                identity = load_identity(item.source)
                self._render_one(identity, Path(item.source).name, job, self.out_dir / item.output)
                results.append(entry(item, "done", time.monotonic() - started))
            except (SeFiError, OSError, ValueError, KeyError) as exc:
                results.append(entry(item, "failed", time.monotonic() - started, _message(exc)))
        return results

    def _render_one(self, identity, identity_file: str, job: RenderJob, out: Path) -> None:
        import comfy.sample
        import numpy as np
        import torch
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from ..host.conditioning import apply_identities

        text = job.prompt.replace("{id}", identity.placeholder)
        with torch.inference_mode():
            model, positive = apply_identities(self.model, self.clip, text, [identity])
            negative = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(job.negative))
            latent = torch.zeros(1, 4, job.height // 8, job.width // 8)
            noise = comfy.sample.prepare_noise(latent, job.seed)
            samples = comfy.sample.sample(model, noise, job.steps, job.cfg, job.sampler, job.scheduler, positive,
                                          negative, latent, seed=job.seed, disable_pbar=True)
            pixels = self.vae.decode(samples)[0]
        image = Image.fromarray(np.clip(pixels.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8))
        meta = PngInfo()
        meta.add_text("prompt", json.dumps(api_graph(identity_file, text, job)))  # drag into ComfyUI to rerun
        meta.add_text("sefi", json.dumps({"identity": identity_file, "placeholder": identity.placeholder,
                                          "text": text, **asdict(job)}, sort_keys=True))
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name[:20]}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            image.save(tmp, format="PNG", pnginfo=meta, compress_level=4)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def api_graph(identity_file: str, text: str, job: RenderJob) -> dict:
    """The same render as a ComfyUI API-format graph (what Save Image stores as 'prompt')."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "checkpoint.safetensors"}},
        "2": {"class_type": "LoadIDEmbedding", "inputs": {"identity_file": identity_file}},
        "3": {"class_type": "ApplyPerStageIDTokens", "inputs": {"model": ["1", 0], "clip": ["1", 1], "text": text,
                                                                "identity": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": job.negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": job.width, "height": job.height, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["3", 1], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": job.seed, "steps": job.steps,
                                                   "cfg": job.cfg, "sampler_name": job.sampler,
                                                   "scheduler": job.scheduler, "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sefi"}},
    }


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --- running: locally or on Ray -------------------------------------------------------------------------------------

def chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def run_local(worker_args: dict, command: str, batches: list[list[Item]], extra: tuple,
              on_done: Callable[[list[dict]], None]) -> None:
    worker = Worker(**worker_args)
    for batch in batches:
        on_done(getattr(worker, command)([asdict(i) for i in batch], *extra))


def run_ray(address: str, workers: int | None, worker_args: dict, command: str, batches: list[list[Item]],
            extra: tuple, on_done: Callable[[list[dict]], None]) -> None:
    """Ray actors, one per GPU (or per CPU on a CPU cluster), each loading the checkpoint once; a worker that dies is
    restarted and its batch retried by Ray; results come back to the driver, which writes the manifest."""
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init() if address == "local" else ray.init(address=address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = workers or gpus or max(1, int(resources.get("CPU", 1)) // 2)
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    remote = ray.remote(max_restarts=3, max_task_retries=3, **options)(_ray_worker_class(str(PACK_ROOT)))
    pool = ActorPool([remote.remote(**worker_args) for _ in range(count)])
    for done in pool.map_unordered(lambda actor, batch: getattr(actor, command).remote(
            [asdict(i) for i in batch], *extra), batches):
        on_done(done)


def _ray_worker_class(pack_root: str) -> type:
    """A Worker inside a Ray process. Defined here so that Ray ships it by value: the worker process first makes the
    pack importable (it is not an installed package), then builds the same Worker the local mode uses."""

    class RayWorker:
        def __init__(self, **worker_args):
            import importlib.util

            spec = importlib.util.spec_from_file_location("sefi_bootstrap", f"{pack_root}/cli/bootstrap.py")
            bootstrap = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bootstrap)
            bootstrap.register_pack_namespace()
            from sefi_ide.cli.batch import Worker

            self.worker = Worker(**worker_args)

        # nothing from the pack may be referenced at class level: Ray unpickles this before __init__ has run
        def learn(self, *args):
            from sefi_ide.cli.batch import _crash_once_for_tests

            _crash_once_for_tests()
            return self.worker.learn(*args)

        def render(self, *args):
            from sefi_ide.cli.batch import _crash_once_for_tests

            _crash_once_for_tests()
            return self.worker.render(*args)

    return RayWorker


def _crash_once_for_tests() -> None:
    """Fault injection for the retry test: with SEFI_BATCH_CRASH_ONCE=<file> in the workers' environment, the first
    task to run creates the file and kills its worker process, as a lost machine would."""
    marker = os.environ.get("SEFI_BATCH_CRASH_ONCE")
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


# --- the command ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sefi_batch.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="an SD1.x or SDXL checkpoint file")
    common.add_argument("--out", required=True, help="output folder (also holds manifest.jsonl)")
    common.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_PATH or the one holding this pack)")
    common.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    common.add_argument("--ray", help="'local' (start Ray on this machine), 'auto' (the running cluster) or an "
                                      "ADDRESS; default: in this process")
    common.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else half the CPUs)")
    learn = sub.add_parser("learn", parents=[common], help="one identity per photo")
    learn.add_argument("--photos", required=True, help="folder of photos, one person each; file name -> placeholder")
    learn.add_argument("--settings", default="{}", help='JSON of training settings, e.g. {"steps": 400, "seed": 0}')
    learn.add_argument("--identities-per-pass", type=int, default=0,
                       help="identities in one UNet batch (0 = as many as fit). 1 gives files byte-identical to "
                            "the nodes'; more are equal to float tolerance, and faster on a GPU")
    learn.add_argument("--export-embeddings", nargs="?", const="", metavar="DIR",
                       help="also write each learned identity as a textual-inversion embedding (one token: see "
                            "docs/nodes.md) into DIR, default: the ComfyUI's models/embeddings")
    learn.add_argument("--overwrite-embeddings", action="store_true",
                       help="replace existing embeddings of the same names (default: only identical ones are kept)")
    render = sub.add_parser("render", parents=[common], help="prompts x identities -> images")
    render.add_argument("--identities", required=True, help="folder of identity files")
    render.add_argument("--jobs", required=True, help="JSONL, one job per line (see the module docstring)")
    return parser.parse_args(argv)


def _comfyui_folder(explicit: str | None) -> Path:
    """--comfyui, else the ComfyUI this process has already imported (a host embedding us), else the usual search."""
    from .bootstrap import find_comfyui

    if explicit is None and "comfy" in sys.modules:
        return Path(sys.modules["comfy"].__path__[0]).parent
    return find_comfyui(explicit)


def _plan(args: argparse.Namespace) -> tuple[list[Item], tuple, int]:
    """The items, the workers' extra arguments and the chunk size. Raises ValueError naming a bad argument."""
    checkpoint = Path(args.checkpoint).expanduser()
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint: no file '{checkpoint}'; give the checkpoint's path")
    if args.command == "learn":
        try:
            settings = parse_settings(args.settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--settings: {exc}") from None
        if not Path(args.photos).expanduser().is_dir():
            raise ValueError(f"--photos: no folder '{args.photos}'; give the folder that holds the photos")
        return (plan_learn(Path(args.photos), settings, checkpoint), (settings, args.identities_per_pass),
                args.identities_per_pass or 4)
    if not Path(args.identities).expanduser().is_dir():
        raise ValueError(f"--identities: no folder '{args.identities}'; give the folder of identity files")
    if not Path(args.jobs).expanduser().is_file():
        raise ValueError(f"--jobs: no file '{args.jobs}'; give a JSONL file, one job per line")
    return plan_render(Path(args.identities), Path(args.jobs).expanduser(), checkpoint), (), 1


def _sort_out(command: str, items: list[Item], manifest: Manifest, out: Path) -> tuple[list[Item], int]:
    """Which items run and which are skipped, each with why (printed: one line per item that is not new, then the
    counts). Returns (to do, number skipped)."""
    todo, reasons = [], Counter()
    for item in items:
        skip, why = manifest.why(item, out)
        reasons[why] += 1
        if why != "new":
            print(f"  {item.key}: {why}")
        if not skip:
            todo.append(item)
    skipped = len(items) - len(todo)
    runs = ", ".join(f"{n} {why}" for why, n in reasons.items() if why != "skipped (already done)")
    print(f"{command}: {len(items)} items: {len(todo)} to do{f' ({runs})' if runs else ''}, "
          f"{skipped} skipped (already done)")
    return todo, skipped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        comfyui = str(_comfyui_folder(args.comfyui))
        items, extra, batch_size = _plan(args)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    todo, skipped = _sort_out(args.command, items, manifest, out)
    counts = {"done": 0, "failed": 0}
    seconds: list[float] = []
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="item", desc=args.command)

    def on_done(entries: list[dict]) -> None:
        for e in entries:
            manifest.record(e)
            counts[e["status"]] += 1
            if e["status"] == "done":
                seconds.append(e["seconds"])
            else:
                log.warning("failed: %s: %s", e["input"], e["error"])
        bar.update(len(entries))

    for item in [i for i in todo if i.error]:  # known bad before any model is loaded
        on_done([entry(item, "failed", 0.0, item.error)])
    runnable = [i for i in todo if not i.error]
    worker_args = {"checkpoint": str(Path(args.checkpoint).expanduser().resolve()), "out_dir": str(out.resolve()),
                   "comfyui": comfyui, "cpu": True if args.cpu else None}
    if runnable:
        batches = list(chunks(runnable, batch_size))
        if args.ray:
            run_ray(args.ray, args.workers, worker_args, args.command, batches, extra, on_done)
        else:
            run_local(worker_args, args.command, batches, extra, on_done)
    bar.close()
    per_item = f", {sum(seconds) / len(seconds):.1f} s per item" if seconds else ""
    print(f"{args.command}: {counts['done']} done, {skipped} skipped (already done), {counts['failed']} failed"
          f"{per_item}. Manifest: {manifest.path}")
    if args.command == "learn" and args.export_embeddings is not None:
        counts["failed"] += _export_embeddings(args, Path(comfyui), out, manifest, items)
    return 1 if counts["failed"] else 0


def _export_embeddings(args: argparse.Namespace, comfyui: Path, out: Path, manifest: Manifest,
                       items: list[Item]) -> int:
    """--export-embeddings: every identity the manifest has as done, as an embedding. Returns the failures."""
    from ..core.textual_inversion import export_identity_files

    folder = Path(args.export_embeddings) if args.export_embeddings else comfyui / "models" / "embeddings"
    done = [out / i.output for i in items if manifest.is_done(i, out)]
    written, errors = export_identity_files(done, folder, overwrite=args.overwrite_embeddings)
    for error in errors:
        log.warning("embedding not written: %s", error)
    print(f"embeddings: {len(written)} in {folder} (write embedding:<name> in a prompt), {len(errors)} failed")
    return len(errors)

"""Every ComfyUI internal this pack uses, one row each (CONTRIBUTING.md, "ComfyUI internals this pack uses"): on every
host CI builds, a changed import, signature or key fails here with the internal's name, before a user meets it.

Three tables; adding an internal is adding a row:
- SIGNATURES: importable, and callable the way the pack calls it ("(a, b, *, c)": the leading positional parameters
  by name and order, then the keywords it passes), or of the type the pack reads. Attributes of host objects are read
  on the tiny checkpoints' objects (ComfyUI's own classes). A row with `since` is feature-detected by the pack: absent
  on a host older than `since` is fine and the pack's fallback is checked; absent on a newer host fails.
- BEHAVIOUR: conventions only a run shows (what the sampler hands attention patches, what a tokenizer accepts, ...),
  through real host objects: one 1-step sampling, one UNet pass the pack's own way, text and VAE encodes.
- SOURCE: keys the host reads from the pack's node classes and folders, found in the host's own source.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.smoke

SEE = "see CONTRIBUTING.md, 'ComfyUI internals this pack uses'"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def host_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def changed(name: str, detail: str) -> None:
    pytest.fail(f"ComfyUI internal '{name}' changed on this host (ComfyUI {host_version()}): {detail} ({SEE})",
                pytrace=False)


# --- 1. names and signatures -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sig:
    name: str  # module.Name[.attr...]; a trailing " [label]" only names a second row of the same internal
    spec: object = None  # "(a, *, b)": the pack's call; a type: what the pack reads; None: present
    since: str = ""  # feature-detected: the first version that has it (older hosts: `fallback` holds)
    fallback: Callable | None = None  # (probe) -> None: the pack's behaviour where the host lacks it


def _no_dynamic(probe) -> None:
    from sefi_ide.host.dynamic_vram import is_dynamic, learning_copies

    model, clip, _ = probe.sd1
    assert not is_dynamic(model) and learning_copies(model, clip) == (model, clip), \
        "the pack should learn on the given MODEL and CLIP"


def _no_in_training(probe) -> None:
    import comfy.model_management as mm
    from sefi_ide.host.dynamic_vram import in_training

    with in_training():
        assert not hasattr(mm, "in_training"), "the pack should set nothing"


def _no_region_masks(probe) -> None:
    from sefi_ide.core.errors import SeFiError
    from sefi_ide.host.conditioning import check_region_support

    with pytest.raises(SeFiError, match="0.3.60"):
        check_region_support()


S = Sig
SIGNATURES = [
    # comfy.model_patcher: the MODEL
    S("comfy.model_patcher.ModelPatcher.clone", "()"),
    # DynamicVRAM (host/dynamic_vram.py): a dynamic MODEL, and a CLIP whose patcher is dynamic, are learned on
    # `.clone(disable_dynamic=True)` of the MODEL and of CLIP.patcher (a ModelPatcherDynamic on those hosts; on a CPU
    # the plain ModelPatcher); the CLIP around the copy is CLIP.clone() with .patcher / .cond_stage_model set
    S("comfy.model_patcher.ModelPatcher.clone [disable_dynamic]", "(*, disable_dynamic)", "0.16", _no_dynamic),
    S("comfy.model_patcher.ModelPatcherDynamic.clone [disable_dynamic]", "(*, disable_dynamic)", "0.16", _no_dynamic),
    S("comfy.sd.CLIP.patcher.clone [disable_dynamic]", "(*, disable_dynamic)", "0.16", _no_dynamic),
    S("comfy.model_patcher.ModelPatcher.is_dynamic", "()", "0.16", _no_dynamic),
    S("comfy.model_patcher.ModelPatcherDynamic.is_dynamic", "()", "0.16", _no_dynamic),
    S("comfy.model_patcher.ModelPatcher.set_model_attn2_patch", "(patch)"),
    S("comfy.model_patcher.ModelPatcher.add_wrapper_with_key", "(wrapper_type, key, wrapper)"),
    S("comfy.model_patcher.ModelPatcher.get_model_object", "(name)"),
    S("comfy.model_patcher.ModelPatcher.model_options", dict),
    S("comfy.model_patcher.ModelPatcher.wrappers", dict),
    S("comfy.model_patcher.ModelPatcher.callbacks", dict),
    S("comfy.model_patcher.ModelPatcher.load_device", torch.device),
    S("comfy.model_patcher.ModelPatcher.model", torch.nn.Module),
    # comfy.model_base: MODEL.model
    S("comfy.model_base.BaseModel.diffusion_model", torch.nn.Module),
    S("comfy.model_base.BaseModel.model_config.unet_config['context_dim']", int),
    S("comfy.model_base.BaseModel.manual_cast_dtype"),
    S("comfy.model_base.BaseModel.get_dtype", "()"),
    S("comfy.model_base.BaseModel.process_latent_in", "(latent)"),
    S("comfy.model_base.BaseModel.encode_adm", "(*, pooled_output, width, height, target_width, target_height, crop_w, "
                                               "crop_h)"),
    S("comfy.model_base.BaseModel.apply_model", "(x, t, *, c_crossattn, transformer_options, y)"),
    S("comfy.model_base.SDXL.encode_adm", "(*, pooled_output, width, height, target_width, target_height, crop_w, "
                                          "crop_h)"),
    # comfy.model_sampling: MODEL.get_model_object("model_sampling")
    S("comfy.model_sampling.EPS", type),
    S("comfy.model_sampling.EPS.noise_scaling", "(sigma, noise, latent_image)"),
    S("comfy.model_sampling.ModelSamplingDiscrete.sigma", "(timestep)"),
    S("comfy.model_sampling.ModelSamplingDiscrete.timestep", "(sigma)"),
    S("comfy.model_sampling.ModelSamplingDiscrete.sigmas", torch.Tensor),
    # comfy.patcher_extension
    S("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE", str),
    S("comfy.patcher_extension.WrappersMP.APPLY_MODEL", str),
    S("comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL", str),
    S("comfy.patcher_extension.merge_nested_dicts", "(dict1, dict2)"),
    S("comfy_api.torch_helpers.torch_compile.COMPILE_KEY", str),
    S("comfy_api.torch_helpers.torch_compile.set_torch_compile_wrapper", "(model, *, backend, mode)"),  # bench only
    # comfy.ldm: the UNet's modules
    S("comfy.ldm.modules.attention.wrap_attn", "(func)", "0.3.60", _no_region_masks),
    S("comfy.ldm.modules.attention.BasicTransformerBlock", type),
    S("comfy.ldm.modules.attention.SpatialTransformer.transformer_blocks", torch.nn.ModuleList),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.ResBlock", type),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.Downsample", type),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.Upsample", type),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel.input_blocks", torch.nn.ModuleList),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel.middle_block"),
    S("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel.output_blocks", torch.nn.ModuleList),
    # comfy.sd: CLIP, VAE, the loader
    S("comfy.sd.CLIP.tokenize", "(text)"),
    S("comfy.sd.CLIP.encode_from_tokens", "(tokens, *, return_pooled)"),
    S("comfy.sd.CLIP.encode_from_tokens_scheduled", "(tokens)"),
    S("comfy.sd.CLIP.load_model", "()"),
    S("comfy.sd.CLIP.clone", "()"),
    S("comfy.sd.CLIP.patcher", object),
    S("comfy.sd.CLIP.cond_stage_model", torch.nn.Module),
    S("comfy.sd1_clip.SD1ClipModel.clip", str),
    S("comfy.sd1_clip.SD1ClipModel.clip_l.transformer.get_input_embeddings", "()"),
    S("comfy.sdxl_clip.SDXLClipModel.clip_g.transformer.get_input_embeddings", "()"),
    S("comfy.sd.VAE.patcher", object),
    S("comfy.sd.VAE.disable_offload", bool),
    S("comfy.sd.VAE.memory_used_encode", "(shape, dtype)"),
    S("comfy.sd.VAE.vae_dtype", torch.dtype),
    S("comfy.sd.VAE.process_input", "(image)"),
    S("comfy.sd.VAE.device", torch.device),
    S("comfy.sd.VAE.first_stage_model.encode", "(x)"),
    S("comfy.sd.VAE.decode", "(samples_in)"),
    S("comfy.sd.load_checkpoint_guess_config", "(ckpt_path, *, output_vae, output_clip)"),
    S("comfy.sd1_clip.load_embed", "(embedding_name, embedding_directory, embedding_size, embed_key)"),
    # comfy.model_management
    S("comfy.model_management.load_models_gpu", "(models, *, memory_required, force_full_load)"),
    S("comfy.model_management.throw_exception_if_processing_interrupted", "()"),
    S("comfy.model_management.InterruptProcessingException", type),
    S("comfy.model_management.soft_empty_cache", "()"),
    S("comfy.model_management.intermediate_device", "()"),
    S("comfy.model_management.get_torch_device", "()"),  # bench only
    S("comfy.model_management.in_training", bool, "0.16", _no_in_training),
    # comfy.utils, comfy.sample, comfy.cli_args
    S("comfy.utils.ProgressBar", "(total)"),
    S("comfy.utils.ProgressBar.update_absolute", "(value, total, preview)"),
    S("comfy.sample.prepare_noise", "(latent_image, seed)"),
    S("comfy.sample.sample", "(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, *, "
                             "seed, disable_pbar)"),
    S("comfy.cli_args.args.cpu", bool),
    # folder_paths
    S("folder_paths.folder_names_and_paths", dict),
    S("folder_paths.models_dir", str),
    S("folder_paths.get_folder_paths", "(folder_name)"),
    S("folder_paths.get_filename_list", "(folder_name)"),
    S("folder_paths.get_full_path", "(folder_name, filename)"),
    S("folder_paths.get_input_directory", "()"),
    S("folder_paths.set_input_directory", "(input_dir)"),
    # nodes (ComfyUI's nodes.py)
    S("nodes.LoadImage.load_image", "(image)"),
    S("nodes.NODE_CLASS_MAPPINGS", dict),  # tools/make_workflows.py, the batch command's PNG graph
    S("nodes.CLIPTextEncode.encode", "(clip, text)"),  # bench only
]

# where an attribute path reaches one of these classes, the rest is read on a host object of it
INSTANCES: dict[str, tuple[str, Callable]] = {
    "comfy.model_patcher.ModelPatcher": ("sd1", lambda o: o[0]),
    "comfy.model_base.BaseModel": ("sd1", lambda o: o[0].model),
    "comfy.model_base.SDXL": ("sdxl", lambda o: o[0].model),
    "comfy.model_sampling.EPS": ("sd1", lambda o: o[0].get_model_object("model_sampling")),
    "comfy.model_sampling.ModelSamplingDiscrete": ("sd1", lambda o: o[0].get_model_object("model_sampling")),
    "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel": ("sd1", lambda o: o[0].model.diffusion_model),
    "comfy.ldm.modules.attention.SpatialTransformer": ("sd1", lambda o: _first_spatial_transformer(o[0])),
    "comfy.sd.CLIP": ("sd1", lambda o: o[1]),
    "comfy.sd1_clip.SD1ClipModel": ("sd1", lambda o: o[1].cond_stage_model),
    "comfy.sdxl_clip.SDXLClipModel": ("sdxl", lambda o: o[1].cond_stage_model),
    "comfy.sd.VAE": ("sd1", lambda o: o[2]),
    "comfy.utils.ProgressBar": ("", lambda _: __import__("comfy.utils").utils.ProgressBar(1)),
    "nodes.LoadImage": ("", lambda _: __import__("nodes").LoadImage()),
    "nodes.CLIPTextEncode": ("", lambda _: __import__("nodes").CLIPTextEncode()),
}


def _first_spatial_transformer(model):
    from comfy.ldm.modules.attention import SpatialTransformer

    return next(m for m in model.model.diffusion_model.modules() if isinstance(m, SpatialTransformer))


def _import_prefix(parts: list[str]):
    """(the longest importable module of `parts`, how many parts it used)."""
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            return importlib.import_module(module), i
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise  # the module exists but one of ITS imports is missing
    raise ModuleNotFoundError(parts[0])


def resolve(name: str, request):
    """The host object a row names; a method comes back bound (its signature without self)."""
    path = name.split(" [")[0]
    path, _, key = path.partition("['")
    parts = path.split(".")
    obj, used = _import_prefix(parts)
    for i in range(used, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in INSTANCES and inspect.isclass(obj):
            fixture, get = INSTANCES[prefix]
            instance = get(request.getfixturevalue(fixture) if fixture else None)
            assert isinstance(instance, obj), f"the host's object is a {type(instance)}, not a {obj}"
            obj = instance
        owner = obj
        if not hasattr(obj, parts[i]):
            raise AttributeError(f"{'.'.join(parts[:i]) or parts[0]} has no attribute '{parts[i]}'")
        obj = getattr(obj, parts[i])
        if inspect.isclass(owner) and inspect.isfunction(obj) and not isinstance(
                inspect.getattr_static(owner, parts[i]), staticmethod):
            obj = functools.partial(obj, None)  # a method read on its class: drop `self`
    if key:
        key = key.rstrip("']")
        if key not in obj:
            raise KeyError(f"no key '{key}' (keys: {sorted(obj)})")
        obj = obj[key]
    return obj


def _parse(spec: str) -> tuple[list[str], list[str]]:
    positional, _, keywords = spec.strip()[1:-1].partition("*")
    return ([p.strip() for p in positional.split(",") if p.strip()],
            [k.strip() for k in keywords.split(",") if k.strip()])


def call_problem(fn, spec: str) -> str | None:
    """Why the pack's call `spec` does not fit `fn`'s signature, or None."""
    if not callable(fn):
        return f"not callable: {fn!r}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return f"no signature to check ({exc})"
    positional, keywords = _parse(spec)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = [p.name for p in sig.parameters.values() if p.kind in kinds][:len(positional)]
    takes_args = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    if leading != positional and not (takes_args and positional[:len(leading)] == leading):
        return f"the pack passes ({', '.join(positional)}) by position; the host has {sig}"
    try:
        sig.bind(*positional, **{k: None for k in keywords})
    except TypeError as exc:
        return f"the pack's call {spec} does not bind to {sig}: {exc}"
    return None


def _sig_id(row: Sig) -> str:
    return row.name


@pytest.mark.parametrize("row", SIGNATURES, ids=_sig_id)
def test_signature(row: Sig, request, probe):
    try:
        obj = resolve(row.name, request)
        problem = None
        if isinstance(row.spec, str):
            problem = call_problem(obj, row.spec)
        elif row.spec is type:
            problem = None if inspect.isclass(obj) else f"not a class: {obj!r}"
        elif row.spec is not None and not isinstance(obj, row.spec):
            problem = f"a {type(obj).__name__}, the pack reads a {row.spec.__name__}"
    except Exception as exc:  # noqa: BLE001 (whatever resolving raises is the finding)
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return
    if row.since and _version(host_version()) < _version(row.since):
        try:  # absent before `since`: the pack's fallback must hold
            if row.fallback is not None:
                row.fallback(probe)
        except Exception as exc:  # noqa: BLE001 (reported with the internal's name)
            changed(row.name, f"{problem}, and the pack's fallback for hosts before {row.since} fails: {exc!r}")
        return
    changed(row.name, problem + (f" (the pack expects it from {row.since} on)" if row.since else ""))


# --- 2. behaviour through real host objects ------------------------------------------------------------------------

def _once(method):
    """A cached probe run; a failure is cached too, so each row that needs it reports it without a rerun."""
    @functools.wraps(method)
    def run(self):
        if method.__name__ not in self.cache:
            try:
                self.cache[method.__name__] = (method(self), None)
            except Exception as exc:  # noqa: BLE001 (reported by every row that reads this run)
                self.cache[method.__name__] = (None, exc)
        value, exc = self.cache[method.__name__]
        if exc is not None:
            raise AssertionError(f"the probe run '{method.__name__}' failed: {type(exc).__name__}: {exc}") from exc
        return value

    return property(run)


def _attention(q, k, v, heads):
    """softmax(QKᵀ/√d)V with `heads` heads, as the pack's map capture computes it."""
    b, n, inner = q.shape
    d = inner // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    out = torch.softmax(split(q) @ split(k).transpose(-1, -2) * d ** -0.5, dim=-1) @ split(v)
    return out.transpose(1, 2).reshape(b, n, inner)


class Probe:
    def __init__(self, request):
        self.request = request
        self.cache: dict = {}

    @property
    def sd1(self):
        return self.request.getfixturevalue("sd1")

    @property
    def sdxl(self):
        return self.request.getfixturevalue("sdxl")

    @_once
    def sampling(self):
        """One 1-step CFG sampling (cond + uncond in one batch) of the tiny SD1 model, as KSampler / the batch
        command run it, with recorders where the pack hooks in: an attn2 patch, a 2-part attn2 replacement (how
        ComfyUI_IPAdapter_plus registers SD1 layers), an optimized_attention_override and an OUTER_SAMPLE wrapper."""
        import comfy.patcher_extension
        import comfy.sample
        from comfy.ldm.modules import attention
        from sefi_ide.attention_patch.layers import cross_attention_layers

        model, clip, vae = self.sd1
        rec = SimpleNamespace(patch=[], replace=[], override=[], outer=[], layers=[])
        m = model.clone()

        def patch(n, context, value, extra_options):
            rec.patch.append({**extra_options, "context_rows": context.shape[0], "context_tokens": context.shape[1]})
            return n, context, value

        def replace(q, k, v, extra_options):
            rec.replace.append(dict(extra_options))
            return _attention(q, k, v, extra_options.get("n_heads", 1))

        def override(func, q, k, v, heads, *args, mask=None, **kwargs):
            rec.override.append({"tokens": k.shape[1], "heads": heads})
            return func(q, k, v, heads, *args, mask=mask, **kwargs)

        def outer(executor, *args, **kwargs):
            rec.outer.append(callable(executor))
            return executor(*args, **kwargs)

        rec.layers = [layer.key for layer in cross_attention_layers(m.model.diffusion_model)]
        last = rec.layers[-1]
        m.set_model_attn2_patch(patch)
        rec.patch_fn = patch
        m.set_model_attn2_replace(replace, last[0], last[1])  # transformer_index None: the 2-part key
        if hasattr(attention, "wrap_attn"):
            m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "sefi_surface_probe", outer)
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a person"), return_pooled=True)
            positive = [[cond, {"pooled_output": pooled}]]
            rec.negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
            rec.latent = torch.zeros(1, 4, 8, 8)
            rec.noise = comfy.sample.prepare_noise(rec.latent, 0)
            rec.samples = comfy.sample.sample(m, rec.noise, 1, 2.0, "euler", "normal", positive, rec.negative,
                                              rec.latent, seed=0, disable_pbar=True)
            rec.pixels = vae.decode(rec.samples)
        rec.last_layer = last
        return rec

    @_once
    def unet_pass(self):
        """One UNet pass the pack's own way (host/backend.py UNetPass: sigma, noise_scaling, its transformer_options,
        apply_model, ε from the denoised output), capturing maps at two layers, with another pack's attn2 patch in
        the model options, another pack's 2-part replacement at a capture layer, APPLY_MODEL / DIFFUSION_MODEL
        wrappers, and counting instance `forward`s on the checkpointed module kinds."""
        import comfy.patcher_extension
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        from sefi_ide.attention_patch.layers import cross_attention_layers
        from sefi_ide.host.backend import UNetPass

        model, clip, _ = self.sd1
        WrappersMP = comfy.patcher_extension.WrappersMP
        rec = SimpleNamespace(foreign_patch=[], foreign_replace=[], wrappers=[], unet_out=[], forwards=0,
                              block_options=[])
        m = model.clone()

        def foreign_patch(n, context, value, extra_options):
            rec.foreign_patch.append(dict(extra_options))
            return n, context, value

        def foreign_replace(q, k, v, extra_options):
            rec.foreign_replace.append(True)
            return _attention(q, k, v, extra_options["n_heads"])

        def apply_model_wrapper(executor, *args, **kwargs):
            rec.wrappers.append(WrappersMP.APPLY_MODEL)
            return executor(*args, **kwargs)

        def diffusion_model_wrapper(executor, *args, **kwargs):
            rec.wrappers.append(WrappersMP.DIFFUSION_MODEL)
            out = executor(*args, **kwargs)
            rec.unet_out.append(out.clone())
            return out

        layers = cross_attention_layers(m.model.diffusion_model)
        rec.capture = [layers[0], layers[-1]]
        m.set_model_attn2_patch(foreign_patch)
        m.set_model_attn2_replace(foreign_replace, layers[0].key[0], layers[0].key[1])  # 2-part, a capture layer
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "sefi_surface_probe", apply_model_wrapper)
        m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "sefi_surface_probe", diffusion_model_wrapper)
        units = [u for u in m.model.diffusion_model.modules() if isinstance(u, (ResBlock, BasicTransformerBlock))]

        def counting(forward, block: bool):
            def run(*args, **kwargs):
                rec.forwards += 1
                if block:
                    rec.block_options.append(isinstance(kwargs.get("transformer_options"), dict))
                return forward(*args, **kwargs)
            return run

        gen = torch.Generator().manual_seed(0)
        z0, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        t = torch.tensor([500])
        try:
            for u in units:
                u.forward = counting(type(u).forward.__get__(u), isinstance(u, BasicTransformerBlock))
            with torch.inference_mode():
                context = clip.encode_from_tokens(clip.tokenize("a photo of a person"), return_pooled=True)[0]
                import comfy.model_management

                comfy.model_management.load_models_gpu([m])
                unet = UNetPass(m, rec.capture)
                rec.eps_pred, rec.maps = unet(z0, eps, t, context, context, capture=True)
        finally:
            for u in units:
                vars(u).pop("forward", None)
        rec.units = len(units)
        ms = m.get_model_object("model_sampling")
        rec.sigma = ms.sigma(t)
        rec.t_back = ms.timestep(rec.sigma)
        rec.x = ms.noise_scaling(rec.sigma, eps, z0)
        rec.z0, rec.eps = z0, eps
        return rec

    @_once
    def text(self):
        """The tiny SD1 CLIP: token layout, a vector in place of a token id, the pooled output of the encoder module,
        and the host's intermediate device looked up at call time."""
        import comfy.model_management as mm

        _, clip, _ = self.sd1
        rec = SimpleNamespace()
        rec.empty = clip.tokenize("")
        tokens = clip.tokenize("a photo of person")
        ids = [t[0] for t in tokens["l"][0]]
        word = clip.tokenize("person")["l"][0][1][0]
        at = ids.index(word)
        table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings()

        def injected(vec):
            out = {k: [list(c) for c in v] for k, v in tokens.items()}
            out["l"][0][at] = (vec,) + tuple(out["l"][0][at][1:])
            return out

        source = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
        pooled_rows = []
        handle = source.register_forward_hook(lambda module, args, out: pooled_rows.append(out[1]))
        host_device = mm.intermediate_device
        calls = []
        mm.intermediate_device = lambda: calls.append(1) or host_device()
        try:
            with torch.inference_mode():
                rec.plain, rec.pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                row = table.weight[word].detach().float().clone()
                rec.same_row = clip.encode_from_tokens(injected(row), return_pooled=True)[0]
                rec.other_row = clip.encode_from_tokens(injected(torch.randn(row.shape[0]) * row.norm()),
                                                        return_pooled=True)[0]
        finally:
            handle.remove()
            mm.intermediate_device = host_device
        rec.pooled_rows = pooled_rows
        rec.intermediate_calls = len(calls)
        return rec

    @_once
    def vae_encode(self):
        """The pack's latents (host/backend.py `latents`) against the host's VAE.encode."""
        import comfy.model_management as mm

        _, _, vae = self.sd1
        images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            mm.load_models_gpu([vae.patcher], force_full_load=vae.disable_offload,
                               memory_required=vae.memory_used_encode(images.shape, vae.vae_dtype))
            pixels = vae.process_input(images.to(vae.device)).to(vae.vae_dtype)
            ours = vae.first_stage_model.encode(pixels).float()
            host = vae.encode(images.permute(0, 2, 3, 1)).float()
        return ours, host


@pytest.fixture(scope="module")
def probe(request, comfy_host):
    return Probe(request)


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), rtol=1e-4, atol=1e-4)


def expect(ok: bool, detail) -> None:
    if not ok:
        raise AssertionError(detail)


def _first(records: list, what: str) -> dict:
    expect(bool(records), f"{what} was never called")
    return records[0]


def _sampler_key(key: str):
    def check(p):
        seen = _first(p.sampling.patch, "the attn2 patch")
        expect(key in seen, f"the attn2 patch's extra_options have no '{key}' (keys: {sorted(map(str, seen))})")
    return check


def _sigmas_per_chunk(p):
    seen = _first(p.sampling.patch, "the attn2 patch")
    chunks = len(seen["cond_or_uncond"])
    expect(seen["sigmas"].shape[0] * chunks == seen["context_rows"],
           f"sigmas {tuple(seen['sigmas'].shape)} for {seen['context_rows']} rows in {chunks} chunks: the pack's "
           f"passes set one sigma per row of a chunk")


def _block_keys(p):
    seen = {(*r["block"], r.get("block_index", 0)) for r in p.sampling.patch}
    expect(seen == set(p.sampling.layers), f"the host's layers (block, block_index) {sorted(seen)} are not the "
                                           f"pack's keys {sorted(p.sampling.layers)} (attention_patch/layers.py)")


def _activations_shape(p):
    shape = _first(p.sampling.patch, "the attn2 patch").get("activations_shape")
    expect(shape is not None and len(shape) == 4, f"activations_shape {shape!r}: the pack reads its last two as H, W")


def _two_part_key(p):
    expect(bool(p.sampling.replace), f"a replacement at the 2-part key {p.sampling.last_layer[:2]} (how "
                                     f"IPAdapter_plus registers SD1 layers) never ran")
    expect("n_heads" in p.sampling.replace[0], f"extra_options of attn2 replacements: {sorted(p.sampling.replace[0])}")


def _override(p):
    from comfy.ldm.modules import attention

    if not hasattr(attention, "wrap_attn"):
        _no_region_masks(p)
        return
    tokens = {r["tokens"] for r in p.sampling.override}
    expect(77 in tokens, f"optimized_attention_override was not called for cross-attention (k lengths: {tokens})")


def _masked_attention(q, k, v, heads, mask):
    """softmax(QKᵀ/√d + mask)V, mask (rows, HW, tokens) added for every head."""
    b, n, inner = q.shape
    d = inner // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) * d ** -0.5 + mask[:, None]
    return (torch.softmax(scores, dim=-1) @ split(v)).transpose(1, 2).reshape(b, n, inner)


def _region_call(heads: int = 2):
    """(q, k, v, pending mask, the masked reference): one cross-attention call whose identity column 1 is masked off
    for row 0's first two pixels, as attention_patch/regions.py RegionBias builds it."""
    from sefi_ide.attention_patch.regions import NEG

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=gen)  # 2 rows, 4 pixels, 2 heads of 4
    k, v = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)  # 5 tokens
    mask = torch.zeros(2, 4, 5)
    mask[0, :2, 1] = NEG
    return q, k, v, mask, _masked_attention(q, k, v, heads, mask)


def _region_mask_through_host_dispatch(p):
    """The host's own optimized_attention, called as its CrossAttention calls it: 0.33 wraps q/k/v in
    AttentionTensorContainer (0.38 also passes preferred_attention=ComfyAttention()); wrap_attn must hand the pack's
    override plain tensors and its mask= must reach the kernel."""
    from comfy.ldm.modules import attention
    from sefi_ide.attention_patch.regions import RegionAttention

    if not hasattr(attention, "wrap_attn"):
        _no_region_masks(p)
        return
    q, k, v, mask, want = _region_call()
    ours = RegionAttention()
    ours.pending = mask
    container = getattr(attention, "AttentionTensorContainer", None)
    args = (q, k, v) if container is None else (container(q), container(k), container(v))
    kwargs: dict = {"transformer_options": {"optimized_attention_override": ours}}
    if hasattr(attention, "ComfyAttention"):  # 0.38: the layer's own kernel choice rides along
        kwargs["preferred_attention"] = attention.ComfyAttention()
    with torch.inference_mode():
        out = attention.optimized_attention(*args, 2, **kwargs)
    expect(ours.pending is None and not ours.missed, "the pack's RegionAttention never took its pending mask "
                                                     f"(q/k/v handed as {type(args[0]).__name__})")
    expect(_close(out, want), "the region mask did not reach the host's attention kernel through "
                              "optimized_attention_override (attention_patch/regions.py)")


def _pyproject_on_host(p):
    """nodes.load_custom_node parses the pack's pyproject.toml with comfy_config (all hosts here): the registry id,
    the publisher, and no [tool.comfy] web (a second web folder under the project name would load the pack's
    frontend files twice where __init__.py also names one)."""
    import harness
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(harness.PACK_ROOT))
    expect(config is not None and config.project.name == "sefi-ide" and config.tool_comfy.publisher_id == "sefi-ide",
           f"the host read {config!r}")
    expect(not config.tool_comfy.web, f"[tool.comfy] web = {config.tool_comfy.web!r}")


def _clone_is_separate(p):
    import comfy.patcher_extension

    model = p.sd1[0]
    s = p.sampling  # patched and wrapped a clone
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    outer = model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    expect(s.patch and s.patch_fn not in patches and "sefi_surface_probe" not in outer,
           "a clone's set_model_attn2_patch / add_wrapper_with_key reached the original MODEL")


def _outer_sample(p):
    expect(p.sampling.outer == [True], f"OUTER_SAMPLE wrapper calls: {p.sampling.outer}")


def _sample(p):
    s = p.sampling
    expect(s.samples.shape == s.latent.shape, f"samples {tuple(s.samples.shape)} for a latent {tuple(s.latent.shape)}")
    expect(s.noise.shape == s.latent.shape, f"noise {tuple(s.noise.shape)} for a latent {tuple(s.latent.shape)}")


def _conditioning(p):
    seen = _first(p.sampling.patch, "the attn2 patch")
    expect(seen["context_tokens"] == 77, f"the positive [[cond, {{'pooled_output'}}]] reached attention as "
                                         f"{seen['context_tokens']} tokens")
    neg = p.sampling.negative
    expect(isinstance(neg, list) and isinstance(neg[0][0], torch.Tensor) and isinstance(neg[0][1], dict),
           f"encode_from_tokens_scheduled returned {type(neg)}")


def _decode(p):
    expect(tuple(p.sampling.pixels.shape) == (1, 64, 64, 3), f"decode gave {tuple(p.sampling.pixels.shape)}, "
                                                             f"the batch command takes [0] as (H, W, 3)")


def _eps_convention(p):
    u = p.unet_pass
    expect(bool(u.unet_out), "the DIFFUSION_MODEL wrapper never ran")
    expect(_close(u.eps_pred, u.unet_out[-1]), "ε from apply_model's output ((x - denoised) / sigma) is not the "
                                               "UNet's output: apply_model no longer returns x0 of an ε-model")


def _noise_scaling(p):
    u = p.unet_pass
    expect(_close(u.x, u.z0 + u.eps * u.sigma.view(-1, 1, 1, 1)), "noise_scaling(sigma, noise, latent) is not "
                                                                   "latent + noise·sigma")


def _sigma_timestep(p):
    u = p.unet_pass
    expect(torch.allclose(u.t_back.float(), torch.tensor([500.0]), atol=0.5), f"timestep(sigma(500)) = {u.t_back}")


def _replace_three_part(p):
    u = p.unet_pass
    expect(len(u.maps) == len(u.capture), f"{len(u.maps)} maps captured at the {len(u.capture)} layers the pack "
                                          f"keys (block, id, index) in transformer_options['patches_replace']['attn2']")
    expect(all(m.shape[-1] == 77 for m in u.maps), f"map shapes {[tuple(m.shape) for m in u.maps]}: n_heads split")


def _three_part_first(p):
    expect(not p.unet_pass.foreign_replace, "another pack's 2-part replacement ran where the pack's 3-part key is "
                                            "set: the host's lookup order changed (host/backend.py _warn_replaced)")


def _patches_run(p):
    seen = _first(p.unet_pass.foreign_patch, "another pack's attn2 patch in model_options, in the pack's pass,")
    for key in ("cond_or_uncond", "uuids", "sigmas"):
        expect(key in seen, f"'{key}' the pack sets is not in the extra_options patches see ({sorted(seen)})")


def _wrappers_run(p):
    import comfy.patcher_extension

    kinds = comfy.patcher_extension.WrappersMP
    expect(set(p.unet_pass.wrappers) == {kinds.APPLY_MODEL, kinds.DIFFUSION_MODEL},
           f"wrappers run from transformer_options['wrappers']: {p.unet_pass.wrappers}")


def _instance_forward(p):
    expect(p.unet_pass.forwards >= p.unet_pass.units, f"instance forwards ran {p.unet_pass.forwards} times for "
                                                      f"{p.unet_pass.units} ResBlock/BasicTransformerBlock modules")


def _block_options_keyword(p):
    seen = p.unet_pass.block_options
    expect(seen and all(seen), f"BasicTransformerBlock calls with transformer_options as a keyword dict: {seen} (the "
                               f"checkpointed forward copies it from kwargs for the recompute)")


def _tokens(p):
    empty = p.text.empty
    expect(set(empty) == {"l"}, f"SD1 tokenize keys {sorted(empty)}")
    chunk = empty["l"][0]
    expect(len(chunk) == 77 and all(isinstance(t, tuple) and isinstance(t[0], int) for t in chunk),
           f"a chunk: {len(chunk)} entries, first {chunk[:2]}")
    expect(chunk[0][0] == 49406 and chunk[1][0] == 49407, f"'' tokenizes to {chunk[:2]}: the pack reads the end "
                                                          f"token at [0][1][0]")


def _vector_for_id(p):
    t = p.text
    expect(_close(t.same_row, t.plain), "a token's own embedding row in place of its id does not encode the same")
    expect(not _close(t.other_row, t.plain), "another vector in place of a token id changes nothing")


def _pooled_rows(p):
    t = p.text
    expect(bool(t.pooled_rows) and _close(t.pooled_rows[0][:1], t.pooled),  # [0]: the first of the three encodes
           "the encoder module's forward output [1] is not the pooled output encode_from_tokens returns")


def _intermediate_device(p):
    expect(p.text.intermediate_calls > 0, "the text encoder no longer asks comfy.model_management."
                                          "intermediate_device() at call time (host/text.py host_outputs_on)")


def _vae(p):
    ours, host = p.vae_encode
    expect(_close(ours, host), "the pack's encode (load_models_gpu, process_input, first_stage_model.encode) differs "
                               "from VAE.encode")


def _loader(p):
    import comfy.model_patcher
    import comfy.sd
    from tiny_models import tiny_sd1_checkpoint

    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(tiny_sd1_checkpoint(seed=0)), output_vae=True,
                                                    output_clip=True)
    expect(len(out) == 4, f"{len(out)} values; cli/batch.py unpacks (model, clip, vae, clipvision)")
    kinds = (comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)
    expect(all(isinstance(o, k) for o, k in zip(out, kinds)), f"{[type(o) for o in out]}")


def _sdxl_text(p):
    model, clip, _ = p.sdxl
    keys = set(clip.tokenize("a"))
    expect(keys == {"l", "g"}, f"SDXL tokenize keys {sorted(keys)}")
    expect(model.model.model_config.unet_config.get("context_dim") == 2048, "SDXL unet_config context_dim")
    rows = []
    handle = clip.cond_stage_model.clip_g.register_forward_hook(lambda module, args, out: rows.append(out[1]))
    try:
        with torch.inference_mode():
            _, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    finally:
        handle.remove()
    expect(len(rows) == 1 and _close(rows[0][:1], pooled), "clip_g's forward output [1] is not the pooled output")


def _sdxl_adm(p):
    model = p.sdxl[0].model
    probes = torch.stack([torch.zeros(1280), torch.linspace(-1, 1, 1280)])
    adm = model.encode_adm(pooled_output=probes, width=64, height=64, target_width=64, target_height=64, crop_w=0,
                           crop_h=0)
    expect(adm is not None and adm.shape[0] == 2 and not torch.equal(adm[0], adm[1]),
           f"encode_adm(pooled_output=...) gave {None if adm is None else tuple(adm.shape)}: the keyword is not read")
    sd1_adm = p.sd1[0].model.encode_adm(pooled_output=probes, width=64, height=64, target_width=64, target_height=64,
                                        crop_w=0, crop_h=0)
    expect(sd1_adm is None, "an SD1 model's encode_adm is not None: the pack would pass it a `y`")


def _progress(p):
    import comfy.utils
    from PIL import Image

    seen = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: seen.append((value, total, preview)))
    try:
        preview = ("JPEG", Image.new("RGB", (8, 8)), 512)
        comfy.utils.ProgressBar(3).update_absolute(1, 3, preview)
    finally:
        comfy.utils.set_progress_bar_global_hook(before)
    expect(seen and seen[0][:2] == (1, 3) and seen[0][2] is preview, f"the hook got {seen}")


def _interrupt(p):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:  # an Exception before 0.28, a BaseException from 0.28 on: the pack catches BaseException
        mm.throw_exception_if_processing_interrupted()
    except mm.InterruptProcessingException:
        pass
    else:
        raise AssertionError("no exception after interrupt_current_processing(True)")
    finally:
        mm.interrupt_current_processing(False)


def _folders(p):
    import tempfile

    import folder_paths

    name = f"sefi_surface_probe_{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp())
    (folder / "a.safetensors").write_bytes(b"")
    folder_paths.folder_names_and_paths[name] = ([str(folder)], {".safetensors"})
    try:
        expect(folder_paths.get_folder_paths(name)[0] == str(folder), "get_folder_paths of a registered folder")
        expect(folder_paths.get_filename_list(name) == ["a.safetensors"], "get_filename_list")
        expect(Path(folder_paths.get_full_path(name, "a.safetensors")) == folder / "a.safetensors", "get_full_path")
        expect("embeddings" in folder_paths.folder_names_and_paths, "no 'embeddings' folder (the export's)")
    finally:
        folder_paths.folder_names_and_paths.pop(name, None)
        getattr(folder_paths, "filename_list_cache", {}).pop(name, None)


def _load_image(p):
    import tempfile

    import folder_paths
    from PIL import Image

    import nodes

    folder = Path(tempfile.mkdtemp())
    Image.new("RGB", (16, 8), (255, 0, 0)).save(folder / "photo.png")
    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(folder))
    try:
        image = nodes.LoadImage().load_image("photo.png")[0]
    finally:
        folder_paths.set_input_directory(before)
    expect(folder_paths.get_input_directory() == before, "set_input_directory did not restore")
    expect(tuple(image.shape) == (1, 8, 16, 3) and float(image[0, 0, 0, 0]) == 1.0, f"IMAGE {tuple(image.shape)}")


def _api_graph(p):
    from sefi_ide.cli.batch import RenderJob, api_graph

    import nodes

    graph = api_graph("x.safetensors", "a photo of <x>", RenderJob(prompt="a photo of {id}"))
    for node in graph.values():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if node["class_type"] in ("LoadIDEmbedding", "ApplyPerStageIDTokens"):
            continue  # the pack's own
        expect(cls is not None, f"no core node {node['class_type']}")
        spec = cls.INPUT_TYPES()
        names = {**spec.get("required", {}), **spec.get("optional", {})}
        missing = sorted(set(node["inputs"]) - set(names))
        expect(not missing, f"{node['class_type']} has no input(s) {missing}")


def _load_embed(p):
    import tempfile

    import comfy.sd1_clip
    from safetensors.torch import save_file
    from sefi_ide.core.textual_inversion import FILE_KEYS

    folder = tempfile.mkdtemp()
    for family, (clip, widths) in {"sd1": (p.sd1[1], {"clip_l": 768}),
                                   "sdxl": (p.sdxl[1], {"clip_l": 768, "clip_g": 1280})}.items():
        vectors = {enc: torch.randn(1, w) for enc, w in widths.items()}
        save_file({FILE_KEYS[family][enc]: v for enc, v in vectors.items()}, f"{folder}/{family}.safetensors")
        for enc, vec in vectors.items():
            tokenizer = getattr(clip.tokenizer, enc)
            got = comfy.sd1_clip.load_embed(family, folder, tokenizer.embedding_size, tokenizer.embedding_key)
            expect(got is not None and got.numel() == vec.numel() and torch.equal(got.reshape(vec.shape), vec),
                   f"{family} {enc}: the host read another tensor of the exported file (key "
                   f"'{tokenizer.embedding_key}' asked, file keys {sorted(FILE_KEYS[family].values())})")


def _compile_key(p):
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY as host_key
    from sefi_ide.host.backend import COMPILE_KEY

    expect(host_key == COMPILE_KEY, f"TorchCompileModel's wrapper key is '{host_key}', the pack looks for "
                                    f"'{COMPILE_KEY}'")


def _clip_patcher_model(p):
    clip = p.sd1[1]
    expect(clip.patcher.model is clip.cond_stage_model, "CLIP.patcher.model is not CLIP.cond_stage_model: the pack "
                                                        "sets one from the other for DynamicVRAM's copy")


def _dynamic_off_on_cpu(p):
    model, clip, _ = p.sd1
    if hasattr(model, "is_dynamic"):
        expect(not model.is_dynamic() and not clip.patcher.is_dynamic(), "a CPU model reports itself dynamic")
    _no_dynamic(p)


def _non_dynamic_copies(p):
    """host/dynamic_vram.py's calls on a MODEL and a CLIP that report themselves dynamic (clones of the CPU load
    marked so, as a ModelPatcherDynamic answers on a GPU; the real dynamic patchers: tests/test_dynamic_vram.py):
    `clone(disable_dynamic=True)` re-runs the loader the checkpoint loader registered and gives an ordinary patcher
    over a fresh module with the same weights, patches and model options; without that registration it raises the
    RuntimeError the pack turns into its message; the CLIP rebuilt the pack's way encodes as the user's."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic"):  # before 0.16: learned as given
        _no_dynamic(p)
        return
    model, clip, _ = p.sd1
    with torch.inference_mode():
        dynamic = model.clone()
        dynamic.is_dynamic = lambda: True
        key = next(iter(dynamic.model.state_dict()))
        dynamic.add_patches({key: (torch.zeros(()),)}, 0.5)  # a LoRA-like weight patch
        dynamic.model_options["sefi_surface_probe"] = 1
        copy = dynamic.clone(disable_dynamic=True)
        expect(type(copy) is comfy.model_patcher.ModelPatcher and not copy.is_dynamic(),
               f"MODEL.clone(disable_dynamic=True) of a dynamic patcher is a {type(copy).__name__} with is_dynamic() "
               f"{copy.is_dynamic()}, not an ordinary ModelPatcher")
        expect(copy.model is not model.model and type(copy.model) is type(model.model),
               "MODEL.clone(disable_dynamic=True) did not load a module of its own (the pack would learn on the "
               "user's dynamic one)")
        weights, user = copy.model.state_dict(), model.model.state_dict()
        expect(weights.keys() == user.keys() and all(torch.equal(weights[k], user[k]) for k in user),
               "MODEL.clone(disable_dynamic=True) loaded other weights than the checkpoint's")
        expect(set(copy.patches) == set(dynamic.patches) == {key} and copy.model_options.get("sefi_surface_probe"),
               "MODEL.clone(disable_dynamic=True) dropped the MODEL's weight patches or model options")
        unregistered = model.clone()
        unregistered.is_dynamic = lambda: True
        unregistered.cached_patcher_init = None  # a custom loader that registers no reload factory
        try:
            unregistered.clone(disable_dynamic=True)
        except RuntimeError:
            pass  # host/dynamic_vram.py _non_dynamic: caught, refused with the fix
        else:
            raise AssertionError("clone(disable_dynamic=True) without cached_patcher_init did not raise RuntimeError")

        patcher = clip.patcher.clone()
        patcher.is_dynamic = lambda: True
        text = patcher.clone(disable_dynamic=True)
        expect(not text.is_dynamic() and text.model is not clip.cond_stage_model
               and type(text.model) is type(clip.cond_stage_model),
               "CLIP.patcher.clone(disable_dynamic=True) gave no ordinary patcher over a text encoder of its own")
        rebuilt = clip.clone()
        rebuilt.patcher, rebuilt.cond_stage_model = text, text.model  # host/dynamic_vram.py learning_copies
        tokens = clip.tokenize("a photo of a person")
        mine, theirs = rebuilt.encode_from_tokens(tokens), clip.encode_from_tokens(tokens)
        expect(_close(mine, theirs), "the CLIP on CLIP.patcher.clone(disable_dynamic=True)'s module encodes "
                                     "otherwise than the user's")


def _comfy_folder(p):
    import comfy

    root = Path(comfy.__path__[0]).parent
    expect((root / "main.py").is_file() and (root / "comfy").is_dir(), f"{root}: no main.py beside comfy/ (how "
                                                                        f"cli/bootstrap.py finds ComfyUI)")


B = pytest.param
BEHAVIOUR = [
    B(_sample, id="comfy.sample.sample + prepare_noise (1-step CFG sampling)"),
    B(_conditioning, id="CONDITIONING [[cond, {'pooled_output'}]] + CLIP.encode_from_tokens_scheduled"),
    B(_decode, id="comfy.sd.VAE.decode -> (B, H, W, 3)"),
    B(_sampler_key("cond_or_uncond"), id="transformer_options['cond_or_uncond'] (set by the sampler)"),
    B(_sampler_key("uuids"), id="transformer_options['uuids'] (set by the sampler)"),
    B(_sampler_key("sigmas"), id="transformer_options['sigmas'] (read by the attn2 patch)"),
    B(_sigmas_per_chunk, id="transformer_options['sigmas'] one per row of a chunk"),
    B(_block_keys, id="transformer_options['block'] + ['block_index'] = the pack's layer keys"),
    B(_activations_shape, id="transformer_options['activations_shape']"),
    B(_two_part_key, id="transformer_options['patches_replace']['attn2'][(block, id)] + extra_options['n_heads']"),
    B(_override, id="transformer_options['optimized_attention_override'] (0.3.60+)"),
    B(_pyproject_on_host, id="comfy_config.config_parser.extract_node_configuration reads the pack's pyproject.toml"),
    B(_region_mask_through_host_dispatch, id="comfy.ldm.modules.attention.wrap_attn hands the override tensors, "
                                             "mask= reaches the kernel (AttentionTensorContainer from 0.33)"),
    B(_clone_is_separate, id="comfy.model_patcher.ModelPatcher.clone keeps patches and wrappers apart"),
    B(_outer_sample, id="WrappersMP.OUTER_SAMPLE wrapper(executor, *args, **kwargs)"),
    B(_eps_convention, id="comfy.model_base.BaseModel.apply_model returns x0 (eps-model)"),
    B(_noise_scaling, id="comfy.model_sampling.EPS.noise_scaling = latent + noise * sigma"),
    B(_sigma_timestep, id="comfy.model_sampling.ModelSamplingDiscrete.sigma / timestep inverse"),
    B(_replace_three_part, id="transformer_options['patches_replace']['attn2'][(block, id, index)] fn(q, k, v, eo)"),
    B(_three_part_first, id="patches_replace['attn2'] lookup: 3-part key before 2-part"),
    B(_patches_run, id="transformer_options['patches']['attn2_patch'] in the pack's pass"),
    B(_wrappers_run, id="transformer_options['wrappers'] (APPLY_MODEL, DIFFUSION_MODEL) + merge_nested_dicts"),
    B(_instance_forward, id="ResBlock / BasicTransformerBlock called through instance forward"),
    B(_block_options_keyword, id="BasicTransformerBlock.forward(..., transformer_options=dict)"),
    B(_tokens, id="comfy.sd.CLIP.tokenize layout {'l': [[(id, weight), ...77]]}"),
    B(_vector_for_id, id="comfy.sd1_clip token tuple with a tensor in place of the id"),
    B(_pooled_rows, id="comfy.sd1_clip.SD1ClipModel.clip_l forward output[1] = pooled"),
    B(_intermediate_device, id="comfy.model_management.intermediate_device looked up at call time"),
    B(_vae, id="comfy.sd.VAE encode path (load_models_gpu, process_input, first_stage_model)"),
    B(_loader, id="comfy.sd.load_checkpoint_guess_config returns 4 values"),
    B(_sdxl_text, id="comfy.sdxl_clip tokenize keys + clip_g forward output[1] = pooled"),
    B(_sdxl_adm, id="comfy.model_base.SDXL.encode_adm keywords (SD1: None)"),
    B(_progress, id="comfy.utils.ProgressBar.update_absolute preview ('JPEG', PIL.Image, max_size)"),
    B(_interrupt, id="comfy.model_management.InterruptProcessingException raised on interrupt"),
    B(_folders, id="folder_paths.folder_names_and_paths registration + lookups"),
    B(_load_image, id="nodes.LoadImage.load_image with folder_paths.set_input_directory"),
    B(_api_graph, id="nodes.NODE_CLASS_MAPPINGS core nodes + inputs of the batch command's PNG graph"),
    B(_load_embed, id="comfy.sd1_clip.load_embed reads the exported embedding (embedding_key)"),
    B(_compile_key, id="comfy_api.torch_helpers.torch_compile.COMPILE_KEY = the pack's"),
    B(_clip_patcher_model, id="comfy.sd.CLIP.patcher.model is cond_stage_model"),
    B(_dynamic_off_on_cpu, id="comfy.model_patcher.ModelPatcher.is_dynamic False on a CPU (0.16+)"),
    B(_non_dynamic_copies, id="comfy.model_patcher.ModelPatcher.clone(disable_dynamic=True) of a dynamic MODEL and "
                              "CLIP.patcher: a fresh ordinary load, patches kept (0.16+)"),
    B(_comfy_folder, id="comfy package beside main.py (cli/bootstrap.py find_comfyui)"),
]


@pytest.mark.parametrize("check", BEHAVIOUR)
def test_behaviour(check, probe, request):
    try:
        check(probe)
    except Exception as exc:  # noqa: BLE001 (reported with the internal's name; pytest's outcomes pass through)
        changed(request.node.callspec.id, f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError)
                else str(exc))


# --- 3. keys in the host's source ----------------------------------------------------------------------------------

SOURCE = [
    # (internal, file in the ComfyUI folder, what must occur there, since)
    ("server.PromptServer node_info reads the node class keys", "server.py",
     ("INPUT_TYPES", "RETURN_TYPES", "RETURN_NAMES", "CATEGORY", "OUTPUT_NODE", "OUTPUT_IS_LIST", "DESCRIPTION",
      "OUTPUT_TOOLTIPS"), ""),
    ("server.PromptServer node_info reads SEARCH_ALIASES", "server.py", ("SEARCH_ALIASES",), "0.16"),
    ("server.PromptServer.send_image takes (type, PIL image, max_size)", "server.py",
     ("def send_image(self, image_data", "image_data[0]", "image_data[1]", "image_data[2]"), ""),
    ("main.py progress hook sends the preview", "main.py", ("preview_image", "UNENCODED_PREVIEW_IMAGE"), ""),
    ("execution.py calls the node's FUNCTION in inference mode, reads its output {'ui': ..., 'result': ...}",
     "execution.py", ("obj.FUNCTION", "torch.inference_mode()", "'ui' in r", "\"result\""), ""),
    ("execution.py catches InterruptProcessingException", "execution.py",
     ("comfy.model_management.InterruptProcessingException",), ""),
    ("nodes.py loads NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS", "nodes.py",
     ("module.NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"), ""),
    # up to 0.33 a static route of the whole folder; upstream 0.38 (read) a handler serving the .json files only (our
    # .jpg cards: nodes/template_cards.py, matched first because custom nodes load before the host adds its routes)
    ("app/custom_node_manager.py serves example_workflows/ at /api/workflow_templates/<pack>/",
     "app/custom_node_manager.py",
     ("example_workflows",
      ('"/api/workflow_templates/" + module_name', '"/workflow_templates/{module_name}/{filename}"')), ""),
]
# a needle that is a tuple: any one of its forms


def _found(needle, text: str) -> bool:
    return any(form in text for form in (needle if isinstance(needle, tuple) else (needle,)))


@pytest.mark.parametrize("name, file, needles, since", SOURCE, ids=[row[0] for row in SOURCE])
def test_source(name, file, needles, since, comfy_host):
    path = Path(comfy_host) / file
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    missing = [n for n in needles if not _found(n, text)]
    if not missing:
        return
    if since and _version(host_version()) < _version(since):
        return  # an older host without it: it ignores the key (nothing of the pack depends on it)
    changed(name, f"{file} lacks {missing}" + (f" (present from {since} on)" if since else ""))


ORDER = [
    # (internal, file, what must come before what)
    (("main.py loads custom nodes before the server adds its own routes (the pack's card route is matched before the "
      "host's 0.38 template handler, which answers .json only)"),
     "main.py", ("init_extra_nodes(", ".add_routes()")),
]


@pytest.mark.parametrize("name, file, needles", ORDER, ids=[row[0] for row in ORDER])
def test_source_order(name, file, needles, comfy_host):
    text = (Path(comfy_host) / file).read_text(encoding="utf-8")
    at = [text.find(n) for n in needles]
    if -1 in at or at != sorted(at):
        changed(name, f"{file}: {list(zip(needles, at))} (position; -1: absent)")


# --- 4. upstream 0.38, read but not run here: faithful stand-ins ----------------------------------------------------
# Each names the 0.38 behaviour and the upstream file it restates (Comfy-Org/ComfyUI, read as single files; CONTRIBUTING
# "ComfyUI internals this pack uses"). When CI builds a host that has the behaviour, the real-host rows above cover it.

class _Container:
    """0.38 comfy/ldm/modules/attention.py AttentionTensorContainer: a tensor taken once."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor: torch.Tensor | None = tensor

    def take(self) -> torch.Tensor:
        tensor, self.tensor = self.tensor, None
        if tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return tensor


def _wrap_attn_0_38(func: Callable) -> Callable:
    """0.38's wrap_attn dispatch, restated: preferred_attention= is dropped before anything sees it; with q/k/v in
    containers, an override that has a `container_function` gets the containers, any other override gets the tensors
    as override(func, q, k, v, heads, ..., transformer_options=, _inside_attn_wrapper=True); without an override, the
    layer's preferred kernel, else func."""
    def wrapper(*args, **kwargs):
        preferred = kwargs.pop("preferred_attention", None)
        containers = isinstance(args[0], _Container)
        kwargs["_inside_attn_wrapper"] = True
        override = kwargs.get("transformer_options", {}).get("optimized_attention_override")
        if override is not None:
            if containers and hasattr(override, "container_function"):
                return override.container_function(*args, **kwargs)
            if containers:
                args = tuple(c.take() for c in args[:3]) + args[3:]
            return override(func, *args, **kwargs)
        if containers:
            args = tuple(c.take() for c in args[:3]) + args[3:]
        if preferred is not None and preferred.function is not None:
            return preferred.function(*args, **kwargs)
        return func(*args, **kwargs)
    return wrapper


def test_0_38_region_mask_through_attention_containers():
    """0.38 CrossAttention: optimized_attention(Container(q), Container(k), Container(v), heads, attn_precision=,
    preferred_attention=ComfyAttention(), transformer_options=) (comfy/ldm/modules/attention.py). The pack's
    RegionAttention, chained after another pack's override that has a container_function (as
    ModelPatcher.set_model_optimized_attention builds one), must show no container_function itself (else the
    dispatch would skip it and its mask), get tensors, hand the mask on and still call the other override."""
    from sefi_ide.attention_patch.regions import RegionAttention

    q, k, v, mask, want = _region_call()
    seen = []

    def kernel(q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        seen.append((type(q), "preferred_attention" in kwargs))
        return _masked_attention(q, k, v, heads, torch.zeros(1, 1, 1) if mask is None else mask)

    def other_pack(func, *args, **kwargs):
        return func(*args, **kwargs)
    other_pack.container_function = lambda *a, **kw: pytest.fail("the other pack's container_function ran in place "
                                                                "of the pack's RegionAttention")

    ours = RegionAttention(previous=other_pack)
    ours.pending = mask
    attention = _wrap_attn_0_38(kernel)
    try:
        out = attention(_Container(q), _Container(k), _Container(v), 2, attn_precision=None,
                        preferred_attention=SimpleNamespace(function=None),
                        transformer_options={"optimized_attention_override": ours})
    except Exception as exc:  # noqa: BLE001 (reported with the internal's name)
        changed("comfy.ldm.modules.attention.wrap_attn (0.38 stand-in)", f"{type(exc).__name__}: {exc}")
    if hasattr(ours, "container_function") or ours.pending is not None or seen != [(torch.Tensor, False)]:
        changed("comfy.ldm.modules.attention.wrap_attn (0.38 stand-in)",
                f"the pack's override exposes container_function: {hasattr(ours, 'container_function')}; kernel "
                f"calls (q type, preferred_attention seen): {seen}; mask taken: {ours.pending is None}")
    if not _close(out, want):
        changed("comfy.ldm.modules.attention.wrap_attn (0.38 stand-in)", "the region mask did not reach the kernel")


def _pack_modules() -> list[str]:
    """Every module of the pack a user's ComfyUI imports (nodes, host, attention_patch, core), imported."""
    import pkgutil

    import sefi_ide

    names = []
    for sub in ("nodes", "host", "attention_patch", "core"):
        package = importlib.import_module(f"sefi_ide.{sub}")
        names += [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    return [sefi_ide.__name__] + names


def test_0_38_clone_passes_fast_disk(comfy_host):
    """0.38 ModelPatcher.clone(): `class_(model, load_device, offload_device, size, weight_inplace_update=,
    fast_disk=)` with class_ = type(self) (comfy/model_patcher.py), so a patcher subclass whose __init__ lacks
    fast_disk breaks on clone(). The pack must hand out only the host's own patcher classes (it clones, never
    subclasses), or subclasses whose __init__ takes that call."""
    import comfy.model_patcher

    packs = tuple(_pack_modules())
    found, todo = [], [comfy.model_patcher.ModelPatcher]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith(packs):
                found.append(cls)
    for cls in found:
        try:
            inspect.signature(cls.__init__).bind(None, "model", "load_device", "offload_device", 0,
                                                 weight_inplace_update=False, fast_disk=False)
        except TypeError as exc:
            changed("comfy.model_patcher.ModelPatcher.clone (0.38 stand-in: fast_disk=)",
                    f"the pack's {cls.__module__}.{cls.__qualname__} cannot be cloned there: {exc}")


def test_0_38_governance_pack_digest():
    """0.38 app/governance.py: under an organisation's custom-node policy the pack folder is digested before it loads
    (pack_refusal / pack_digest) and refused if it holds a symlink or compiled bytecode; its entry file is compiled
    from source (pack_module_spec). The pack as shipped (git's tracked and untracked, not ignored, files) holds
    neither, and its __init__.py loads through a source-only loader as a package."""
    import importlib.machinery
    import importlib.util
    import subprocess

    import harness

    root = harness.PACK_ROOT
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [root / name for name in listed if name]
    links = [str(f.relative_to(root)) for f in files if f.is_symlink()]
    bytecode = [str(f.relative_to(root)) for f in files if f.suffix in (".pyc", ".pyo") or "__pycache__" in f.parts]
    if links or bytecode:
        changed("app/governance.py pack_digest (0.38 stand-in)", f"the pack would be refused under a custom-node "
                                                                 f"policy: symlinks {links}, bytecode {bytecode}")

    class SourceOnly(importlib.machinery.SourceFileLoader):  # governance._SourceOnlyLoader, restated
        def get_code(self, fullname):
            path = self.get_filename(fullname)
            return self.source_to_code(self.get_data(path), path)

    name = f"sefi_governed_{uuid.uuid4().hex[:8]}"
    entry = str(root / "__init__.py")
    spec = importlib.util.spec_from_file_location(name, entry, loader=SourceOnly(name, entry))
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        mappings = getattr(module, "NODE_CLASS_MAPPINGS", {})
    finally:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
    if not mappings:
        changed("app/governance.py pack_module_spec (0.38 stand-in)", "the pack's __init__.py loaded from source "
                                                                      "gave no NODE_CLASS_MAPPINGS")

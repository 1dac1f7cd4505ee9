"""Load a Stable Diffusion model for sampling, offline: an A1111 single-file checkpoint or a
diffusers pipeline folder -> a :class:`Model` (UNet, text encoders, VAE, tokenizers, schedule).

Tensors are read through :func:`lora_ext.io.open_tensors` (safetensors read lazily; pickles
only with ``weights_only``), modules are built from configs on the ``meta`` device and the
tensors assigned to them, so nothing is initialised twice and nothing is downloaded.

Single files
    The family (SD1.x / SD2.x / SDXL) is told by the text-encoder keys, and the shipped
    full-size configs (``lora_ext/configs``) describe it. A model of another size carries its
    configs itself: a JSON object under the safetensors metadata key ``lora_ext.configs``
    (or the same object in a sidecar file ``<checkpoint>.configs.json``)::

        {"family": "sd1" | "sd2" | "sdxl",       # how its keys are laid out
         "unet": {...UNet2DConditionModel config...},
         "te1": {...CLIPTextConfig...}, "te2": {...},      # te2 for SDXL-like models
         "vae": {...AutoencoderKL config...},
         "scheduler": {"prediction_type": "epsilon" | "v_prediction", "beta_start": ..., ...}}

    :func:`write_single_file` writes that form. Shapes are checked against the configs, so a
    file that fits neither says so instead of failing inside torch.

Prediction type (epsilon or v)
    The caller's ``prediction=`` wins; else the configs' scheduler; else the file's metadata
    (``modelspec.prediction_type``, ``ss_v_parameterization``) or a ``v_pred`` key; else an
    A1111 sidecar ``<checkpoint>.yaml`` with ``parameterization: "v"``; else, for SD2.x, the
    heuristic ComfyUI uses (the spread of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is larger in 768-v models); else
    epsilon.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .. import arch
from ..checkpoint import SINGLE_FILE_MARKERS
from ..errors import LoraFileError
from ..io import file_sha256, open_tensors, save_safetensors
from .convert import VAE_ROOT, join_ldm, ldm_slots, modern_vae_key, split_ldm
from .schedules import TrainingSchedule
from .tokenizer import find_tokenizers

__all__ = ["Model", "load_model", "write_single_file", "shipped_configs", "CONFIG_METADATA_KEY"]

CONFIG_METADATA_KEY = "lora_ext.configs"
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def _shipped(name: str) -> dict:
    with open(os.path.join(_CONFIG_DIR, name), encoding="utf-8") as fh:
        return json.load(fh)


def shipped_configs(family: str) -> dict:
    """The full-size configs of ``family``: unet, te1[, te2], vae, scheduler."""
    out = {comp: arch.load_config(family, comp) for comp in arch.components(family)}
    out["vae"] = _shipped("sdxl_vae.json" if family == "sdxl" else "sd_vae.json")
    out["scheduler"] = _shipped("sd_scheduler.json")
    return out


@dataclass
class Model:
    """Everything a sampling run needs. ``text_encoders``/``tokenizers`` are parallel lists
    (one pair for SD1.x/SD2.x, two for SDXL). ``family`` is "sd1", "sd2", "sdxl" or "custom";
    ``sdxl`` says whether the UNet takes SDXL's pooled text and size conditioning."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    schedule: TrainingSchedule
    prediction: str
    family: str
    path: str
    configs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # how things were decided (printed with -v)
    _hash: Optional[str] = None

    @property
    def sdxl(self) -> bool:
        return (self.unet.config.get("addition_embed_type") == "text_time")

    @property
    def name(self) -> str:
        base = os.path.basename(os.path.normpath(self.path))
        return base if os.path.isdir(self.path) else os.path.splitext(base)[0]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config["sample_size"]) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def components(self) -> dict:
        """``{"unet": ..., "te1": ..., "te2": ...}``, what ``lora_ext.apply`` takes."""
        out = {"unet": self.unet}
        for i, te in enumerate(self.text_encoders):
            out[f"te{i + 1}"] = te
        return out

    @property
    def hash(self) -> str:
        """A1111's model hash: the first 10 hex digits of the sha256 of the checkpoint file (of
        the UNet's weight file for a diffusers folder)."""
        if self._hash is None:
            path = self.path
            if os.path.isdir(path):
                path = _weight_files(os.path.join(path, "unet"))[0]
            self._hash = _sha256(path)[:10]
        return self._hash

    def to(self, device=None, dtype=None) -> "Model":
        """UNet and text encoders to ``device``/``dtype``; the VAE to ``device`` in float32."""
        self.unet.to(device=device, dtype=dtype)
        for te in self.text_encoders:
            te.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        return self


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime: int) -> str:
    return file_sha256(path)


def _sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# building modules


_TE_SKIP = ("architectures", "torch_dtype", "dtype", "transformers_version", "model_type")


def _build(component: str, config: Mapping) -> torch.nn.Module:
    """The module for ``config`` on the meta device."""
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(dict(config))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(dict(config))
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in _TE_SKIP}
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        return cls(CLIPTextConfig(**fields))


def _materialize(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 where: str) -> torch.nn.Module:
    """Assign ``tensors`` (model keys) to the meta ``model``; checks names and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith("position_ids")]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LoraFileError(where, f"{len(missing)} weights missing ({shown})")
    ready = {}
    for k, ref in expected.items():
        if k not in tensors:
            continue
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise LoraFileError(where, f"{k} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        ready[k] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(ready, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if leaf != "position_ids":
                raise LoraFileError(where, f"buffer {name} has no value")
            owner._buffers[leaf] = torch.arange(buf.shape[-1]).expand(buf.shape).contiguous()
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# single files


def _family_of(keys) -> Optional[str]:
    return next((fam for fam, marker in SINGLE_FILE_MARKERS if any(k.startswith(marker) for k in keys)), None)


def _configs_of_single_file(path: str, tf) -> tuple[str, dict, str]:
    """(family, configs, where the configs came from)."""
    raw = tf.metadata.get(CONFIG_METADATA_KEY)
    where = f"the file's {CONFIG_METADATA_KEY} metadata"
    if raw is None:
        sidecar = path + ".configs.json"
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as fh:
                raw = fh.read()
            where = sidecar
    if raw is not None:
        try:
            data = json.loads(raw)
            family = data["family"]
            if family not in arch.ARCHS:
                raise ValueError(f"family {family!r} is not one of {', '.join(arch.ARCHS)}")
            configs = {k: v for k, v in data.items() if k != "family"}
            base = shipped_configs(family)
            for comp in ("vae", "scheduler"):
                configs.setdefault(comp, base[comp])
            return family, configs, where
        except (ValueError, KeyError, TypeError) as exc:
            raise LoraFileError(path, f"bad model configs in {where}: {exc}") from None
    keys = tf.keys()
    family = _family_of(keys)
    if family is None:
        from ..dit.files import single_file_layout

        dit = single_file_layout(keys, tf.shape)
        if dit is not None:
            from ..detect import _label

            raise LoraFileError(path, f"is a {_label(dit[0])} checkpoint; the standalone sampler runs SD1.x, SD2.x "
                                      "and SDXL only. Use its LoRAs in ComfyUI, Forge or SD.Next (lora-ext nodes / "
                                      "extension), or bake them in with `lora-ext merge`")
        if any(k.startswith("model.diffusion_model.") for k in keys):
            raise LoraFileError(path, "has a UNet but no text encoder; generate needs a complete checkpoint")
        raise LoraFileError(path, "not a Stable Diffusion checkpoint: no model.diffusion_model.* keys")
    return family, shipped_configs(family), "the shipped full-size configs"


def _check_shapes(path: str, tf, configs: dict, family: str, where: str) -> None:
    """conv_in and the first attention say whether the configs fit the file at all."""
    unet = configs["unet"]
    want = (unet["block_out_channels"][0], unet.get("in_channels", 4), 3, 3)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    if key in tf and tuple(tf.shape(key)) != want:
        got = tuple(tf.shape(key))
        if got[1] != want[1] and got[0] == want[0]:
            raise LoraFileError(path, f"its UNet takes {got[1]} input channels (an inpainting or "
                                      f"other special model); generate needs a plain {want[1]}-channel model")
        raise LoraFileError(
            path, f"does not fit {where} for {_LABELS[family]}: {key} has shape {got}, expected {want}. "
                  f"A model of another size must carry its configs (safetensors metadata key "
                  f"{CONFIG_METADATA_KEY!r} or a sidecar {os.path.basename(path)}.configs.json)")


def _metadata_prediction(tf, path: str) -> Optional[tuple[str, str]]:
    md = tf.metadata
    pt = (md.get("modelspec.prediction_type") or "").strip().lower()
    if pt in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "modelspec.prediction_type metadata"
    if pt in ("epsilon", "eps"):
        return "epsilon", "modelspec.prediction_type metadata"
    if str(md.get("ss_v_parameterization", "")).strip().lower() == "true":
        return "v_prediction", "ss_v_parameterization metadata"
    if "v_pred" in tf:
        return "v_prediction", "its v_pred key"
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                s = line.strip().replace("'", "").replace('"', "")
                if s.startswith("parameterization:"):
                    value = s.split(":", 1)[1].strip()
                    return ("v_prediction" if value == "v" else "epsilon"), os.path.basename(yaml_path)
    return None


def _sd2_is_v(tf) -> Optional[bool]:
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if key not in tf:
        return None
    return float(tf.get(key).float().std(unbiased=False)) > 0.09


def _load_single_file(path: str, prediction: Optional[str], dtype, vae_path: Optional[str]):
    tf = open_tensors(path, kind="checkpoint")
    try:
        family, configs, where = _configs_of_single_file(path, tf)
        notes = [f"{_LABELS[family]}-layout single file; configs: {where}"]
        _check_shapes(path, tf, configs, family, where)
        keys = set(tf.keys())

        def read(key):
            return tf.get(key) if key in keys else None

        modules = {}
        for comp in list(arch.components(family)) + ["vae"]:
            cfg = configs.get(comp)
            if cfg is None:
                raise LoraFileError(path, f"no {comp} config in {where}")
            model = _build(comp, cfg)
            slots = ldm_slots(comp, model, cfg, family)
            if comp == "vae" and vae_path is None and not any(k.startswith(VAE_ROOT) for k in keys):
                raise LoraFileError(path, "has no VAE (first_stage_model.*); pass a VAE file (--vae)")
            if comp == "vae" and vae_path is not None:
                modules[comp] = _load_vae_file(vae_path, model, cfg, slots)
                continue
            tensors, missing = split_ldm(read, slots, family, comp)
            if missing:
                shown = ", ".join(slots[m].ldm_key for m in missing[:3])
                raise LoraFileError(path, f"{len(missing)} {comp} weights missing for {_LABELS[family]} ({shown} ...)")
            modules[comp] = _materialize(model, tensors, torch.float32 if comp == "vae" else dtype,
                                         f"{path} [{comp}]")
        pred = (prediction, "asked for") if prediction else None
        sched_pt = configs["scheduler"].get("prediction_type")
        if pred is None and where != "the shipped full-size configs" and sched_pt:
            pred = (sched_pt, where)
        pred = pred or _metadata_prediction(tf, path)
        if pred is None and family == "sd2":
            v = _sd2_is_v(tf)
            if v is not None:
                pred = ("v_prediction" if v else "epsilon", "SD2 v-model heuristic (norm1.bias spread)")
        pred = pred or ("epsilon", "default")
        notes.append(f"prediction: {pred[0]} ({pred[1]})")
        if where != "the shipped full-size configs":
            from ..layouts import family_from_unet_config

            tes = {c: configs[c] for c in arch.components(family) if c != "unet"}
            family = family_from_unet_config(configs["unet"], tes)  # "custom" unless full-size
        return family, configs, modules, pred[0], notes
    finally:
        tf.close()


def _load_vae_file(path: str, model, cfg, slots) -> torch.nn.Module:
    """A separate VAE file, in ldm names (with or without ``first_stage_model.``) or diffusers'."""
    tf = open_tensors(path, kind="checkpoint")
    try:
        keys = set(tf.keys())
        if any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in keys):
            tensors = {modern_vae_key(k): tf.get(k) for k in keys}
        else:
            prefix = VAE_ROOT if any(k.startswith(VAE_ROOT) for k in keys) else ""

            def read(key):
                k = prefix + key[len(VAE_ROOT):]
                return tf.get(k) if k in keys else None

            tensors, _ = split_ldm(read, slots, "sd1", "vae")
        return _materialize(model, tensors, torch.float32, path)
    finally:
        tf.close()


# ---------------------------------------------------------------------------------------------
# diffusers folders

_FOLDERS = (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2"), ("vae", "vae"))
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_WEIGHT_EXTS = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")


def _weight_files(folder: str) -> list[str]:
    for name in _WEIGHT_NAMES:
        for ext in _WEIGHT_EXTS:
            path = os.path.join(folder, name + ext)
            if os.path.isfile(path):
                return [path]
            index = path + ".index.json"
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as fh:
                    files = sorted(set(json.load(fh)["weight_map"].values()))
                return [os.path.join(folder, f) for f in files]
    raise LoraFileError(folder, "has config.json but no weight file")


def _read_folder_tensors(folder: str) -> dict:
    out = {}
    for f in _weight_files(folder):
        with open_tensors(f, kind="checkpoint") as tf:
            for k in tf.keys():
                out[k] = tf.get(k)
    return out


def _match_keys(model: torch.nn.Module, tensors: dict, component: str) -> dict:
    """File keys -> model keys: ``text_model.`` present or not (transformers 4 vs 5), old VAE
    attention names."""
    expected = set(model.state_dict().keys())
    out = {}
    for k, v in tensors.items():
        if component == "vae":
            k = modern_vae_key(k)
        if k in expected:
            out[k] = v
        elif "text_model." + k in expected:
            out["text_model." + k] = v
        elif k.startswith("text_model.") and k[len("text_model."):] in expected:
            out[k[len("text_model."):]] = v
    return out


def _load_folder(path: str, prediction: Optional[str], dtype, vae_path: Optional[str]):
    from ..layouts import family_from_unet_config

    configs, modules = {}, {}
    for comp, sub in _FOLDERS:
        cfg_path = os.path.join(path, sub, "config.json")
        if not os.path.isfile(cfg_path):
            continue
        with open(cfg_path, encoding="utf-8") as fh:
            configs[comp] = json.load(fh)
    for need in ("unet", "te1"):
        if need not in configs:
            raise LoraFileError(path, f"not a diffusers pipeline folder: no {dict(_FOLDERS)[need]}/config.json")
    if "vae" not in configs and vae_path is None:
        raise LoraFileError(path, "has no vae/ folder; pass a VAE file (--vae)")
    sched_cfg = {}
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_path):
        with open(sched_path, encoding="utf-8") as fh:
            sched_cfg = json.load(fh)
    configs["scheduler"] = sched_cfg or _shipped("sd_scheduler.json")
    family = family_from_unet_config(configs["unet"], {c: configs[c] for c in ("te1", "te2") if c in configs})
    for comp, sub in _FOLDERS:
        if comp not in configs:
            continue
        model = _build(comp, configs[comp])
        if comp == "vae" and vae_path is not None:
            modules[comp] = _load_vae_file(vae_path, model, configs[comp], ldm_slots("vae", model, configs[comp], "sd1"))
            continue
        tensors = _match_keys(model, _read_folder_tensors(os.path.join(path, sub)), comp)
        modules[comp] = _materialize(model, tensors, torch.float32 if comp == "vae" else dtype,
                                     os.path.join(path, sub))
    if "vae" not in configs:
        configs["vae"] = dict(modules["vae"].config)
    pred = prediction or configs["scheduler"].get("prediction_type") or "epsilon"
    label = _LABELS.get(family, "custom-size")
    notes = [f"{label} diffusers folder", f"prediction: {pred}"]
    return family, configs, modules, pred, notes


# ---------------------------------------------------------------------------------------------


def load_model(path, *, tokenizer: Optional[str] = None, vae: Optional[str] = None,
               prediction: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None) -> Model:
    """Load ``path`` (single file or diffusers folder) for sampling.

    ``tokenizer``: where the CLIP vocabulary is (see :mod:`.tokenizer`); ``vae``: a separate
    VAE file; ``prediction``: "epsilon" or "v_prediction" to override detection; ``dtype``
    of UNet and text encoders (default float32; the VAE is always float32).
    """
    path = os.fspath(path)
    if prediction is not None:
        prediction = {"v": "v_prediction", "eps": "epsilon"}.get(prediction, prediction)
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction must be 'epsilon' or 'v_prediction' (or 'eps' / 'v'), not {prediction!r}")
    if not os.path.exists(path):
        raise LoraFileError(path, "no such file or folder")
    dtype = dtype or torch.float32
    loader = _load_folder if os.path.isdir(path) else _load_single_file
    family, configs, modules, pred, notes = loader(path, prediction, dtype, vae)
    tes = [modules[c] for c in ("te1", "te2") if c in modules]
    default_pads = ("<|endoftext|>", "!") if family == "sdxl" or len(tes) == 2 else (
        ("!",) if family == "sd2" else ("<|endoftext|>",))
    toks = find_tokenizers(len(tes), tokenizer=tokenizer, checkpoint=path, default_pads=default_pads)
    notes.append("tokenizer: " + ", ".join(t.source for t in toks))
    model = Model(unet=modules["unet"], vae=modules["vae"], text_encoders=tes, tokenizers=toks,
                  schedule=TrainingSchedule.from_config(configs["scheduler"]), prediction=pred,
                  family=family, path=path, configs=configs, notes=notes)
    if device is not None:
        model.to(device)
    return model


def write_single_file(path, components: Mapping[str, torch.nn.Module], family: str, *,
                      scheduler: Optional[dict] = None, embed_configs: bool = True,
                      metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write live components ``{"unet", "te1"[, "te2"], "vae"}`` as an A1111 single file laid out
    like ``family``, with their configs in the ``lora_ext.configs`` metadata (unless
    ``embed_configs`` is False, for full-size models). Returns the path."""
    state_dicts, slots, configs = {}, {}, {"family": family}
    for comp, module in components.items():
        cfg = _config_dict(module)
        configs[comp] = cfg
        state_dicts[comp] = module.state_dict()
        slots[comp] = ldm_slots(comp, module, cfg, family)
    configs["scheduler"] = dict(scheduler or _shipped("sd_scheduler.json"))
    tensors = join_ldm(state_dicts, slots)
    md = dict(metadata or {})
    if embed_configs:
        md[CONFIG_METADATA_KEY] = json.dumps(configs)
    save_safetensors(path, tensors, md or None)
    return os.fspath(path)


def _config_dict(module) -> dict:
    cfg = module.config
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
        arch_name = type(module).__name__
        d["architectures"] = [arch_name]
        return d
    return copy.deepcopy(dict(cfg))

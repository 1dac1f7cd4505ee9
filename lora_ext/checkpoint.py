"""Checkpoints a LoRA can be baked into: A1111/ldm single files and diffusers folders.

Both expose the same small interface, per canonical module (component + diffusers path):
``layout`` (component -> module table), ``family`` ("sd1" | "sd2" | "sdxl" | "custom"),
``read(target, param)``, ``write(target, param, tensor)`` and ``save(out)``. Writes keep the
stored dtype; nothing touches the source files, and ``save`` writes atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from . import arch as archmod
from .errors import LoraFileError
from .io import open_tensors, save_safetensors
from .keys import Target
from .layouts import family_from_unet_config, table_from_model

Tensor = torch.Tensor


class Checkpoint:
    family: str = "custom"
    #: how the stored modules are named, for KeyMap (a DiT's original layout fuses q/k/v and
    #: swaps the final modulation's halves): "ldm" for single files, "diffusers" for folders
    naming: str = "ldm"
    layout: dict
    #: (component, path) -> (stored input channels, the table's): a wider input layer (an
    #: inpainting / instruct-pix2pix / depth UNet's conv_in); LoRAs read and write its first
    #: channels, as A1111's built-in handler pads their deltas
    widened: dict = {}

    @property
    def notes(self) -> list:
        from .hostmodel import widened_note

        return [widened_note(c, p, have, base) for (c, p), (have, base) in self.widened.items()]

    def _find_widened(self, shape_of) -> None:
        from .hostmodel import wider_input

        self.widened = {}
        for comp, table in self.layout.items():
            info = table.get("conv_in")
            shape = shape_of(comp, info) if info is not None else None
            if shape is not None and wider_input(info, tuple(shape)):
                self.widened[(comp, "conv_in")] = (shape[1], info.weight_shape[1])

    def _narrow(self, target, param, t):
        hit = self.widened.get((target.component, target.module)) if param == "weight" else None
        return t if hit is None or t is None else t[:, :hit[1]]

    def _widen(self, target, param, value, stored):
        """The full stored parameter with ``value`` written over its first input channels."""
        hit = self.widened.get((target.component, target.module)) if param == "weight" else None
        if hit is None:
            return value
        full = stored.clone()
        full[:, :hit[1]] = value.reshape(full[:, :hit[1]].shape).to(full.dtype)
        return full

    def read(self, target: Target, param: str) -> Optional[Tensor]:
        raise NotImplementedError

    def write(self, target: Target, param: str, value: Tensor) -> None:
        raise NotImplementedError

    def save(self, out) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def info(self, target: Target):
        return self.layout[target.component][target.module]


# --------------------------------------------------------------------------------------------
SINGLE_FILE_MARKERS = (
    ("sdxl", "conditioner.embedders.1.model."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
)


class SingleFileCheckpoint(Checkpoint):
    """An A1111 / ldm single-file checkpoint (``model.diffusion_model.*`` ...)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tf = open_tensors(self.path, kind="checkpoint")
        keys = set(self.tf.keys())
        self.pending: dict = {}  # ldm key -> new tensor (full param, stored dtype)
        from .dit.files import single_file_layout

        dit = single_file_layout(keys, self.tf.shape)
        if dit is not None:  # a Flux / Chroma / SD3 / Qwen-Image single file (original layout)
            self.family, self.layout = dit
            self.naming = "ldm"
            return
        self.family = next((fam for fam, marker in SINGLE_FILE_MARKERS if any(k.startswith(marker) for k in keys)), None)
        if self.family is None:
            if any(k.startswith("model.diffusion_model.") for k in keys):
                self.family = "sd1"  # UNet-only single file: its text encoder is not stored
            else:
                self.tf.close()
                raise LoraFileError(self.path, "not a Stable Diffusion checkpoint: no model.diffusion_model.* keys")
        self.layout = {}
        for comp in archmod.components(self.family):
            table = {p: i for p, i in archmod.module_table(self.family, comp).items() if i.ldm_weight in keys}
            if table:
                self.layout[comp] = table
        self._find_widened(lambda comp, info: self.tf.shape(info.ldm_weight) if info.ldm_weight in keys else None)
        probe = archmod.module_table(self.family, "unet").get("down_blocks.0.resnets.0.conv1")
        if probe is not None and probe.ldm_weight in keys and tuple(self.tf.shape(probe.ldm_weight)) != tuple(probe.weight_shape):
            self.tf.close()
            raise LoraFileError(
                self.path,
                f"unrecognised {archmod_label(self.family)} layout: {probe.ldm_weight} has shape "
                f"{tuple(self.tf.shape(probe.ldm_weight))}, expected {tuple(probe.weight_shape)}",
            )
        self.pending: dict = {}  # ldm key -> new tensor (full param, stored dtype)

    def _key(self, info, param):
        return info.ldm_weight if param == "weight" else info.ldm_bias

    def _param(self, key):
        return self.pending[key] if key in self.pending else self.tf.get(key)

    def read(self, target, param):
        info = self.info(target)
        key = self._key(info, param)
        if key is None or key not in self.tf_keys:
            return None
        t = self._narrow(target, param, self._param(key))
        if info.ldm_rows is not None:
            t = t[info.ldm_rows[0]:info.ldm_rows[1]]
        if info.ldm_transposed and param == "weight":
            t = t.t()
        return t.reshape(info.weight_shape if param == "weight" else info.bias_shape)

    def write(self, target, param, value):
        info = self.info(target)
        key = self._key(info, param)
        stored = self._param(key)
        if info.ldm_transposed and param == "weight":
            value = value.t()
        if info.ldm_rows is not None:
            full = stored.clone() if key not in self.pending else stored
            full[info.ldm_rows[0]:info.ldm_rows[1]] = value.reshape(full[info.ldm_rows[0]:info.ldm_rows[1]].shape).to(full.dtype)
            self.pending[key] = full
        else:
            value = self._widen(target, param, value, stored)
            self.pending[key] = value.reshape(stored.shape).to(stored.dtype).contiguous()

    @property
    def tf_keys(self):
        if not hasattr(self, "_keys"):
            self._keys = set(self.tf.keys())
        return self._keys

    def save(self, out):
        tensors = {k: (self.pending[k] if k in self.pending else self.tf.get(k)) for k in self.tf.keys()}
        save_safetensors(out, tensors, dict(self.tf.metadata) or None)

    def close(self):
        self.tf.close()


def archmod_label(family: str) -> str:
    return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(family, family)


# --------------------------------------------------------------------------------------------
# a DiT pipeline's denoiser is its "transformer" (component "unet"); Flux's text_encoder_2 and
# SD3's text_encoder_3 are T5s (component "te3", told by their config's model_type)
DIFFUSERS_COMPONENTS = (("unet", "unet"), ("unet", "transformer"), ("te1", "text_encoder"), ("te2", "text_encoder_2"),
                        ("te3", "text_encoder_3"))
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


#: an SD component's config.json is a few kB; its layer counts are tens, its lists short
MAX_CONFIG_BYTES = 1_000_000
_LAYER_KEYS = ("layers_per_block", "transformer_layers_per_block", "num_hidden_layers", "num_layers",
               "num_single_layers", "depth")
MAX_LAYERS = 1000
MAX_LIST = 64


def read_config(cfg_path: str) -> dict:
    """A component's config.json: a JSON object of bounded size and depth whose layer counts
    and lists are small enough to build a module table from; LoraFileError otherwise."""
    try:
        with open(cfg_path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise LoraFileError(cfg_path, f"cannot read config ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise LoraFileError(cfg_path, f"config larger than {MAX_CONFIG_BYTES // 1000} kB; not a model config")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise LoraFileError(cfg_path, "cannot read config (the JSON is nested too deeply)") from None
    except UnicodeDecodeError as exc:
        raise LoraFileError(cfg_path, f"cannot read config (not UTF-8 text, bad byte at position {exc.start})") from None
    except ValueError as exc:
        detail = f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else "not JSON"
        raise LoraFileError(cfg_path, f"cannot read config ({detail})") from None
    if not isinstance(cfg, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(cfg), "a number")
        raise LoraFileError(cfg_path, f"config is {kind}, not a JSON object")
    for key, value in cfg.items():
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise LoraFileError(cfg_path, f"config field {key!r} lists {len(value)} items, more than {MAX_LIST}")
        if key in _LAYER_KEYS:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, list):
                    v = max((x for x in v if isinstance(x, int)), default=0)
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LAYERS:
                    raise LoraFileError(cfg_path, f"config field {key!r} is {json.dumps(value)[:60]}, "
                                                  f"not a layer count from 0 to {MAX_LAYERS}")
    return cfg


class DiffusersFolder(Checkpoint):
    """A diffusers pipeline folder; components it lacks are simply absent."""

    naming = "diffusers"

    def __init__(self, path):
        self.path = os.fspath(path)
        self.layout, self.files, self.key_of = {}, {}, {}
        self.pending: dict = {}  # (component, key) -> tensor
        configs, weights = {}, {}
        for comp, sub in DIFFUSERS_COMPONENTS:
            folder = os.path.join(self.path, sub)
            cfg_path = os.path.join(folder, "config.json")
            if comp in configs or not os.path.isfile(cfg_path):
                continue
            weight = next((os.path.join(folder, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
            if weight is None:
                if any(f.endswith(".index.json") for f in os.listdir(folder)):
                    raise LoraFileError(folder, "sharded weights (an .index.json and several files) are not supported "
                                                "as a merge base yet; merge into the model's single-file checkpoint")
                raise LoraFileError(folder, "component folder has config.json but no weight file")
            cfg = read_config(cfg_path)
            if comp == "te2" and str(cfg.get("model_type", "")).lower() in ("t5", "umt5"):
                comp = "te3"  # Flux's second text encoder is its T5
            configs[comp], weights[comp] = cfg, weight
        for comp, weight in weights.items():
            try:
                self.files[comp] = open_tensors(weight, kind="checkpoint")
            except BaseException:
                self.close()
                raise
        if not self.files:
            raise LoraFileError(self.path, "not a diffusers pipeline folder: no unet/, text_encoder/ or text_encoder_2/ with config.json")
        try:
            self._build(configs)
        except BaseException:
            self.close()
            raise

    def _build(self, configs) -> None:
        try:
            self._build_layout(configs)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as exc:
            # a config whose fields have the wrong types or values for a model of its kind
            raise LoraFileError(self.path, f"a component config.json cannot be used: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0][:200] if str(exc) else 'bad value'}") from None

    def _build_layout(self, configs) -> None:
        self.family = family_from_unet_config(configs.get("unet"), configs)
        unet_cfg = configs.get("unet")
        if self.family == "custom" and unet_cfg and int(unet_cfg.get("in_channels", 4)) > 4:
            # an inpainting / instruct-pix2pix / depth UNet of a known family: its family's
            # table, with conv_in's extra input channels left alone (see Checkpoint.widened)
            plain = dict(configs, unet=dict(unet_cfg, in_channels=4))
            if family_from_unet_config(plain["unet"], plain) != "custom":
                self.family = family_from_unet_config(plain["unet"], plain)
        for comp, cfg in configs.items():
            keys = set(self.files[comp].keys())
            table = self._dit_table(comp, cfg, keys)
            if table is None:
                table = table_from_model(comp, cfg, self.family)
            # transformers < 5 saves CLIP text encoders with a "text_model." level; 5 drops it.
            lead = "text_model." if comp != "unet" and any(k.startswith("text_model.") for k in keys) else ""
            self.layout[comp] = table
            for path_, info in table.items():
                for param in ("weight", "bias"):
                    key = lead + path_ + "." + param
                    if comp != "unet" and path_ == "text_projection":
                        key = path_ + "." + param
                    if key in keys:
                        self.key_of[(comp, path_, param)] = key
                    elif param == "weight" and path_ in keys:  # a bare parameter (Wan's scale_shift_table)
                        self.key_of[(comp, path_, param)] = path_
        self._find_widened(lambda comp, info: self.files[comp].shape(self.key_of[(comp, info.path, "weight")])
                           if (comp, info.path, "weight") in self.key_of else None)

    def _dit_table(self, comp, cfg, keys):
        """The table of a DiT transformer (``transformer/``) or a T5 (``te3``), from the weight
        file's shapes; None for the SD components (their configs give their tables)."""
        if comp == "te3":
            from .dit.text import t5_dims, t5_table

            dims = t5_dims({k: tuple(self.files[comp].shape(k)) for k in keys})
            if dims is None:
                raise LoraFileError(self.path, "text_encoder_3 (or a T5 text_encoder_2) is not a T5 encoder")
            return t5_table(dims)
        if comp != "unet" or "block_out_channels" in cfg:
            return None
        from .dit import table_for_shapes

        found = table_for_shapes({k: tuple(self.files[comp].shape(k)) for k in keys})
        if found is None:
            raise LoraFileError(self.path, f"the denoiser ({cfg.get('_class_name', 'transformer')}) is no model family "
                                           "lora-ext knows (SD1.x/SD2.x/SDXL UNets, Flux, Chroma, SD3, Qwen-Image, "
                                           "HunyuanVideo, Wan, Lumina2, Z-Image, HiDream)")
        name, _, table = found
        self.family = name
        return table

    def read(self, target, param):
        key = self.key_of.get((target.component, target.module, param))
        if key is None:
            return None
        t = self.pending.get((target.component, key)) if (target.component, key) in self.pending \
            else self.files[target.component].get(key)
        return self._narrow(target, param, t)

    def write(self, target, param, value):
        key = self.key_of[(target.component, target.module, param)]
        stored = self.files[target.component]
        dtype = stored.dtype(key)
        if (target.component, target.module) in self.widened and param == "weight":
            value = self._widen(target, param, value, self.files[target.component].get(key))
        self.pending[(target.component, key)] = value.reshape(stored.shape(key)).to(dtype).contiguous()

    def save(self, out):
        out = os.fspath(out)
        if os.path.exists(out):
            raise LoraFileError(out, "output already exists; choose a new path")
        parent = os.path.dirname(os.path.abspath(out)) or "."
        self.save_notes = []
        try:
            tmp = tempfile.mkdtemp(prefix=".lora-ext-", dir=parent)
        except OSError as exc:
            raise LoraFileError(out, f"cannot save: {exc.strerror or exc}") from None
        try:
            changed_dirs = {os.path.dirname(os.path.abspath(tf.path)) for comp, tf in self.files.items()
                            if any(c == comp for c, _ in self.pending)}
            self._copy_pipeline(tmp, changed_dirs)
            for comp, tf in self.files.items():
                changed = {k: v for (c, k), v in self.pending.items() if c == comp}
                if not changed:
                    continue
                rel = os.path.relpath(tf.path, self.path)
                dest = os.path.join(tmp, rel)
                tensors = {k: changed.get(k, None) if k in changed else tf.get(k) for k in tf.keys()}
                if not dest.endswith(".safetensors"):
                    dest = os.path.splitext(dest)[0] + ".safetensors"
                    dest = dest.replace("pytorch_model.safetensors", "model.safetensors")
                save_safetensors(dest, tensors, dict(tf.metadata) or {"format": "pt"})
            os.replace(tmp, out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # shutil.Error too
                detail = exc.strerror or str(exc).splitlines()[0][:200]
                raise LoraFileError(out, f"cannot save: {detail}") from None
            raise

    #: the folders of a diffusers pipeline (used when model_index.json does not name them)
    PIPELINE_FOLDERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                        "tokenizer_2", "tokenizer_3", "vae", "scheduler", "feature_extractor", "safety_checker",
                        "image_encoder")

    def _copy_pipeline(self, tmp: str, changed_dirs: set) -> None:
        """Copy what a diffusers pipeline is made of into ``tmp``: model_index.json and the
        folders it names; in a component whose weights are rewritten, its other weight files
        (another variant would hold the unpatched weights) are left out. Other files of the
        base folder are not copied; links are followed once (no loops); FIFOs and other
        non-regular files are skipped. Each left-out item becomes a note (``save_notes``)."""
        index = os.path.join(self.path, "model_index.json")
        names = set(self.PIPELINE_FOLDERS)
        if os.path.isfile(index):
            try:
                idx = read_config(index)
                names |= {k for k, v in idx.items() if not k.startswith("_") and isinstance(v, list)}
            except LoraFileError as exc:
                self.save_notes.append(f"model_index.json not read ({exc.problem}); copied the usual folders")
        left_out = []
        for entry in sorted(os.listdir(self.path)):
            src = os.path.join(self.path, entry)
            if entry == "model_index.json" and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, entry))
            elif entry in names and os.path.isdir(src):
                self._copy_tree(src, os.path.join(tmp, entry), changed_dirs,
                                {os.path.realpath(src), os.path.realpath(self.path)}, left_out)
            else:
                left_out.append(entry)
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            self.save_notes.append(f"not copied (not part of the pipeline): {shown}")

    def _copy_tree(self, src: str, dst: str, changed_dirs: set, seen: set, left_out: list, depth: int = 0) -> None:
        os.makedirs(dst)
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            rel = os.path.relpath(entry.path, self.path)
            real = os.path.realpath(entry.path)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # links followed
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if real in seen or depth >= 8:
                    left_out.append(f"{rel} (a link loop or too deep)")
                    continue
                self._copy_tree(entry.path, os.path.join(dst, entry.name), changed_dirs, seen | {real}, left_out,
                                depth + 1)
            elif not is_file:
                left_out.append(f"{rel} (not a regular file)")
            elif entry.name in _WEIGHT_FILES and os.path.abspath(src) in changed_dirs:
                # the weights of a rewritten component: the new file replaces them all (another
                # variant left beside it would hold the unpatched weights)
                if os.path.abspath(entry.path) not in {os.path.abspath(tf.path) for tf in self.files.values()}:
                    left_out.append(f"{rel} (another variant of rewritten weights)")
            else:
                shutil.copyfile(entry.path, os.path.join(dst, entry.name))

    def close(self):
        for tf in self.files.values():
            tf.close()


def open_checkpoint(path) -> Checkpoint:
    path = os.fspath(path)
    if os.path.isdir(path):
        return DiffusersFolder(path)
    if not os.path.exists(path):
        raise LoraFileError(path, "no such file or folder")
    return SingleFileCheckpoint(path)

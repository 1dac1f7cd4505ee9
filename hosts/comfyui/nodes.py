"""lora-ext's ComfyUI nodes. Imports nothing of ComfyUI until a node runs (``folder_paths`` is
read when the node list is built, as every loader node does).

* **LoRA Loader (lora-ext)**: MODEL, CLIP (optional: MODEL only works, as with
  ``LoraLoaderModelOnly``), a file from ``models/loras``, strength for the model and for
  CLIP, optional block weights (an lbw preset or vector, or ``in=..:mid=..:out=..``) and
  keyframes (``w@pos,...``, multiplying the model strength over the run).
* **LoRA Loader, model only (lora-ext)**: the same without CLIP (returns MODEL only).
* **LoRA Tags from Prompt (lora-ext)**: reads ``<lora:...>`` tags (the full grammar) from a
  text, applies them, returns the text without them. ``expert`` (high / low) says which expert
  of a two-expert model (Wan 2.2 A14B) the MODEL is: a tag naming a HIGH/LOW pair applies that
  expert's file (``high=`` / ``low=`` strengths).
* **LoRA Loader, two experts (lora-ext)**: a HIGH/LOW LoRA pair on the two MODELs of a Wan 2.2
  A14B workflow, one strength and schedule (across both KSamplerAdvanced halves) or the low
  expert's own strength.
* **LoRA Inspector (lora-ext)**: what a file is: adapter types, base model, keys that would
  not apply and why; shown on the node (web/lora_ext.js) and given as a STRING output (wire it
  to ComfyUI's *Preview Any* to show it there too).
"""
from __future__ import annotations

CATEGORY = "loaders/lora-ext"
_LIBRARIES: dict = {}


def _lora_files():
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _path(lora_name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", lora_name)


def _library():
    import folder_paths

    from lora_ext.resolve import LoraLibrary

    folders = tuple(folder_paths.get_folder_paths("loras"))
    lib = _LIBRARIES.get(folders)
    if lib is None:
        lib = _LIBRARIES[folders] = LoraLibrary(folders)
    return lib


def _strength(tooltip):
    return ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": tooltip})


class LoraExtLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": _lora_input(),
                "strength_model": _strength("Strength on the diffusion model."),
                "strength_clip": _strength("Strength on the text encoders."),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: without it only the MODEL takes the LoRA."}),
                **_schedule_inputs(),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies one LoRA of any type, with block weights and a per-step schedule."

    def load(self, model, clip=None, lora_name=None, strength_model=1.0, strength_clip=1.0, block_weights="",
             keyframes=""):
        return _load(model, clip, lora_name, strength_model, strength_clip, block_weights, keyframes)


class LoraExtLoaderModelOnly:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": _lora_input(),
                "strength_model": _strength("Strength on the diffusion model."),
            },
            "optional": _schedule_inputs(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies one LoRA of any type to the MODEL only, with block weights and a per-step schedule."

    def load(self, model, lora_name, strength_model, block_weights="", keyframes=""):
        return _load(model, None, lora_name, strength_model, 0.0, block_weights, keyframes)[:1]


class LoraExtExpertLoader:
    """A LoRA pair for a two-expert model (Wan 2.2 A14B: ComfyUI loads its high-noise and its
    low-noise model with two loaders and samples them in two KSamplerAdvanced halves). Pick
    either file of the pair; its twin (the same name with LOW for HIGH, low_noise for
    high_noise ...) goes to the other model. One strength, block weights and keyframes for
    both (the keyframes follow the whole run across the two halves), or ``strength_low`` for
    the low-noise model's own."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_high": ("MODEL", {"tooltip": "The high-noise expert (Wan 2.2 A14B: the first sampler's model)."}),
                "model_low": ("MODEL", {"tooltip": "The low-noise expert (the second sampler's model)."}),
                "lora_name": _lora_input(),
                "strength": _strength("Strength on both experts."),
                "strength_low": ("FLOAT", {"default": -1000.0, "min": -1000.0, "max": 100.0, "step": 0.01,
                                           "tooltip": "The low-noise expert's own strength; -1000: the same as strength."}),
            },
            "optional": _schedule_inputs(),
        }

    RETURN_TYPES = ("MODEL", "MODEL")
    RETURN_NAMES = ("model_high", "model_low")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a two-expert LoRA pair (HIGH/LOW files) to the two models of a Wan 2.2 A14B workflow."

    def load(self, model_high, model_low, lora_name, strength, strength_low=-1000.0, block_weights="",
             keyframes=""):
        pair = _pair(lora_name)
        low = strength if strength_low <= -1000.0 else strength_low
        out_high = _load_path(model_high, pair["high"], strength, block_weights, keyframes)
        out_low = _load_path(model_low, pair["low"], low, block_weights, keyframes)
        return (out_high, out_low)


def _pair(lora_name: str) -> dict:
    """``{"high": path, "low": path}`` of the pair ``lora_name`` (either file) belongs to."""
    import os

    from lora_ext.experts import split_expert

    rel = lora_name.replace("\\", "/")
    stem = os.path.splitext(os.path.basename(rel))[0]
    parts = split_expert(stem)
    if parts is None:
        raise ValueError(f"lora-ext: {lora_name} names no expert (HIGH / LOW, high_noise / low_noise); "
                         "use LoRA Loader (lora-ext) for a single model")
    folder = os.path.dirname(rel)
    name = parts[0] or folder
    found = _library().find_pair(f"{folder}/{parts[0]}" if folder and parts[0] else name)
    if found is None:
        raise ValueError(f"lora-ext: {lora_name} has no {'low' if parts[1] == 'high' else 'high'}-noise twin "
                         "in the LoRA folders")
    return {e: f.path for e, f in found.items()}


def _load_path(model, path, strength, block_weights, keyframes):
    import os

    from lora_ext.session import spec_from_inputs

    from .patching import apply

    if strength == 0 and not (keyframes or "").strip():
        return model
    spec = spec_from_inputs(os.path.splitext(os.path.basename(path))[0], path, unet=strength, te=0.0,
                            blocks=block_weights, keyframes=keyframes)
    new_model, _, _ = apply(model, None, [spec])
    return model if new_model is None else new_model


def _lora_input():
    return (_lora_files(), {"tooltip": "Any LoRA type: LoRA, LoCon, LoHa, LoKr, DoRA, IA3, OFT, BOFT, GLoRA, "
                                       "full, norm."})


def _schedule_inputs():
    return {
        "block_weights": ("STRING", {"default": "", "tooltip": "An lbw preset or 12/17/20/26 numbers, "
                                                               "or in=..:mid=..:out=.. (empty: all 1)."}),
        "keyframes": ("STRING", {"default": "", "tooltip": "w@pos,... over the run, multiplying "
                                                           "strength_model (e.g. 0@0,1@0.5)."}),
    }


def _load(model, clip, lora_name, strength_model, strength_clip, block_weights, keyframes):
    from lora_ext.session import spec_from_inputs

    from .patching import apply

    if strength_model == 0 and strength_clip == 0 and not (keyframes or "").strip():
        return (model, clip)
    spec = spec_from_inputs(lora_name, _path(lora_name), unet=strength_model, te=strength_clip,
                            blocks=block_weights, keyframes=keyframes)
    new_model, new_clip, _ = apply(model if strength_model != 0 or (keyframes or "").strip() else None,
                                   clip if strength_clip != 0 else None, [spec])
    return (model if new_model is None else new_model, clip if new_clip is None else new_clip)


class LoraExtPromptLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "text": ("STRING", {"multiline": True, "tooltip": "A prompt with <lora:name:weight...> tags."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: without it only the MODEL takes the LoRAs."}),
                "expert": (["none", "high", "low"], {
                    "default": "none",
                    "tooltip": "Which expert of a two-expert model (Wan 2.2 A14B) this MODEL is: a tag naming a "
                               "HIGH/LOW pair then applies that expert's file, with its own high= / low= strength. "
                               "none: a pair's HIGH file."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "text")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies the <lora:...> tags of a text (lora-ext's grammar) and returns the text without them."

    def load(self, model, clip=None, text="", expert="none"):
        from lora_ext.experts import for_expert
        from lora_ext.prompt import parse_prompt
        from lora_ext.resolve import resolve_specs

        from .patching import apply

        parsed = parse_prompt(text)
        if not parsed.specs:
            return (model, clip, parsed.prompt)
        resolve_specs(parsed.specs, _library())
        specs = parsed.specs
        if expert in ("high", "low"):  # a pair's file and strength for this expert; other LoRAs as they are
            specs = [for_expert(spec, expert) for spec in specs]
        new_model, new_clip, _ = apply(model, clip, specs)
        return (new_model, new_clip, parsed.prompt)


class LoraExtInspector:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (_lora_files(),)}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "What a LoRA file is: types, base model, and every key that would not apply, with its reason."

    def inspect(self, lora_name):
        from lora_ext.inspect import inspect_lora, render_text

        text = render_text(inspect_lora(_path(lora_name)))
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "LoraExtLoader": LoraExtLoader,
    "LoraExtLoaderModelOnly": LoraExtLoaderModelOnly,
    "LoraExtPromptLoader": LoraExtPromptLoader,
    "LoraExtInspector": LoraExtInspector,
    "LoraExtExpertLoader": LoraExtExpertLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraExtLoader": "LoRA Loader (lora-ext)",
    "LoraExtLoaderModelOnly": "LoRA Loader, model only (lora-ext)",
    "LoraExtPromptLoader": "LoRA Tags from Prompt (lora-ext)",
    "LoraExtInspector": "LoRA Inspector (lora-ext)",
    "LoraExtExpertLoader": "LoRA Loader, two experts (lora-ext)",
}

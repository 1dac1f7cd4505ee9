"""What a LoRA says about itself: trigger words and a training summary from its metadata.

The input is the safetensors ``__metadata__`` dict (``TensorFile.metadata``): string keys and
string values, some of which hold JSON (kohya's ``ss_tag_frequency``, ``ss_network_args``,
``ss_dataset_dirs``; diffusers' ``lora_adapter_metadata``). Trainers write these fields with
varying care, so nothing here raises on malformed input: a field that cannot be read is left
out.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping as _AbcMapping
from typing import Any, Mapping, Optional

__all__ = [
    "trigger_words",
    "training_info",
    "lora_adapter_config",
    "lora_adapter_components",
    "few_step_hint",
    "check_peft_config",
    "parse_peft_config",
    "checked_alpha",
]

_REPEAT_PREFIX = re.compile(r"^(\d+)_(.+)$")


def _is_mapping(x) -> bool:
    """``isinstance(x, Mapping)``, a dict answered without the ABC machinery (~1 us a call)."""
    return type(x) is dict or isinstance(x, _AbcMapping)


def _get_str(metadata: Any, key: str) -> Optional[str]:
    if not _is_mapping(metadata):
        return None
    v = metadata.get(key)
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return None


def _json_field(metadata: Any, key: str) -> Any:
    """The parsed JSON of a field, the value itself if a caller already parsed it, else None."""
    if not _is_mapping(metadata):
        return None
    v = metadata.get(key)
    if isinstance(v, (dict, list)):
        return v
    if not isinstance(v, str) or not v.strip():
        return None
    try:
        return json.loads(v)
    except (ValueError, RecursionError):
        return None


def _folder_name(key: Any) -> Optional[str]:
    """kohya's ``10_mychar`` (a dataset folder with its repeat count) -> ``mychar``."""
    if not isinstance(key, str):
        return None
    base = re.split(r"[\\/]", key.strip().rstrip("/\\"))[-1].strip()
    m = _REPEAT_PREFIX.match(base)
    if not m:
        return None
    name = m.group(2).strip()
    return name or None


# ----------------------------------------------------------------------------------------------
# trigger words


def _tag_counts(freq: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not isinstance(freq, dict):
        return counts
    for tags in freq.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            if not isinstance(tag, str) or isinstance(n, bool):
                continue
            if isinstance(n, str):
                try:
                    n = int(n)
                except ValueError:
                    continue
            if not isinstance(n, (int, float)) or n != n:
                continue
            tag = " ".join(tag.split())
            if tag:
                counts[tag] = counts.get(tag, 0) + n
    return counts


def trigger_words(metadata: Mapping[str, str], *, max_tags: int = 10) -> list[str]:
    """Words that likely activate this LoRA, best guesses first.

    In order: ``modelspec.trigger_phrase`` (comma separated), dataset folder names from kohya's
    ``ss_tag_frequency`` / ``ss_dataset_dirs`` with their repeat-count prefix removed
    (``10_mychar`` -> ``mychar``; folders without that prefix are not taken as trigger words),
    then the ``max_tags`` most frequent caption tags (count, then name). Duplicates (ignoring
    case) are dropped; malformed fields are ignored.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(word: Any) -> None:
        if not isinstance(word, str):
            return
        w = " ".join(word.split())
        if w and w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)

    phrase = _get_str(metadata, "modelspec.trigger_phrase")
    if phrase:
        for part in phrase.split(","):
            add(part)

    freq = _json_field(metadata, "ss_tag_frequency")
    dirs = _json_field(metadata, "ss_dataset_dirs")
    for source in (freq, dirs):
        if isinstance(source, dict):
            for key in source:
                add(_folder_name(key))

    counts = _tag_counts(freq)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for tag, _ in ranked[: max(0, int(max_tags))]:
        add(tag)
    return out


# ----------------------------------------------------------------------------------------------
# diffusers / PEFT adapter config


def lora_adapter_config(metadata: Mapping[str, str]) -> Optional[dict]:
    """The parsed ``lora_adapter_metadata`` field diffusers (>= 0.35) writes, or None.

    A pipeline-level file holds each component's PEFT ``LoraConfig`` flattened with a prefix
    (``{"unet.r": 4, "unet.lora_alpha": 4, "text_encoder.r": 8, ...}``); a model-level file
    (``save_lora_adapter``) holds one ``LoraConfig`` dict (``{"r": 4, ...}``). See
    :func:`lora_adapter_components` for a per-component view.
    """
    v = _json_field(metadata, "lora_adapter_metadata")
    return v if isinstance(v, dict) else None


def lora_adapter_components(metadata: Mapping[str, str]) -> Optional[dict[str, dict]]:
    """``lora_adapter_config`` regrouped per component: ``{"unet": {"r": 4, ...}, ...}``; a
    model-level config comes back under the component ``""``."""
    cfg = lora_adapter_config(metadata)
    if cfg is None:
        return None
    out: dict[str, dict] = {}
    for k, v in cfg.items():
        if not isinstance(k, str):
            continue
        comp, dot, field = k.partition(".")
        if not dot:
            comp, field = "", k
        out.setdefault(comp, {})[field] = v
    return out


# ----------------------------------------------------------------------------------------------
# validation of the numbers that change weights: PEFT's r / lora_alpha, kohya's alpha tensor

#: bounds no real LoRA reaches: ranks up to 65,536, |alpha| up to 1e6
MAX_RANK = 65_536
MAX_ALPHA = 1e6
#: an adapter_config.json is a few hundred bytes; refused beyond this
MAX_CONFIG_BYTES = 10_000_000
_PEFT_NUMBERS = {"r": "rank", "lora_alpha": "alpha", "alpha": "alpha"}  # "alpha": LoHa/LoKr configs
_PEFT_PATTERNS = {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}
_PEFT_FLAGS = ("use_rslora", "use_dora")


def _bad_number(value: Any, field: str, name: str = "") -> Optional[str]:
    """Why ``value`` cannot be PEFT's ``field`` ("r" or "lora_alpha"), shown as ``name``, or
    None if it can."""
    shown, name = _brief(value), name or field
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is {shown}, not a number"
    if not math.isfinite(value):
        return f"{name} is {shown}, not a finite number"
    if field == "r":
        if value != int(value) or not 1 <= value <= MAX_RANK:
            return f"{name} is {shown}, not a whole number from 1 to {MAX_RANK}"
    elif abs(value) > MAX_ALPHA:
        return f"{name} is {shown}, beyond the limit of {MAX_ALPHA:g}"
    return None


def _brief(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    return repr(value)


def check_peft_config(cfg: Any, *, depth: int = 0) -> Optional[str]:
    """Why a PEFT ``LoraConfig`` dict (model-level, diffusers' flattened ``unet.r`` form, or
    one nested per component) cannot be used, or None. Checks every field that scales weights:
    ``r``/``lora_alpha`` (numbers, finite, in range), ``rank_pattern``/``alpha_pattern``
    (objects of such numbers), ``use_rslora``/``use_dora`` (booleans)."""
    if not isinstance(cfg, dict):
        return f"the config is a JSON {_json_name(cfg)}, not an object"
    for key, value in cfg.items():
        field = key.rpartition(".")[2] if isinstance(key, str) else ""
        where = ""
        if field in _PEFT_NUMBERS:
            if value is None:
                continue
            if field == "r" and value == 0 and not isinstance(value, bool) and (
                    str(cfg.get("peft_type", "")).upper() in ("OFT", "BOFT") or cfg.get("oft_block_size")):
                continue  # PEFT's OFT sizes its blocks by oft_block_size and writes r = 0
            problem = _bad_number(value, "r" if field == "r" else "lora_alpha", key)
        elif field in _PEFT_PATTERNS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problem = f"{key} is {_brief(value)}, not an object"
            else:
                problem = next((p for k, v in value.items()
                                if (p := _bad_number(v, _PEFT_PATTERNS[field], f"{key}[{_brief(k)}]"))), None)
        elif field in _PEFT_FLAGS:
            problem = None if value is None or isinstance(value, bool) else f"{key} is {_brief(value)}, not true or false"
        elif isinstance(value, dict) and depth == 0:
            problem = check_peft_config(value, depth=1)  # a component's own config
            where = f"{key}: "
        else:
            continue
        if problem:
            return where + problem
    return None


def parse_peft_config(text: Any, source: str) -> Optional[dict]:
    """A PEFT config from JSON text (``lora_adapter_metadata`` or ``adapter_config.json``),
    checked (see :func:`check_peft_config`); raises LoraFileError naming ``source``."""
    from .errors import LoraFileError

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LoraFileError(source, f"not UTF-8 text (bad byte at position {exc.start})") from None
    try:
        cfg = json.loads(text)
    except RecursionError:
        raise LoraFileError(source, "the JSON is nested too deeply") from None
    except ValueError as exc:
        detail = f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else "not JSON"
        raise LoraFileError(source, f"not valid JSON ({detail})") from None
    problem = check_peft_config(cfg)
    if problem:
        raise LoraFileError(source, problem)
    return cfg


def checked_alpha(path: str, key: str, t: Any):
    """A kohya ``alpha`` tensor, refused unless it is one real, finite number within
    :data:`MAX_ALPHA` (several values, bytes, booleans or complex numbers are errors)."""
    from .errors import LoraFileError

    if t.numel() != 1:
        raise LoraFileError(path, f"tensor {key!r} (alpha) holds {t.numel()} values (shape {tuple(t.shape)}); "
                                  "an alpha is one number")
    if not (t.is_floating_point() or t.dtype in _INT_DTYPES()):  # bool, complex, ...
        raise LoraFileError(path, f"tensor {key!r} (alpha) has dtype {str(t.dtype).replace('torch.', '')}; "
                                  "an alpha is a real number")
    value = float(t.item())
    if not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise LoraFileError(path, f"tensor {key!r} (alpha) is {value:g}, beyond the limit of {MAX_ALPHA:g}")
    return t


@functools.lru_cache(maxsize=1)
def _INT_DTYPES() -> frozenset:
    import torch

    return frozenset((torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))


def _json_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ----------------------------------------------------------------------------------------------
# training summary

_FEW_STEP = [
    (re.compile(r"(?<![a-z])lcm(?![a-z])"), "LCM"),
    (re.compile(r"(?<![a-z])lightning(?![a-z])"), "Lightning"),
    (re.compile(r"(?<![a-z])hyper(?:[-_ ]?sd(?:xl)?)?(?![a-z])"), "Hyper-SD"),
    (re.compile(r"(?<![a-z])tcd(?![a-z])"), "TCD"),
    (re.compile(r"(?<![a-z])dmd\d*(?![a-z])"), "DMD"),
    (re.compile(r"(?<![a-z])turbo(?![a-z])"), "Turbo"),
]


def few_step_hint(*texts: Any) -> Optional[str]:
    """"LCM", "Lightning", "Hyper-SD", "TCD", "DMD" or "Turbo" when one of ``texts`` (names,
    titles, tags, a file name) names that kind of few-step LoRA as a word, else None.
    ("hypernetwork" or "lcmxyz" do not count.)"""
    for text in texts:
        if not isinstance(text, str) or not text:
            continue
        low = text.lower()
        for pattern, label in _FEW_STEP:
            if pattern.search(low):
                return label
    return None


def _number(v: Any) -> Any:
    """'32' -> 32, '8.0' -> 8.0, 'None'/'' -> None, other strings unchanged."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return v
    if not isinstance(v, str):
        return None
    s = v.strip()
    if not s or s.lower() in ("none", "null", "nan"):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return s
    return f if f == f and f not in (float("inf"), float("-inf")) else s


def _flag(v: Any) -> Optional[bool]:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes"):
            return True
        if s in ("false", "0", "no"):
            return False
    if isinstance(v, (int, float)):
        return bool(v)
    return None


def _resolution(v: Optional[str]) -> Optional[str]:
    if not v:
        return None
    nums = re.findall(r"\d+", v)
    if len(nums) == 2:
        return f"{nums[0]}x{nums[1]}"
    if len(nums) == 1:
        return f"{nums[0]}x{nums[0]}"
    return v


def _trainer(metadata: Mapping[str, Any]) -> Optional[str]:
    if any(isinstance(k, str) and k.startswith("ss_") for k in metadata):
        return "kohya-ss"
    if "lora_adapter_metadata" in metadata:
        return "diffusers"
    software = _json_field(metadata, "software")
    if isinstance(software, dict) and isinstance(software.get("name"), str):
        return software["name"]
    impl = _get_str(metadata, "modelspec.implementation")
    return impl


def training_info(metadata: Mapping[str, str], *, name: Optional[str] = None) -> dict:
    """A flat, friendly summary of how the LoRA was made; only fields that are present.

    Possible keys: trainer, implementation, network_module, algo, dim, alpha, conv_dim,
    conv_alpha, dora, base_model, base_model_name, architecture, v2, v_prediction,
    resolution, epochs, epoch, steps, images, learning_rate, unet_lr, text_encoder_lr,
    optimizer, scheduler, clip_skip, output_name, title, author, date, few_step.
    ``name`` (e.g. the file name) is also searched for few-step hints.
    """
    if not _is_mapping(metadata):
        return {}
    md = metadata
    info: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if value is not None and value != "":
            info[key] = value

    put("trainer", _trainer(md))
    put("implementation", _get_str(md, "modelspec.implementation"))
    put("network_module", _get_str(md, "ss_network_module"))

    args = _json_field(md, "ss_network_args")
    args = args if isinstance(args, dict) else {}
    algo = args.get("algo")
    put("algo", algo.strip() if isinstance(algo, str) else None)
    put("dim", _number(_get_str(md, "ss_network_dim")))
    put("alpha", _number(_get_str(md, "ss_network_alpha")))
    put("conv_dim", _number(args.get("conv_dim", args.get("conv_rank"))))
    put("conv_alpha", _number(args.get("conv_alpha")))
    dora = _flag(args.get("dora_wd"))

    comps = lora_adapter_components(md)
    if comps:
        # one figure for the summary: the denoiser's config when there are several
        main = next((c for c in ("unet", "transformer", "") if c in comps), next(iter(comps)))
        first = comps[main]
        if "dim" not in info:
            put("dim", _number(first.get("r")))
        if "alpha" not in info:
            put("alpha", _number(first.get("lora_alpha")))
        if any(isinstance(c, dict) and c.get("use_dora") is True for c in comps.values()):
            dora = True
    if dora:
        info["dora"] = True

    put("base_model", _get_str(md, "ss_base_model_version"))
    put("base_model_name", _get_str(md, "ss_sd_model_name"))
    put("architecture", _get_str(md, "modelspec.architecture"))
    put("v2", _flag(_get_str(md, "ss_v2")))
    put("v_prediction", _flag(_get_str(md, "ss_v_parameterization")))
    put("resolution", _resolution(_get_str(md, "ss_resolution") or _get_str(md, "modelspec.resolution")))
    put("epochs", _number(_get_str(md, "ss_num_epochs")))
    put("epoch", _number(_get_str(md, "ss_epoch")))
    put("steps", _number(_get_str(md, "ss_steps") or _get_str(md, "ss_max_train_steps")))
    put("images", _number(_get_str(md, "ss_num_train_images")))
    put("learning_rate", _number(_get_str(md, "ss_learning_rate")))
    put("unet_lr", _number(_get_str(md, "ss_unet_lr")))
    put("text_encoder_lr", _number(_get_str(md, "ss_text_encoder_lr")))
    put("optimizer", _get_str(md, "ss_optimizer"))
    put("scheduler", _get_str(md, "ss_lr_scheduler"))
    put("clip_skip", _number(_get_str(md, "ss_clip_skip")))
    put("output_name", _get_str(md, "ss_output_name"))
    put("title", _get_str(md, "modelspec.title"))
    put("author", _get_str(md, "modelspec.author"))
    put("date", _get_str(md, "modelspec.date"))
    put(
        "few_step",
        few_step_hint(
            _get_str(md, "ss_output_name"),
            _get_str(md, "modelspec.title"),
            _get_str(md, "modelspec.tags"),
            _get_str(md, "ss_sd_model_name"),
            name,
        ),
    )
    return info


def network_arg(metadata: Mapping[str, str], name: str) -> Optional[bool]:
    """A boolean from kohya's ``ss_network_args`` JSON (e.g. "rs_lora"), or None if absent."""
    args = _json_field(metadata, "ss_network_args")
    if not isinstance(args, dict) or name not in args:
        return None
    return _flag(args[name])


def peft_config_for(prefix: str, config: dict) -> dict:
    """The LoraConfig dict that governs the module ``prefix`` (diffusers nests one per
    component, or flattens them as ``"unet.lora_alpha"``)."""
    if "lora_alpha" in config or "r" in config:
        return config
    for comp in ("text_encoder_2", "text_encoder", "unet", "transformer"):
        for key in (comp, f"{comp}_lora_adapter_metadata"):
            if prefix.startswith(comp + ".") and isinstance(config.get(key), dict):
                return config[key]
    for comp in ("text_encoder_2", "text_encoder", "unet", "transformer"):
        if prefix.startswith(comp + "."):
            flat = {k[len(comp) + 1:]: v for k, v in config.items() if k.startswith(comp + ".")}
            if flat:
                return flat
    return {}


def peft_pattern_value(patterns: dict, prefix: str):
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` value for the module ``prefix``, or None.

    PEFT matches a pattern key as the whole module name or a suffix after a "."
    (``re.match(rf"(.*\.)?{key}$", name)``, peft/tuners/lora/model.py): so
    "transformer_blocks.0.attn.to_v" must not match "single_transformer_blocks.0.attn.to_v"."""
    for pat, value in (patterns or {}).items():
        if prefix == pat or prefix.endswith("." + pat):
            return value
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{pat})", prefix):
                return value
        except re.error:
            continue
    return None

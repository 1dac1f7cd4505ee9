"""A LoRA file as the core sees it: key groups, their adapters, and where each one goes.

``load_lora(path)`` reads a file (safely, see ``io``), groups its keys per module and builds
one adapter per group through the registered types (``plugins``). ``Lora.resolve(keymap)``
then binds each adapter to a module of a concrete model layout, and every key that does not
bind is reported with its reason: nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import plugins
from .adapter import Adapter
from .errors import AdapterError, LoraExtError, LoraFileError
from .io import open_tensors
from .keys import Candidate, KeyMap, group_keys
from .metadata import MAX_CONFIG_BYTES, checked_alpha, parse_peft_config, peft_config_for
from .metadata import peft_pattern_value as _pattern_value

Tensor = torch.Tensor


@dataclass
class Group:
    """All keys of one module prefix in a LoRA file."""

    prefix: str
    keys: dict  # normalised tensor name -> original key
    tensors: dict  # normalised tensor name -> Tensor
    adapter: Optional[Adapter] = None
    problem: str = ""  # why no adapter could be built (empty when adapter is set or pending)

    @property
    def names(self) -> frozenset:
        return frozenset(self.keys)


@dataclass
class Binding:
    """One adapter bound to one candidate (one module, or q/k/v stacked)."""

    group: Group
    adapter: Adapter
    candidate: Candidate

    @property
    def targets(self):
        return self.candidate.targets


@dataclass
class Unmatched:
    key: str
    reason: str

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason}


@dataclass
class Resolution:
    bindings: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)


@dataclass
class Lora:
    path: str
    metadata: dict
    groups: dict  # prefix -> Group
    file_format: str = "safetensors"

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def resolve(self, keymap: KeyMap) -> Resolution:
        """Bind every group to a module of ``keymap``'s model; report what doesn't bind."""
        res = Resolution()
        for group in self.groups.values():
            binding, reason = bind_group(group, keymap)
            if binding is not None:
                res.bindings.append(binding)
            else:
                res.unmatched.extend(Unmatched(k, reason) for k in sorted(group.keys.values()))
        return res


def bind_group(group: Group, keymap: KeyMap) -> tuple[Optional[Binding], str]:
    if group.adapter is not None:
        cand, reason = keymap.choose(group.prefix, group.adapter.fits)
        if cand is None:
            return None, reason
        return Binding(group, _oriented(group.adapter, cand), cand), ""
    if group.problem:
        return None, group.problem
    # No registered type claimed the names: ask the structural auto-detector, per candidate
    # module, to explain the tensors from shapes alone; it must fit the target exactly.
    cands = keymap.candidates(group.prefix)
    if not cands:
        return None, f"unknown adapter type (tensors: {', '.join(sorted(group.names))}) on an unknown module"
    hook = plugins.plugin_manager().hook.lora_ext_explain_group
    for cand in cands:
        try:
            adapter = hook(names=group.names, tensors=group.tensors, target_shape=tuple(cand.weight_shape))
        except AdapterError:
            adapter = None
        if adapter is not None and adapter.fits(tuple(cand.weight_shape)):
            adapter.type_name = f"{adapter.type_name} (auto-detected)"  # shown by inspect
            return Binding(group, _oriented(adapter, cand), cand), ""
    return None, f"unknown adapter type: no registered type or structural rule explains tensors {', '.join(sorted(group.names))}"


def _oriented(adapter: Adapter, cand: Candidate):
    """The adapter as the candidate's module sees it (halves swapped where the layouts differ)."""
    if getattr(cand, "swap", False):
        from .deltas import SwappedHalves

        return SwappedHalves(adapter)
    return adapter


def build_adapter(group: Group, types, metadata=None) -> None:
    """Set group.adapter (or group.problem) from the types that claim its tensor names."""
    metadata = metadata or {}
    names = group.names
    claimers = [t for t in types if t.claims(names)]
    bias_diff = None
    if not claimers and "diff_b" in names and len(names - {"diff_b", "alpha", "dora_scale"}) > 0:
        # Kijai's / lightx2v's files pair a LoRA (or LoHa ...) with a stored bias change on the
        # same module (ComfyUI applies both): the rest is the adapter, diff_b its bias delta
        rest = names - {"diff_b"}
        claimers = [t for t in types if t.claims(rest)]
        if claimers:
            bias_diff = group.tensors["diff_b"]
    if not claimers:
        if names <= {"alpha", "dora_scale"}:
            group.problem = f"incomplete adapter: only {', '.join(sorted(names))}"
        return  # left for the structural auto-detector at bind time
    inner = {k: v for k, v in group.tensors.items() if k != "dora_scale" and not (bias_diff is not None and k == "diff_b")}
    try:
        adapter = claimers[0].from_tensors(inner)
        if "dora_scale" in group.tensors:
            from .adapters.dora import with_dora

            adapter = with_dora(adapter, group.tensors["dora_scale"])
        if bias_diff is not None:
            from .deltas import WithBiasDiff

            adapter = WithBiasDiff(adapter, bias_diff)
        adapter.configure(group.prefix, metadata)
        group.adapter = adapter
    except AdapterError as exc:
        group.problem = f"bad {claimers[0].type_name} tensors: {exc}"


def load_lora(path, *, peft_config: Optional[dict] = None) -> Lora:
    """Read a LoRA file and build an adapter for every key group it holds."""
    path = os.fspath(path)
    with open_tensors(path, kind="lora") as tf:
        metadata = dict(tf.metadata)
        types = plugins.adapter_types()
        names = {n for t in types for n in (t.required | t.optional)}
        grouped = group_keys(tf.keys(), names)
        groups = {}
        for prefix, keys in grouped.items():
            tensors = {name: tf.get(key) for name, key in keys.items()}
            if "alpha" in tensors:
                tensors["alpha"] = checked_alpha(path, keys["alpha"], tensors["alpha"])
            if "lora_magnitude_vector" in keys.get("dora_scale", ""):
                # PEFT stores a conv's magnitude as (1, out, 1, 1); it is always per output.
                tensors["dora_scale"] = tensors["dora_scale"].reshape(-1)
            groups[prefix] = Group(prefix, keys, tensors)
        file_format = tf.format
    config = peft_config if peft_config is not None else _peft_config(path, metadata)
    for group in groups.values():
        if config and "alpha" not in group.tensors and "lora_down.weight" in group.tensors:
            _inject_peft_alpha(group, config)
        build_adapter(group, types, metadata)
        if config and group.adapter is not None and "alpha" not in group.tensors:
            _peft_lycoris_scale(group, config)
        if group.adapter is not None and hasattr(group.adapter, "configure_peft"):
            _configure_peft(group, config)
    return Lora(path, metadata, groups, file_format)


# --- PEFT / diffusers alpha ----------------------------------------------------------------
# PEFT files carry no alpha tensors; lora_alpha and r live in adapter_config.json beside the
# file, or (diffusers >= 0.35) in the "lora_adapter_metadata" safetensors metadata field.
def _peft_config(path: str, metadata: dict) -> Optional[dict]:
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        return parse_peft_config(raw, f"{path}: metadata lora_adapter_metadata")
    side = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(side):
        try:
            with open(side, "rb") as fh:
                raw = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise LoraFileError(side, f"cannot read adapter config ({exc.strerror or exc})") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise LoraFileError(side, f"adapter config larger than {MAX_CONFIG_BYTES // 1_000_000} MB")
        return parse_peft_config(raw, side)
    return None


def _config_for(group: Group, config: dict) -> dict:
    """The LoraConfig dict that governs this group (diffusers nests one per component)."""
    return peft_config_for(group.prefix, config)


def _inject_peft_alpha(group: Group, config: dict) -> None:
    cfg = _config_for(group, config)
    if not cfg:
        return
    if group.tensors["lora_down.weight"].dim() < 2:
        return  # not a LoRA factor: the adapter type says what is wrong with it
    rank = int(group.tensors["lora_down.weight"].shape[0])
    r = _pattern_value(cfg.get("rank_pattern"), group.prefix) or cfg.get("r") or rank
    alpha = _pattern_value(cfg.get("alpha_pattern"), group.prefix) or cfg.get("lora_alpha") or r
    scale = float(alpha) / (float(r) ** 0.5 if cfg.get("use_rslora") else float(r))
    # Stored as an equivalent kohya alpha, so alpha / rank reproduces PEFT's scaling.
    group.tensors["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)


def _configure_peft(group: Group, config: Optional[dict]) -> None:
    """Types whose maths the PEFT config fixes (PEFT OFT: Cayley-Neumann terms, coft) read it
    through ``adapter.configure_peft(cfg)`` ({} without a config); a bad value is the group's
    problem, reported with its keys."""
    try:
        group.adapter.configure_peft(_config_for(group, config) if config else {})
    except AdapterError as exc:
        group.problem = f"bad {group.adapter.type_name} config: {exc}"
        group.adapter = None


def _peft_lycoris_scale(group: Group, config: dict) -> None:
    """PEFT's LoHa and LoKr scale by ``alpha / r`` from their config, always (``peft/tuners/
    loha|lokr/layer.py``), where a LyCORIS file's LoKr with both factors full uses 1: the same
    tensors mean different things, and only the config tells which (see the DiT reference §2.0)."""
    cfg = _config_for(group, config)
    kind = str(cfg.get("peft_type", "")).upper() if cfg else ""
    if kind not in ("LOHA", "LOKR"):
        return
    r = _pattern_value(cfg.get("rank_pattern"), group.prefix) or cfg.get("r")
    alpha = _pattern_value(cfg.get("alpha_pattern"), group.prefix) or cfg.get("alpha") or r
    if r:
        group.adapter.scale_override = float(alpha) / float(r)


def describe_failure(exc: Exception) -> str:
    if isinstance(exc, LoraExtError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"

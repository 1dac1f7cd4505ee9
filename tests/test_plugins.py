"""A third-party adapter type registers through the same pluggy hook as the built-in ones."""
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from lora_ext import plugins
from lora_ext.adapter import Adapter
from lora_ext.hookspecs import hookimpl
from lora_ext.layouts import arch_keymap
from lora_ext.network import load_lora

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


class RowShift(Adapter):
    """A made-up type: adds a per-row constant (tensor name 'row_shift')."""

    type_name = "rowshift"
    required = frozenset({"row_shift"})

    def delta(self, weight):
        return self.tensors["row_shift"].float().reshape(-1, 1).expand_as(weight).clone()


def _plugin_module():
    mod = types.ModuleType("third_party_rowshift")

    @hookimpl
    def lora_ext_adapter_types():
        return [RowShift]

    mod.lora_ext_adapter_types = lora_ext_adapter_types
    return mod


@pytest.fixture
def registered(monkeypatch):
    mod = _plugin_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)

    # What `[project.entry-points.lora_ext] rowshift = "third_party_rowshift"` does for a package.
    class EP:
        name, group, value = "rowshift", "lora_ext", mod.__name__

        def load(self):
            return mod

    class Dist:
        entry_points = [EP()]
        metadata = {"name": "third-party"}

    import importlib.metadata as md

    monkeypatch.setattr(md, "distributions", lambda: [Dist()])
    plugins.reset()
    yield
    plugins.reset()


def test_third_party_type_is_used_through_the_entry_point_group(registered, tmp_path):
    assert RowShift in plugins.adapter_types()
    path = tmp_path / "x.safetensors"
    save_file({f"lora_unet_{PATH.replace('.', '_')}.row_shift": torch.arange(320, dtype=torch.float32)}, path)
    res = load_lora(path).resolve(arch_keymap("sd1"))
    assert not res.unmatched and res.bindings[0].adapter.type_name == "rowshift"
    w = torch.zeros(320, 320)
    assert torch.equal(res.bindings[0].adapter.delta(w)[:, 0], torch.arange(320.0))


def test_without_the_plugin_the_same_keys_are_reported(tmp_path):
    plugins.reset()
    path = tmp_path / "x.safetensors"
    save_file({f"lora_unet_{PATH.replace('.', '_')}.row_shift": torch.ones(320, 2, 3)}, path)
    res = load_lora(path).resolve(arch_keymap("sd1"))
    assert not res.bindings and "unknown adapter type" in res.unmatched[0].reason

"""Weights the engine must not write into: quantised (SD.Next SDNQ: int8 + scale) and offloaded
ones (accelerate's sequential offload leaves ``meta`` parameters). Their LoRAs run on the fly,
whatever method was asked for; the weights stay bit-identical and the output is the
reference's. (fp8 storage, A1111's ``fp8_storage`` included, is fused: ``test_fp8.py``.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lora_ext
from lora_ext.engine.transact import unfusable_reason
from test_engine import LIN, _shape, write_lora
from tiny_models import max_rel_err, tiny_unet, unet_out
import host_common
from lora_ext.spec import LoraSpec


class CastLinear(nn.Linear):
    """A host's storage-cast Linear: weight stored in fp8 or int8 (+ per-row scale), computed in fp32."""

    def store(self, how: str):
        w = self.weight.detach()
        if how == "fp8":
            self.weight = nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
            self.scale = None
        else:
            scale = w.abs().amax(1, keepdim=True) / 127
            self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
            self.scale = scale
        return self

    def dequantised(self):
        w = self.weight.float()
        return w if self.scale is None else w * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantised().to(x.dtype), self.bias)


@pytest.mark.parametrize("how", ["int8"])
@pytest.mark.parametrize("method", ["fuse", "auto"])
def test_quantised_weights_take_their_lora_on_the_fly(tmp_path, how, method):
    unet = tiny_unet()
    path = write_lora(tmp_path / "l.safetensors", [("unet", LIN, "lora", _shape(unet, LIN))], seed=4, mag=0.3)
    old = unet.get_submodule(LIN)
    new = CastLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    new.store(how)
    parent, name = LIN.rsplit(".", 1)
    setattr(unet.get_submodule(parent), name, new)
    reason = unfusable_reason(new)
    assert reason is not None and "quantised" in reason
    stored = new.weight.detach().clone()
    # reference: the dequantised weight as an ordinary fp32 Linear, LoRA fused in fp32
    plain = copy.deepcopy(unet)
    flat = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        flat.weight.copy_(new.dequantised())
        if new.bias is not None:
            flat.bias.copy_(new.bias)
    setattr(plain.get_submodule(parent), name, flat)
    ref = host_common.reference({"unet": plain}, [LoraSpec("l", path=path)], 0, 1)["unet"]
    h = lora_ext.apply(unet, [path], method=method)
    assert h.unfusable == {("unet", LIN): reason}, "the reason is reported"
    assert any(reason in n for n in h.reports[0].notes)
    assert torch.equal(new.weight, stored), "never written"
    assert max_rel_err(unet_out(unet), unet_out(ref)) <= 1e-5
    h.remove()
    assert torch.equal(new.weight, stored) and not new._forward_hooks


def test_offloaded_meta_weight_is_never_written(tmp_path):
    unet = tiny_unet()
    path = write_lora(tmp_path / "l.safetensors", [("unet", LIN, "lora", _shape(unet, LIN))], seed=4)
    mod = unet.get_submodule(LIN)
    mod.weight = nn.Parameter(torch.empty_like(mod.weight, device="meta"), requires_grad=False)
    assert "offloaded" in unfusable_reason(mod)
    h = lora_ext.apply(unet, [path], method="fuse")
    assert mod.weight.device.type == "meta" and mod._forward_hooks
    h.remove()
    assert not mod._forward_hooks


def test_offloaded_component_takes_its_loras_on_the_fly(tmp_path):
    """accelerate's offload hooks (``_hf_hook``, SD.Next's sequential offload) put their own
    copy of each weight back: the session must not fuse into such a component."""
    from lora_ext.hostmodel import HostModel
    from lora_ext.session import Session
    from tiny_models import tiny_text_encoder
    from host_common import make_loras
    from lora_ext import hostmodel

    unet, te = tiny_unet(), tiny_text_encoder()
    loras = make_loras(str(tmp_path), unet, te)
    unet.down_blocks[0]._hf_hook = object()  # what accelerate.hooks.add_hook_to_module sets
    hostmodel.register_layout("tiny-sd-off", host_common.tables(unet, te))
    try:
        s = Session(method="fuse")
        s.load_model(HostModel({"unet": unet, "te1": te}, naming="diffusers"))
        assert any("offloaded" in n for n in s.bound.notes)
        before, before_te = host_common.bits(unet), host_common.bits(te)
        ref = host_common.reference({"unet": copy.deepcopy(unet)}, [LoraSpec("alpha", path=loras["alpha"])], 0, 1)
        s.use_specs([LoraSpec("alpha", path=loras["alpha"])], total_steps=1)
        assert host_common.same_bits(unet, before), "the offloaded UNet is never written"
        assert not host_common.same_bits(te, before_te), "the text encoder is not offloaded: fused"
        assert max_rel_err(unet_out(unet), unet_out(ref["unet"])) <= 1e-5
        s.end_run(restore=True)
        assert host_common.same_bits(te, before_te)
    finally:
        hostmodel.unregister_layout("tiny-sd-off")

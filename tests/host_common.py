"""Shared pieces of the host-shim tests (tests/test_host_*.py): LoRA files for the tiny models,
an independent reference for the weights a list of specs should produce at a step, and the
plumbing that puts one host's fake on ``sys.path`` and takes it off again."""
from __future__ import annotations

import copy
import os
import sys

import torch

from lora_ext import arch
from lora_ext.deltas import binding_deltas
from lora_ext.keys import KeyMap
from lora_ext.network import load_lora
from test_engine import C3, FF, LIN, MID_Q, OUT3_V, TE_FC1, TE_Q, _shape, _te_module, write_lora  # noqa: F401
from tiny_models import one_thread_fixture  # noqa: F401 (the host tests' one_thread)

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tables(unet, te):
    return {"unet": arch.table_for_model("unet", unet), "te1": arch.table_for_model("te1", te, {})}


def make_loras(folder, unet, te) -> dict:
    """Three LoRA files of different types in ``folder``: name -> path."""
    os.makedirs(folder, exist_ok=True)
    te_q = tuple(_te_module(te, TE_Q).weight.shape)
    te_fc1 = tuple(_te_module(te, TE_FC1).weight.shape)
    return {
        "alpha": write_lora(os.path.join(folder, "alpha.safetensors"), [
            ("unet", LIN, "lora", _shape(unet, LIN)), ("unet", C3, "loha", _shape(unet, C3)),
            ("unet", OUT3_V, "lora", _shape(unet, OUT3_V)), ("te", TE_Q, "lora", te_q)], seed=1),
        "beta": write_lora(os.path.join(folder, "beta.safetensors"), [
            ("unet", FF, "lokr", _shape(unet, FF)), ("unet", MID_Q, "oft", _shape(unet, MID_Q)),
            ("te", TE_FC1, "dora", te_fc1)], seed=2),
        "gamma": write_lora(os.path.join(folder, "gamma.safetensors"), [
            ("unet", LIN, "ia3", _shape(unet, LIN)), ("unet", FF, "full", _shape(unet, FF))], seed=3),
    }


def reference(models: dict, specs, step=None, total=None, hires=False) -> dict:
    """Copies of ``models`` ({"unet": ..., "te1": ...}) with ``W0 + sum(s * delta)`` written
    in fp32, ``s`` each spec's strength at ``step`` of ``total``: the independent reference."""
    refs = {c: copy.deepcopy(m) for c, m in models.items()}
    layout = {c: (arch.table_for_model(c, m) if c == "unet" else arch.table_for_model(c, m, {}))
              for c, m in refs.items()}
    km = KeyMap(layout)
    params = {}
    for c, m in refs.items():
        for name, p in m.named_parameters():
            if c != "unet" and name.startswith("text_model."):
                name = name[len("text_model."):]
            params[(c, name)] = p
    acc = {}
    for spec in specs:
        lora = load_lora(spec.path)
        for b in lora.resolve(km).bindings:
            t = b.targets[0]
            s = spec.strength(t.component, t.block, step, total, hires=hires)
            read = lambda tt, what: params.get((tt.component, f"{tt.module}.{what}"))  # noqa: E731
            for tt, (dw, db) in binding_deltas(b, read).items():
                a = acc.setdefault((tt.component, tt.module), [0, 0])
                a[0] = a[0] + s * dw
                if db is not None:
                    a[1] = a[1] + s * db
    with torch.no_grad():
        for (c, mod), (dw, db) in acc.items():
            w = params[(c, f"{mod}.weight")]
            w.copy_((w.float() + dw).to(w.dtype))
            if not isinstance(db, int):
                b = params[(c, f"{mod}.bias")]
                b.copy_((b.float() + db).to(b.dtype))
    return refs


def bits(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(model, ref: dict) -> bool:
    now = model.state_dict()
    return now.keys() == ref.keys() and all(torch.equal(now[k], v) for k, v in ref.items())


def close_weights(model, ref_model, atol=1e-6) -> bool:
    a, b = model.state_dict(), ref_model.state_dict()
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-5) for k in b)


def purge(*names) -> None:
    """Forget imported modules (and their submodules) so the next import is a fresh one."""
    for mod in list(sys.modules):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            del sys.modules[mod]

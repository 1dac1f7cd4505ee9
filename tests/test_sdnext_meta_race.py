"""Issue 14: why SD.Next's own LoRA handler failed with "Cannot copy out of meta tensor".

Found in the real SD.Next 058a7f0c (tests/test_realhost.py): two model loads overlapped at boot
(SD.Next's autoload thread, webui.py ``load_model``, and the ``/sdapi/v1/reload-checkpoint``
request the real-host harness sent while the autoload was still running). Both load through
diffusers' single-file loader, which builds every component under accelerate's
``init_empty_weights()``. That context manager patches ``torch.nn.Module.register_parameter``
for the whole process (accelerate/big_modeling.py ``init_on_device``: it saves the function it
finds, installs its own, and puts the saved one back on exit). Entered by thread A, then by B,
then left by A and then by B, the last exit puts back A's patch: from then on every parameter
of every module built anywhere in the process is moved to ``meta``. SD.Next builds its LoRA
networks' ``lora_up`` / ``lora_down`` as fresh ``nn.Linear`` / ``nn.Conv2d`` modules
(modules/lora/network_lora.py ``create_module``), so each of them failed on ``copy_`` /
``.to()`` ("Cannot copy out of meta tensor"), on every layer, and its image equalled no LoRA.

lora-ext builds no module and registers no parameter when it applies, restores or compacts a
record, so its own generations were right in the same process; the failure was a boot race,
not the background record (it came and went with the boot timing; the synchronous-record
"fix" it was blamed on was two lucky runs). These tests pin both halves on real accelerate,
diffusers and transformers modules, no host.
"""
from __future__ import annotations

import threading

import pytest
import torch

import lora_ext

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_engine import FF, LIN, PROJ, _shape, assert_bit_identical, state_bits, write_lora  # noqa: E402
from tiny_models import TE_CONFIG, UNET_CONFIG, tiny_unet  # noqa: E402

WAIT = 60


@pytest.fixture
def clean_register_parameter():
    """Whatever a test leaves patched, the process gets torch's own function back."""
    original = torch.nn.Module.__dict__["register_parameter"]
    yield original
    torch.nn.Module.register_parameter = original


def _load_in_thread(build, entered: threading.Event, leave: threading.Event, out: list):
    """What diffusers' single-file loader does per component: build the model under
    ``accelerate.init_empty_weights()`` (then load the state dict into it; not needed here)."""
    def run():
        try:
            with accelerate.init_empty_weights():
                model = build()
                entered.set()
                assert leave.wait(WAIT)
            out.append(model)
        except BaseException as exc:  # pragma: no cover - reported by the test
            out.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t


def _build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def _build_te():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TE_CONFIG))


def _sdnext_lora_factor(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SD.Next's modules/lora/network_lora.py: ``create_module`` keeps a LoRA factor in a fresh
    ``nn.Linear`` (``module.weight.copy_(weight)``; into a meta weight that copy drops the
    data silently), and ``calc_updown`` reads it back with ``.to(target.device, dtype=...)``."""
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module.weight.to(target.device, dtype=target.dtype)


def _overlapping_loads(order):
    """Two "model loads" in two threads; ``order``: which thread leaves its
    ``init_empty_weights`` first ("AB": A first, the interleaving seen in SD.Next)."""
    a_in, b_in, a_go, b_go = (threading.Event() for _ in range(4))
    out_a, out_b = [], []
    ta = _load_in_thread(_build_unet, a_in, a_go, out_a)
    assert a_in.wait(WAIT)
    tb = _load_in_thread(_build_te, b_in, b_go, out_b)  # B enters while A is still inside
    assert b_in.wait(WAIT)
    first, second = ((a_go, ta), (b_go, tb)) if order == "AB" else ((b_go, tb), (a_go, ta))
    first[0].set()
    first[1].join(WAIT)
    second[0].set()
    second[1].join(WAIT)
    for out in (out_a, out_b):
        assert len(out) == 1 and not isinstance(out[0], BaseException), out
    # both models were built on meta, as the loader wants
    assert {p.device.type for p in out_a[0].parameters()} == {"meta"}
    assert {p.device.type for p in out_b[0].parameters()} == {"meta"}


def test_overlapping_loads_leave_every_new_module_on_meta(clean_register_parameter):
    """A enters, B enters, A leaves, B leaves: B puts back what it found, A's patch."""
    _overlapping_loads("AB")
    assert torch.nn.Module.register_parameter is not clean_register_parameter
    assert torch.nn.Linear(4, 2).weight.device.type == "meta"
    up, target = torch.randn(8, 2), torch.zeros(8, 4)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        _sdnext_lora_factor(up, target)  # what SD.Next's handler hit on every layer


def test_nested_loads_leave_torch_as_it_was(clean_register_parameter):
    """Left in the reverse order (or one after the other) the patches unwind cleanly: the
    race needs the first load to finish while the second is still inside."""
    _overlapping_loads("BA")
    assert torch.nn.Module.register_parameter is clean_register_parameter
    assert torch.nn.Linear(4, 2).weight.device.type == "cpu"
    up, target = torch.randn(8, 2), torch.zeros(8, 4)
    assert torch.equal(_sdnext_lora_factor(up, target), up)


@pytest.mark.parametrize("record_buffer", [None, 0], ids=["background-record", "sync-record"])
def test_lora_ext_apply_and_restore_are_unaffected(clean_register_parameter, tmp_path, record_buffer):
    """In the poisoned process lora-ext still fuses and restores bit-exactly, with the
    background record as with the synchronous one: it builds no module and no parameter."""
    unet = tiny_unet()  # the host's model: loaded before the race, real CPU weights
    ref = state_bits(unet)
    mods = [LIN, FF, PROJ]
    lora = write_lora(tmp_path / "a.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in mods],
                      seed=1, mag=0.3)
    expected_fused = None
    if record_buffer is None:
        sync = tiny_unet()
        lora_ext.apply(sync, [(lora, 0.8)], method="fuse", record_buffer=0)
        expected_fused = state_bits(sync)
    _overlapping_loads("AB")
    assert torch.nn.Linear(2, 2).weight.device.type == "meta"  # the process is poisoned
    h = lora_ext.apply(unet, [(lora, 0.8)], method="fuse", record_buffer=record_buffer)
    assert {p.device.type for p in unet.parameters()} == {"cpu"}
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, ref[k])]
    assert changed, "the LoRA was fused"
    if expected_fused is not None:
        assert_bit_identical(unet, expected_fused)
        assert h.wait_records(WAIT)
        mem = h.record_memory()
        assert mem["compactions"] > 0 and not mem["faults"] and mem["plain_bytes"] == 0, mem
    h.remove()
    assert_bit_identical(unet, ref)


def test_the_shim_names_the_state_on_the_console_and_in_status(clean_register_parameter):
    """lora-ext's A1111 / SD.Next shim says so (console and ``/lora-ext/v1/status``
    ``warnings``) when torch builds new modules on meta, and nothing when it does not."""
    from lora_ext.hosts.a1111 import shim

    assert shim.module_init_problem() is None
    _overlapping_loads("AB")
    why = shim.module_init_problem()
    assert why is not None
    assert "accelerate.big_modeling.init_on_device.<locals>.register_empty_parameter" in why
    assert "Cannot copy out of meta tensor" in why
    torch.nn.Module.register_parameter = clean_register_parameter
    assert shim.module_init_problem() is None
    # a patch that leaves new parameters where they belong is not reported
    original = clean_register_parameter

    def wrapped(module, name, param):
        return original(module, name, param)

    torch.nn.Module.register_parameter = wrapped
    assert shim.module_init_problem() is None

"""The documented seam (pluggy hookspecs) between the core, adapter plugins and host shims.

Adapter types: a plugin module defines ``@hookimpl def lora_ext_adapter_types()`` returning
its Adapter subclasses. Built-in types live in ``lora_ext.adapters``; a third-party package
registers the same way through the ``lora_ext`` setuptools entry-point group.
"""
import pluggy

PROJECT = "lora_ext"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lora_ext_adapter_types():
    """Return a list of Adapter subclasses this plugin provides."""


@hookspec(firstresult=True)
def lora_ext_explain_group(names, tensors, target_shape):
    """Explain a key group no registered type claimed (structural auto-detection).

    ``names``: frozenset of tensor names; ``tensors``: name -> Tensor; ``target_shape``: the
    shape of the target module's weight, or None when the module is unknown. Return an Adapter
    whose ``weight_shape()`` equals ``target_shape``, or None when it cannot explain the group.
    """


# --------------------------------------------------------------------------------------------
# The host seam. A host shim (A1111/SD.Next, ComfyUI, InvokeAI) and the standalone sampler
# translate their host's events into these four calls on a ``lora_ext.session.Session``'s
# plugin manager (``session.hook``); the session's own implementations do the work (bind the
# model, apply the LoRAs with the engine, move per-step strengths, restore). A shim may
# register more implementations on ``session.pm`` to react to the same events (A1111 writes
# infotext when specs are resolved). Every call passes ``session``, the session the event
# belongs to; hookimpls may take any subset of the arguments.


@hookspec
def lora_ext_model_loaded(session, model):
    """The host loaded, or switched to, a model.

    ``model`` is a ``lora_ext.hostmodel.HostModel``: the host's component roots
    (``{"unet": ..., "te1": ..., "te2": ...}``), how their modules are named (``naming``:
    ``"diffusers"`` or ``"ldm"``, per component) and the architecture if the host knows it
    (``family``: ``"sd1"``, ``"sd2"``, ``"sdxl"``; always checked against the weights' shapes).
    LoRAs applied to a previous model are taken off it first (restored bit-exactly when its
    weights are still the ones they were applied to, forgotten when the host replaced them).
    """


@hookspec
def lora_ext_specs_resolved(session, specs, hires, total_steps):
    """The LoRAs of the next run are known.

    ``specs``: ``lora_ext.spec.LoraSpec`` s, parsed from the prompt's tags or built from node
    inputs, each resolved to a file (``spec.path`` set). ``hires``: they are for a hires fix /
    second pass (``hr=``, ``hrte=``, ``hrunet=`` apply). ``total_steps``: the steps the run is
    expected to take, or None. The text encoders take the strengths of step 0; the UNet those
    of the step announced by ``lora_ext_step_begins`` (step 0 until then).
    """


@hookspec
def lora_ext_step_begins(session, step, total_steps, sigma):
    """Sampling step ``step`` (0-based) of ``total_steps`` is about to run.

    ``sigma``: the step's noise level (a float) when the host has one, else None. Called
    before every model evaluation is fine: a repeated step costs nothing.
    """


@hookspec
def lora_ext_run_ends(session, restore):
    """A run finished, or failed.

    ``restore``: give every patched weight back bit-exactly now, and take every hook off.
    Otherwise the LoRAs may stay applied until the list of LoRAs changes (the next run then
    costs nothing when it uses the same ones).
    """

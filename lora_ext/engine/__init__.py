"""The apply engine: LoRAs on a live model, fused with bit-exact restore or on-the-fly.

    h = lora_ext.apply(model, specs, method="auto")   # or "fuse" / "onthefly"
    for step in range(total):
        h.update(step, total)                          # per-step strengths
        ...                                            # the host's forward passes
    h.set(other_specs)                                 # switch; unchanged modules untouched
    h.remove()                                         # bit-exact restore, hooks off
    with lora_ext.apply(model, specs) as h: ...        # remove() on exit

``model``: a diffusers UNet, a transformers CLIP text encoder, ``{"unet", "te1", "te2"}``
or a pipeline. ``specs``: ``LoraSpec`` s, paths, loaded ``Lora`` objects, or (one of those,
strength). Effective strength of a LoRA on a module at a step:
``spec.strength(component, block, step, total) x tuple strength``.

Reports: ``h.reports`` (per LoRA: modules applied, keys not applied with reasons),
``h.unmatched`` (every key not applied: ``{"lora", "key", "reason"}``), ``h.strengths()``,
``h.placement`` / ``h.placement_reasons``, ``h.stats`` (parameter writes ...),
``h.restore_record_bytes`` and ``h.patched_bytes``, ``h.records()`` (per fused parameter:
scheme, bytes, bytes per element), ``h.unfusable`` (modules whose weights are never written,
with the reason: quantised, offloaded).

LoRA/LoCon fusions of fp16/bf16/fp32 weights keep a plain host copy of each pristine weight and
return; a background thread compacts the copies into the small exact record (``background``):
``h.wait_records()``, ``h.records_complete``, ``h.record_memory()``; the copies held at once are
bounded by ``apply(..., record_buffer=...)`` / ``$LORA_EXT_RECORD_BUFFER_BYTES`` (default: the
patched weights' bytes; 0: records built synchronously). Compacted plain copies are kept as
lazily freed mappings for the next switch (no page faults; the kernel takes their pages when it
needs memory, but they count in RSS until then): ``release_spare_memory()`` unmaps them now.

fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``, ComfyUI's ``scale_weight`` included) are
fused in fp32 and rounded once: ``apply(..., rounding="nearest")`` (default; Forge, kohya) or
``"stochastic"`` / ``"stochastic-torch"`` (ComfyUI's seeded stochastic rounding, see ``fp8``).

Modules: ``handle`` (the Handle, transactions), ``fuse`` and ``record`` (fusing and the
restore records), ``onthefly`` (forward hooks), ``auto`` (the placement rule), ``contrib``
(one adapter's share of one module), ``models`` (what apply accepts), ``fp8`` (fp8 weights),
``background`` (the record compactor).
"""
from .handle import ApplyReport, Handle, apply
from .record import RestoreError
from .plainbuf import clear as release_spare_memory

__all__ = ["apply", "Handle", "ApplyReport", "RestoreError", "release_spare_memory"]

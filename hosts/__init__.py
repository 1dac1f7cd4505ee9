"""Host shims (A1111/SD.Next, ComfyUI, InvokeAI), installed as ``lora_ext.hosts``.

Each shim only translates host objects and events into calls on the core's pluggy hookspecs
(``lora_ext.hookspecs``); any logic a shim would need belongs in the core. The shims arrive
with the apply engine (see README, Status); this package is their home.
"""

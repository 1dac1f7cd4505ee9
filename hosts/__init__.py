"""Host shims, installed as ``lora_ext.hosts``: ``a1111`` (A1111 / SD.Next), ``comfyui``,
``invokeai``.

Each shim only translates its host's objects and events into the seam calls of
``lora_ext.hookspecs`` on a ``lora_ext.session.Session`` (model loaded, specs resolved, step
begins, run ends); the logic is in the core. A shim imports its host lazily, so every shim
package can be imported without the host. The files the hosts themselves load live at the
repository root: ``scripts/lora_ext_script.py`` and ``install.py`` (A1111 / SD.Next),
``__init__.py`` (ComfyUI custom nodes); InvokeAI loads ``hosts/invokeai`` linked into its
``nodes`` folder.
"""

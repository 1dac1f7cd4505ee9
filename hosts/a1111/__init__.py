"""A1111 / SD.Next shim: the ``lora`` extra-network tag (and ``lyco``, ``loractl``), settings,
per-step strengths, infotext. ``scripts/lora_ext_script.py`` at the repository root is the
file the host loads; it calls :func:`lora_ext.hosts.a1111.shim.install`.

Importing this package does not import the host; its modules are imported when the shim
first needs them, so the package can be imported (and tested) without a webui.
"""

"""lora-ext for AUTOMATIC1111 stable-diffusion-webui and SD.Next (the file the webui loads).

The webui runs every ``scripts/*.py`` of an extension and registers the ``Script``
subclasses it finds. This one registers lora-ext's callbacks and extra-network handler
(``lora_ext.hosts.a1111.shim``) and an always-on script that makes sure, before every
generation, that the ``lora`` tag goes to lora-ext. All the work is in the package.
"""
import os
import sys

try:
    import lora_ext  # noqa: F401  (installed by install.py)
except ImportError:  # not installed yet: use the copy in this extension's folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lora_ext  # noqa: F401

from modules import scripts

from lora_ext.hosts.a1111 import shim as _shim

_shim.install()


class LoraExtScript(scripts.Script):
    def title(self):
        return "lora-ext"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        _shim.SHIM.before_generation(p)

"""Installer for lora-ext inside a host UI (A1111/SD.Next run it on extension load).

It installs lora-ext into the host's own Python environment without ever touching the host's
torch: the missing runtime dependencies first (torch excluded), then this folder with
``--no-deps`` in editable mode, so updating the extension (``git pull``) needs no reinstall.
Usable standalone too: ``python install.py``.
"""
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Runtime dependencies besides torch, which the host (or the user) provides.
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "numpy": "numpy>=1.24", "pluggy": "pluggy>=1.3",
                "diffusers": "diffusers>=0.30", "transformers": "transformers>=4.40"}


def missing(requirements=REQUIREMENTS):
    return [spec for module, spec in requirements.items() if importlib.util.find_spec(module) is None]


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", *args])


def main():
    if importlib.util.find_spec("torch") is None:
        sys.exit("lora-ext: torch is not installed in this environment; install your host (or "
                 "`pip install torch==2.13.0`) first. lora-ext never installs torch itself.")
    need = missing()
    if need:
        # --no-deps keeps pip from 'upgrading' the host's torch through a dependency.
        pip("--no-deps", *need)
        still = missing()
        if still:
            pip(*still)  # their own dependencies (never torch: it is already satisfied)
    if importlib.util.find_spec("lora_ext") is None:
        pip("--no-deps", "-e", HERE)


if __name__ == "__main__":
    main()

"""lora-ext's ComfyUI patches on ComfyUI's own Flux model class (issue 15), in the ComfyUI
checkout's python (``-m realhost``; needs ``LORA_EXT_COMFYUI_DIR``, and the checkout's venv or
``LORA_EXT_COMFYUI_PYTHON``): a BFL kohya LoRA patched by lora-ext equals ComfyUI's own loader
(comfy.lora.load_lora) bit for bit; a diffusers-named LoRA lands on the fused qkv / linear1 rows
and the swapped final modulation exactly (ComfyUI's offset patches)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.realhost
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_comfy_flux_patches_equal_comfy_loader(tmp_path):
    comfy = os.environ.get("LORA_EXT_COMFYUI_DIR")
    if not comfy:
        pytest.skip("set LORA_EXT_COMFYUI_DIR to a ComfyUI checkout (with its venv) to run this check")
    python = os.environ.get("LORA_EXT_COMFYUI_PYTHON") or os.path.join(comfy, "venv", "bin", "python")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([python, os.path.join(ROOT, "tests", "comfy_dit_check.py"), comfy, str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bfl_changed"] == 4 and res["bfl_max_diff"] == 0.0, res
    assert res["diffusers_changed"] == 4 and res["diffusers_max_diff"] == 0.0, res

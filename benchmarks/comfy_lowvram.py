"""Benchmark: lora-ext's LoRA loader vs ComfyUI's own ``LoraLoader`` inside a REAL ComfyUI,
with the whole model loaded and with a partial (low-VRAM) load.

Not a test: run it by hand (CPU; about 10 minutes on 2 cores, ~6 GB of RAM)::

    LORA_EXT_COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfy_lowvram.py \
        [--rounds 3] [--steps 3] [--kinds lora,loha,lokr] [--lowvram-mb 1000] [--json out.json]

It uses the real-host test's machinery (tests/test_realhost_comfyui.py): lora-ext installed in
``custom_nodes/lora-ext`` by its install.py, a full-size random SD1.5 checkpoint, LoRA files of
each type on the 16 transformer blocks (all attention, feed-forward and proj layers), 2 resnet
convs and 9 CLIP-L layers (rank 4), and a probe node pack that logs every UNet evaluation and
weight load and, for the partial-load server, gives ComfyUI a VRAM budget (``--lowvram-mb``)
through its own ``LoadedModel.model_load``, so the modules beyond it are patched on every
forward by ComfyUI's ``LowVramPatch``. For each mode one server runs; for each type the two
loaders alternate over ``--rounds`` rounds, every run after ``POST /free`` (so each one patches
again), 64x64, euler, cfg 1. Reported: the best (and, in the JSON, the median) of the workflow time (ComfyUI's own
execution_start..success), of the per-step UNet time (median over the run's evaluations) and
of the UNet load (weight patching) time, and the lora-ext / LoraLoader ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import realhost_util as rh  # noqa: E402
import test_realhost_comfyui as t  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kinds", default="lora,loha,lokr")
    ap.add_argument("--lowvram-mb", type=int, default=t.LOWVRAM_MB)
    ap.add_argument("--modes", default="full,lowvram")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    d = rh.comfyui_dir()
    if d is None or rh.comfyui_python() is None:
        sys.exit("set LORA_EXT_COMFYUI_DIR to a ComfyUI checkout with its venv (<dir>/venv)")
    t.LOWVRAM_MB = args.lowvram_mb
    t._install(d)
    t._write_models(d)
    c = t.Comfy(d)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    results = {}
    try:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            results[mode] = t.timing_series(c, mode, kinds=kinds, rounds=args.rounds, steps=args.steps)
            if mode == "lowvram":
                assert "loaded partially" in c.host.log(), "no partial load happened"
    finally:
        c.stop()
    print(f"ComfyUI {open(os.path.join(d, 'comfyui_version.py')).read().split('=')[-1].strip()} "
          f"at {d}; {args.steps} steps 64x64, best of {args.rounds} rounds (medians in the JSON)")
    print(f"{'mode':8s} {'type':6s} | {'workflow s':>21s} | {'per step s':>21s} | {'UNet load s':>21s}")
    print(f"{'':8s} {'':6s} | {'ext':>6s} {'core':>6s} {'ratio':>7s} | {'ext':>6s} {'core':>6s} {'ratio':>7s} | "
          f"{'ext':>6s} {'core':>6s} {'ratio':>7s}")
    for mode, per in results.items():
        for kind, r in per.items():
            a, b = r["LoraExtLoader"]["best"], r["LoraLoader"]["best"]
            cells = []
            for i in range(3):
                cells.append(f"{a[i]:6.2f} {b[i]:6.2f} {a[i] / b[i] if b[i] else float('nan'):6.2f}x")
            print(f"{mode:8s} {kind:6s} | " + " | ".join(cells) + f" | latents rel. diff {r['rel_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Regenerate ``lora_ext/tables/sd_modules.json.gz`` from the shipped configs.

    python -m lora_ext.tables.generate [--check] [--out PATH]

Builds every (arch, component) on the ``meta`` device with diffusers / transformers exactly as
``arch.build_meta`` does and stores its weight-bearing modules (see ``lora_ext.tables``).
``--check`` writes nothing and exits 1 when the shipped file differs from a fresh generation.
A developer tool: needs diffusers and transformers (``pip install -e ".[full]"``).
"""
from __future__ import annotations

import argparse
import sys

from .. import arch
from . import DATA_FILE, FORMAT, config_digest, dumps, load


def _canonical(component: str, name: str) -> str:
    # text encoders: without the ``text_model.`` level, whatever the transformers version
    return name if component == "unet" else arch._strip_text_model(name)


def generate_tables() -> dict:
    """``{"sd1/unet": {"config_sha256": ..., "modules": [[name, kind, [w], [b] | None], ...]}, ...}``."""
    out = {}
    for a in arch.ARCHS:
        for component in arch.components(a):
            model = arch.build_meta(a, component)
            out[f"{a}/{component}"] = {
                "config_sha256": config_digest(arch.load_config(a, component)),
                "modules": [[_canonical(component, name), kind, list(w), None if b is None else list(b)]
                            for name, kind, w, b in arch.module_entries(model)],
            }
    return out


def generate() -> dict:
    """The whole file's content (in memory)."""
    import diffusers
    import torch
    import transformers

    return {"format": FORMAT,
            "generated_with": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                               "transformers": transformers.__version__},
            "tables": generate_tables()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_ext.tables.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DATA_FILE, help="where to write (default: the shipped file)")
    ap.add_argument("--check", action="store_true", help="compare with the shipped file, write nothing")
    args = ap.parse_args(argv)
    data = generate()
    if args.check:
        same = load(args.out)["tables"] == data["tables"]
        print("up to date" if same else f"{args.out} differs from a fresh generation; rerun without --check")
        return 0 if same else 1
    with open(args.out, "wb") as f:
        f.write(dumps(data))
    n = sum(len(t["modules"]) for t in data["tables"].values())
    print(f"wrote {args.out}: {len(data['tables'])} tables, {n} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())

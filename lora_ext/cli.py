"""The ``lora-ext`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LoraExtError


def _cmd_inspect(args) -> int:
    from .inspect import inspect_lora, render_text

    status = 0
    for path in args.paths:
        try:
            info = inspect_lora(path)
        except LoraExtError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps(info, sort_keys=False))
        else:
            print(render_text(info))
    return status


def _cmd_merge(args) -> int:
    from .merge import merge, parse_lora_arg

    merge(args.base, [parse_lora_arg(a) for a in args.lora], args.out, log=print)
    return 0


def _cmd_demo(args) -> int:
    from .demo import write_demo_files

    for path in write_demo_files(args.folder):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-ext", description="Every LoRA type, in every Stable Diffusion host.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="what a LoRA file is, and what of it would not apply")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true", help="one JSON object per file")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("merge", help="bake LoRAs into a checkpoint")
    s.add_argument("--base", required=True, metavar="CKPT", help="A1111 single file or diffusers folder")
    s.add_argument("--lora", required=True, action="append", metavar="PATH[:STRENGTH]")
    s.add_argument("--out", required=True, metavar="OUT")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("demo-files", help="write small real-format LoRA files to try inspect on")
    s.add_argument("folder", metavar="DIR")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraExtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``lora-ext inspect``'s options and what it does with them (single files and library mode)."""
from __future__ import annotations

import json
import os
import sys

from .errors import LoraExtError
from .textsafe import printable


def add_inspect_args(s) -> None:
    s.add_argument("paths", nargs="+", metavar="PATH", help="LoRA files, or folders (library mode: every LoRA under them)")
    s.add_argument("--base", metavar="CKPT", help="bind against this checkpoint (single file or diffusers folder, any size)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per file (every key kept)")
    out.add_argument("--table", action="store_true", help="one row per file (the default for folders)")
    out.add_argument("--csv", action="store_true", help="one CSV row per file")
    s.add_argument("--keys", action="store_true", help="list every key not applied (default: grouped by reason and module)")
    s.add_argument("--full", action="store_true",
                   help="library mode: read every tensor (NaN/Inf check of all data, A1111 hash computed)")
    s.add_argument("--jobs", type=int, metavar="N", help="library mode: worker processes (default: one per idle core; 1 below 32 files)")
    s.add_argument("--cache", metavar="PATH", help="library mode: the per-file cache (default: "
                                                   "$XDG_CACHE_HOME/lora-ext/inspect-cache.json)")
    s.add_argument("--no-cache", action="store_true", help="library mode: neither read nor write the cache")
    s.add_argument("--no-progress", action="store_true", help="library mode: no progress on stderr")


def run_inspect(args) -> int:
    from .inspect_any import BaseModelRef

    base = BaseModelRef(args.base) if args.base else None  # a bad base: one line (LoraExtError)
    library = args.table or args.csv or any(os.path.isdir(p) for p in args.paths)
    if library:
        return _library(args, base)
    from .inspect import inspect_lora, render_text

    status = 0
    for path in args.paths:
        try:
            info = inspect_lora(path, base)
        except LoraExtError as exc:
            print(f"error: {printable(exc)}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps(info, sort_keys=False))
        else:
            print(render_text(info, keys=args.keys))
    return status


def _library(args, base) -> int:
    from .library import default_cache_path, render_csv, render_table, scan_library, summary_line

    if args.jobs is not None and args.jobs < 1:
        raise LoraExtError(f"--jobs: {args.jobs} is not a number of processes (1 or more)")
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        raise LoraExtError(f"{missing[0]}: no such file or folder")
    cache = None if args.no_cache else (args.cache or default_cache_path())
    result = scan_library(args.paths, base=base, full=args.full, jobs=args.jobs, cache_path=cache,
                          progress=False if args.no_progress else None)
    if not result["rows"]:
        raise LoraExtError(f"no LoRA files (.safetensors, .ckpt, .pt, .pth, .bin) under {', '.join(args.paths)}")
    if args.json:
        for row in result["rows"]:
            print(json.dumps(row, sort_keys=False))
    elif args.csv:
        sys.stdout.write(render_csv(result["rows"]))
    else:
        print(render_table(result["rows"]))
        print(printable(summary_line(result)), file=sys.stderr)
    return 0

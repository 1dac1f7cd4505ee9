"""The ``lora-ext`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import LoraExtError
from .textsafe import printable


def _cmd_inspect(args) -> int:
    from .inspect_cli import run_inspect

    return run_inspect(args)


def _cmd_merge(args) -> int:
    from .merge import merge, parse_lora_arg

    merge(args.base, [parse_lora_arg(a) for a in args.lora], args.out, log=_print_line, allow_empty=args.allow_empty)
    return 0


def _cmd_demo(args) -> int:
    from .demo import write_demo_files

    for path in write_demo_files(args.folder):
        _print_line(path)
    return 0


# generate's names, kept here so that building the parser imports no torch (a test checks them)
SAMPLER_NAMES = ("euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde",
                 "dpmpp_2s_a", "ddim", "lcm")
SCHEDULE_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "trailing", "ddim_uniform", "lcm")


def _cmd_generate(args) -> int:
    _check_generate_args(args)  # before torch or the model is loaded
    try:
        return _generate(args)
    except ValueError as exc:  # a bad option value (size, sampler name, ...)
        print(f"error: {printable(_first_line(exc))}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        text = str(exc)
        if "allocate" in text or "out of memory" in text.lower():
            print(f"error: not enough memory for {args.batch} image(s) of this size on this device "
                  f"({printable(_first_line(exc))}); nothing was written", file=sys.stderr)
            return 2
        raise


#: bounds of generate's numbers (each far beyond any use: 16384 px is a 268-megapixel image)
GENERATE_LIMITS = {"width": (1, 16384), "height": (1, 16384), "steps": (1, 1000), "batch": (1, 64),
                   "clip_skip": (1, 24), "cfg": (-100.0, 100.0), "denoise": (0.0, 1.0), "eta": (0.0, 10.0),
                   "seed": (0, 2 ** 63 - 1)}
#: an --init-image larger than this many pixels is refused before it is decoded
MAX_INIT_PIXELS = 16384 * 16384


def _arg_error(option: str, problem: str) -> "LoraExtError":
    return LoraExtError(f"{option}: {problem}")


def _check_generate_args(args) -> None:
    """Every number finite and in range, the device real, the init image an image, the output
    writable: each refused with one line naming the option, before any work."""
    import math

    for name, (lo, hi) in GENERATE_LIMITS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise _arg_error(option, f"{value} is not a finite number")
        if not lo <= value <= hi:
            raise _arg_error(option, f"{value:g} is out of range ({lo:g} to {hi:g})" if isinstance(value, float)
                             else f"{value} is out of range ({lo} to {hi})")
    if args.seed is not None and args.seed + args.batch > 2 ** 63:
        raise _arg_error("--seed", "too large for this batch")
    if args.device is not None:
        _check_device(args.device)
    if args.init_image is not None:
        _check_image(args.init_image)
    _check_image_out(args.out)


def _check_device(name: str) -> None:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise _arg_error("--device", f"{name!r} is not a device torch knows ({_first_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _arg_error("--device", f"{name!r}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # any backend's refusal
            raise _arg_error("--device", f"{name!r} cannot be used ({_first_line(exc)})") from None


def _check_image(path: str) -> None:
    """The init image opens as an image of a sane size and decodes (a bomb is refused unread)."""
    import warnings

    from PIL import Image

    if not os.path.isfile(path):
        raise _arg_error("--init-image", f"{path}: {'is a folder' if os.path.isdir(path) else 'no such file'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w < 1 or h < 1 or w * h > MAX_INIT_PIXELS:
                    raise _arg_error("--init-image", f"{path}: {w}x{h} pixels, beyond the limit of "
                                                     f"{MAX_INIT_PIXELS} pixels")
                img.load()
    except LoraExtError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _arg_error("--init-image", f"{path}: refused, too many pixels ({_first_line(exc)})") from None
    except Image.UnidentifiedImageError:
        raise _arg_error("--init-image", f"{path}: not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise _arg_error("--init-image", f"{path}: cannot read the image ({_first_line(exc)})") from None


def _check_image_out(out: str) -> None:
    """--out: a .png file whose folder exists, or a folder that exists or can be made."""
    target = os.path.abspath(out)
    if out.lower().endswith(".png"):
        if os.path.isdir(target):
            raise _arg_error("--out", f"{out}: is a folder")
        folder = os.path.dirname(target)
        if not os.path.isdir(folder):
            raise _arg_error("--out", f"{out}: the folder {folder} does not exist")
    elif os.path.exists(target) and not os.path.isdir(target):
        raise _arg_error("--out", f"{out}: exists and is not a folder")
    else:
        folder = target
        while not os.path.isdir(folder):
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _arg_error("--out", f"{out}: cannot write in {folder} (permission denied)")


def _generate(args) -> int:
    import torch

    from .sampler import generate, load_model

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    model = load_model(args.checkpoint, tokenizer=args.tokenizer, vae=args.vae, prediction=args.prediction,
                       device=args.device or ("cuda" if torch.cuda.is_available() else None), dtype=dtype)
    if args.verbose:
        for note in model.notes:
            _print_line(note)
    result = generate(
        model, args.prompt, args.negative, lora_dirs=args.lora_dir, sampler=args.sampler, schedule=args.schedule,
        steps=args.steps, cfg=args.cfg, seed=args.seed, width=args.width, height=args.height, batch=args.batch,
        init_image=args.init_image, denoise=args.denoise, out=args.out, clip_skip=args.clip_skip, eta=args.eta,
        lora_method=args.lora_method, progress=not args.quiet, log=_print_line,
    )
    s = result.settings
    _print_line(f"{s['sampler']} / {s['schedule']}, {s['steps']} steps, CFG {s['cfg']:g}, {s['width']}x{s['height']}")
    for path, seed in zip(result.paths, result.seeds):
        _print_line(f"{path}  (seed {seed})")
    return 0


# --- LoRA tools ------------------------------------------------------------------------------
def _tool_done(args, report) -> int:
    for line in report.lines(per_module=not args.summary_only):
        _print_line(line)  # module names, paths and reasons come from files
    if args.report_json:
        report.write_json(args.report_json)
    return 0


def _progress(args):
    return False if args.no_progress else None  # None: a bar when stderr is a terminal


def _rank_options(args) -> dict:
    return dict(rank_by=args.rank_by, energy=args.energy, ratio=args.ratio, method=args.svd)


def _cmd_extract(args) -> int:
    from .tools import extract

    report = extract(args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank, min_diff=args.min_diff,
                     fmt=args.format, dtype=args.dtype, progress=_progress(args), **_rank_options(args))
    return _tool_done(args, report)


def _cmd_unmerge(args) -> int:
    from .merge import parse_lora_arg
    from .tools import unmerge

    loras = [parse_lora_arg(a) for a in args.lora or []]
    opts = {} if loras else dict(conv_rank=args.conv_rank, min_diff=args.min_diff, fmt=args.format, dtype=args.dtype,
                                 **_rank_options(args))
    report = unmerge(args.merged, args.out, base=args.base, loras=loras, rank=args.rank, progress=_progress(args), **opts)
    return _tool_done(args, report)


def _cmd_combine(args) -> int:
    from .tools import combine, parse_source_arg

    sources = [parse_source_arg(a) for a in args.loras]
    report = combine(sources, args.out, rank=args.rank, conv_rank=args.conv_rank, base=args.base, fmt=args.format,
                     dtype=args.dtype, progress=_progress(args), rank_by=args.rank_by if args.rank_by != "fixed" else None,
                     energy=args.energy if args.rank_by == "energy" else None,
                     ratio=args.ratio if args.rank_by == "ratio" else None, method=args.svd)
    return _tool_done(args, report)


def _cmd_resize(args) -> int:
    from .tools import resize

    report = resize(args.lora, args.out, rank=args.rank, energy=args.energy, ratio=args.ratio, conv_rank=args.conv_rank,
                    base=args.base, fmt=args.format, dtype=args.dtype, method=args.svd, progress=_progress(args))
    return _tool_done(args, report)


def _cmd_convert(args) -> int:
    from .tools import convert

    report = convert(args.lora, args.out, to=args.to, base=args.base, progress=_progress(args))
    return _tool_done(args, report)


def _cmd_transfer(args) -> int:
    from .tools import transfer

    report = transfer(args.lora, args.out, source=args.source, target=args.target, min_similarity=args.min_similarity,
                      subspace_rank=args.subspace_rank, method=args.method, on_dissimilar=args.on_dissimilar,
                      rank=args.rank, reference=args.reference, fmt=args.format, dtype=args.dtype,
                      progress=_progress(args))
    return _tool_done(args, report)


def _tool_common(s, *, fmt=True) -> None:
    if fmt:
        s.add_argument("--format", choices=("kohya", "peft"), default="kohya",
                       help="kohya names with alpha (default; every host loads them) or PEFT/diffusers")
        s.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="tensor dtype of the output")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.add_argument("--summary-only", action="store_true", help="print the summary, not one line per module")
    s.add_argument("--report-json", metavar="PATH", help="also write the full report as JSON")


def _rank_args(s, *, required: bool, energy_default=0.99, ratio_default=10.0) -> None:
    s.add_argument("--rank", type=int, required=required, metavar="R", help="rank (the cap under ratio/energy)")
    s.add_argument("--conv-rank", type=int, metavar="R", help="rank of k x k convs (default: --rank; 0 skips them)")
    s.add_argument("--rank-by", choices=("fixed", "ratio", "energy"), default="fixed",
                   help="fixed: R; ratio: singular values within --ratio of the largest; energy: fewest keeping --energy")
    s.add_argument("--energy", type=float, default=energy_default, metavar="F", help="fraction of squared norm to keep (--rank-by energy)")
    s.add_argument("--ratio", type=float, default=ratio_default, metavar="X", help="largest/smallest kept singular value (--rank-by ratio)")
    s.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto", help="SVD method (auto: randomized for large modules)")


def _add_tools(sub) -> None:
    s = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    s.add_argument("--base", required=True, metavar="BASE", help="A1111 single file or diffusers folder")
    s.add_argument("--tuned", required=True, metavar="TUNED")
    s.add_argument("--out", required=True, metavar="LORA")
    _rank_args(s, required=True)
    s.add_argument("--min-diff", type=float, default=0.0, metavar="F",
                   help="treat modules changed by at most this fraction of their weight as unchanged (default 0: identical only)")
    _tool_common(s)
    s.set_defaults(func=_cmd_extract)

    s = sub.add_parser("unmerge", help="recover a merged LoRA (with --base), or the clean base (with --lora)")
    s.add_argument("--merged", required=True, metavar="CKPT")
    s.add_argument("--base", metavar="BASE", help="the checkpoint the LoRA was merged into")
    s.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]", help="a LoRA that was merged: take it out exactly")
    s.add_argument("--out", required=True, metavar="OUT", help="a LoRA file, or with --lora a checkpoint")
    _rank_args(s, required=False)
    s.add_argument("--min-diff", type=float, default=0.0, metavar="F")
    _tool_common(s)
    s.set_defaults(func=_cmd_unmerge)

    s = sub.add_parser("combine", help="several LoRAs (any types, weights, block weights) into one LoRA")
    s.add_argument("loras", nargs="+", metavar="PATH[:W][:lbw=BLOCKS]")
    s.add_argument("--out", required=True, metavar="LORA")
    s.add_argument("--base", metavar="CKPT", help="needed for DoRA/OFT/IA3/GLoRA inputs and non-standard models")
    _rank_args(s, required=False)
    _tool_common(s)
    s.set_defaults(func=_cmd_combine)

    s = sub.add_parser("resize", help="a LoRA at another rank (or the rank keeping a share of its energy)")
    s.add_argument("lora", metavar="LORA")
    s.add_argument("--out", required=True, metavar="LORA")
    g = s.add_argument_group("new rank (one or more)")
    g.add_argument("--rank", type=int, metavar="R", help="fixed rank, or the cap with --energy/--ratio")
    g.add_argument("--energy", type=float, metavar="F", help="fewest singular values keeping this fraction of the squared norm")
    g.add_argument("--ratio", type=float, metavar="X", help="singular values within X of the largest")
    s.add_argument("--conv-rank", type=int, metavar="R")
    s.add_argument("--base", metavar="CKPT")
    s.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto")
    _tool_common(s)
    s.set_defaults(func=_cmd_resize)

    s = sub.add_parser("convert", help="kohya <-> PEFT/diffusers, losslessly (alpha and DoRA kept)")
    s.add_argument("lora", metavar="LORA")
    s.add_argument("--to", required=True, choices=("kohya", "peft", "diffusers"))
    s.add_argument("--out", required=True, metavar="LORA")
    s.add_argument("--base", metavar="CKPT", help="for LoRAs of models other than full-size SD1.x/SD2.x/SDXL")
    _tool_common(s, fmt=False)
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("transfer", help="carry a LoRA to another base of the same family (no training)")
    s.add_argument("lora", metavar="LORA")
    s.add_argument("--from", dest="source", required=True, metavar="BASE_A", help="the checkpoint the LoRA was trained on")
    s.add_argument("--to", dest="target", required=True, metavar="BASE_B")
    s.add_argument("--out", required=True, metavar="LORA")
    s.add_argument("--min-similarity", type=float, default=0.8, metavar="S",
                   help="transfer only modules whose subspace similarity is at least S (0..1, default 0.8)")
    s.add_argument("--subspace-rank", type=int, default=64, metavar="K", help="size of the compared subspaces (default 64)")
    s.add_argument("--method", choices=("align", "project"), default="align")
    s.add_argument("--on-dissimilar", choices=("keep", "drop"), default="keep",
                   help="what to do with modules below --min-similarity (default keep them as they are)")
    s.add_argument("--rank", type=int, metavar="R", help="rank for LoHa/LoKr/full modules turned into LoRA")
    s.add_argument("--reference", metavar="LORA", help="a LoRA trained on BASE_B: report distances to it per module")
    _tool_common(s)
    s.set_defaults(func=_cmd_transfer)


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr (exit 2): the command and the problem."""

    def error(self, message):
        self.exit(2, f"error: {printable(self.prog)}: {printable(message)} (see {printable(self.prog)} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-ext", description="Every LoRA type, in every Stable Diffusion host.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("inspect", help="what a LoRA file is, and what of it would not apply")
    from .inspect_cli import add_inspect_args

    add_inspect_args(s)
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("merge", help="bake LoRAs into a checkpoint")
    s.add_argument("--base", required=True, metavar="CKPT", help="A1111 single file or diffusers folder")
    s.add_argument("--lora", required=True, action="append", metavar="PATH[:STRENGTH]")
    s.add_argument("--out", required=True, metavar="OUT")
    s.add_argument("--allow-empty", action="store_true",
                   help="write the output even when a LoRA changes nothing (no modules, rank 0 or all-zero factors)")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("generate", help="make images from a prompt (LoRA tags work), no host needed")
    s.add_argument("--checkpoint", required=True, metavar="CKPT", help="A1111 single file or diffusers folder")
    s.add_argument("--prompt", required=True, metavar="TEXT", help="may hold <lora:NAME:W...> tags")
    s.add_argument("--negative", default="", metavar="TEXT")
    s.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="where LoRA tags are looked up")
    s.add_argument("--sampler", metavar="NAME", help=f"{', '.join(SAMPLER_NAMES)} (default dpmpp_2m)")
    s.add_argument("--schedule", metavar="NAME", help=f"{', '.join(SCHEDULE_NAMES)} (default: the sampler's usual one)")
    s.add_argument("--steps", type=int, metavar="N", help="default 20")
    s.add_argument("--cfg", type=float, metavar="F", help="CFG scale, default 7 (1 skips the negative prompt)")
    s.add_argument("--seed", type=int, metavar="N", help="image i of a batch uses N+i; default random")
    s.add_argument("--width", type=int, metavar="W")
    s.add_argument("--height", type=int, metavar="H")
    s.add_argument("--batch", type=int, default=1, metavar="N")
    s.add_argument("--init-image", metavar="PNG", help="img2img from this image")
    s.add_argument("--denoise", type=float, metavar="F", help="img2img strength, default 0.75")
    s.add_argument("--out", default="outputs", metavar="PATH", help="folder, or a .png path (default outputs/)")
    s.add_argument("--tokenizer", metavar="PATH", help="CLIP tokenizer folder (vocab.json + merges.txt) or "
                                                       "bpe_simple_vocab_16e6.txt.gz")
    s.add_argument("--vae", metavar="FILE", help="a separate VAE file")
    s.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    s.add_argument("--clip-skip", type=int, default=1, metavar="N")
    s.add_argument("--eta", type=float, metavar="F", help="noise of ancestral/SDE samplers and DDIM")
    s.add_argument("--lora-method", choices=["auto", "fuse", "onthefly"], default="auto")
    s.add_argument("--device", metavar="DEV", help="default cuda when available, else cpu")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="UNet/text encoder dtype (default fp32)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("-v", "--verbose", action="store_true", help="say how the checkpoint was read")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("demo-files", help="write small real-format LoRA files to try inspect on")
    s.add_argument("folder", metavar="DIR")
    s.set_defaults(func=_cmd_demo)

    _add_tools(sub)
    return p


def _print_line(line) -> None:
    """A report line (merge, tools): its values come from files; a report line is one line."""
    print(printable(line))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "report_json", None):
            from .io import check_output_target

            check_output_target(args.report_json)  # before the work, not after it
        return args.func(args)
    except LoraExtError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: not enough memory for this command; nothing was written", file=sys.stderr)
        return 2
    except OSError as exc:
        # a file the command could not read or write, named by the system
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {printable(where)}{printable(exc.strerror or exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line (LORA_EXT_TRACEBACK=1 shows the traceback)
        if os.environ.get("LORA_EXT_TRACEBACK"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {printable(_first_line(exc))}); "
              "please report it (LORA_EXT_TRACEBACK=1 shows where)", file=sys.stderr)
        return 3


def _first_line(exc) -> str:
    text = str(exc).strip().split("\n")[0]
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``lora-ext inspect`` library mode over a generated LoRA library.

Not a test. Writes a library of ``--files`` LoRA files (default 320) into ``--folder``: full-size
SD1.5 kohya LoRAs (attention and feed-forward, rank 4-16, fp16, with alphas and kohya metadata),
SDXL LyCORIS LoHas, Flux.1 kohya LoRAs (double blocks), PEFT/diffusers SD1.5 LoRAs, LoHas for a
small custom UNet (the "unknown base" case), pickles (``.pt``), broken files (truncated, not
safetensors) and byte-identical copies. Then, in one process and with the page cache warm for
all three:

* floor: ``safetensors.safe_open`` on every ``.safetensors`` file and listing its keys (pickles
  are ``torch.load``-ed with ``weights_only=True``, as the safe loader does);
* cold: ``scan_library`` with an empty cache (every header parsed, small tensors read, types,
  detection, binding, duplicate confirmation), ``--jobs`` worker processes;
* warm: ``scan_library`` again with the cache the cold run wrote.

    python benchmarks/inspect_library.py --folder /tmp/loralib            # 320 files, 2 jobs
    python benchmarks/inspect_library.py --folder /tmp/loralib --files 60 --jobs 1
"""
from __future__ import annotations

import os
import sys

# this file is named like the standard library's ``inspect``: keep its folder off the path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_ext import library  # noqa: E402

# an older checkout (for before/after figures) has no torch-free path
fastpath = None
if os.path.exists(os.path.join(os.path.dirname(library.__file__), "fastpath.py")):
    from lora_ext import fastpath  # noqa: E402
from lora_ext.layouts import arch_layout  # noqa: E402


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _kohya(table, prefix, rank, g, dtype, pick, extra=0.0, skip=-1):
    sd = {}
    j = -1
    for path, info in table.items():
        if not pick(path, info) or len(info.weight_shape) != 2:
            continue
        j += 1
        if j == skip:
            continue
        out, inn = info.weight_shape
        p = prefix + _flat(path)
        sd[p + ".lora_down.weight"] = (torch.randn(rank, inn, generator=g) * 0.01).to(dtype)
        sd[p + ".lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01 + extra).to(dtype)
        sd[p + ".alpha"] = torch.tensor(float(rank) / 2)
    return sd


def _attn(path, info):
    return any(s in path for s in ("attn1.to_", "attn2.to_", "ff.net"))


def make_library(folder: str, n: int, seed: int = 0, distinct: bool = False) -> dict:
    """``distinct``: no two files (copies aside) share their header structure: each leaves out
    another module (the ``k``-th of its kind), so the structure memo finds nothing to reuse."""
    from safetensors.torch import save_file

    if os.path.isdir(folder):
        shutil.rmtree(folder)
    kinds = {}
    g = torch.Generator().manual_seed(seed)
    sd1 = arch_layout("sd1")["unet"]
    sdxl = arch_layout("sdxl")["unet"]
    flux = arch_layout("flux-dev")["unet"]
    written = []
    for i in range(n):
        kind = ("sd15", "sd15", "sd15", "sdxl_loha", "flux", "peft", "custom_loha", "pickle", "copy", "broken")[i % 10]
        skip = i // 10 if distinct else -1
        sub = os.path.join(folder, kind, f"part{i % 3}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{kind}_{i:04d}.safetensors")
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
                "ss_tag_frequency": '{"10_style%d": {"style%d": 10, "1girl": 5}}' % (i, i)}
        if kind == "sd15":
            rank = (4, 8, 16)[i % 3]
            save_file(_kohya(sd1, "lora_unet_", rank, g, torch.float16, _attn, skip=skip), path, meta)
        elif kind == "sdxl_loha":
            sd = {}
            for j, (p, info) in enumerate((p, x) for p, x in sdxl.items() if "attn2.to_k" in p or "attn2.to_v" in p):
                if j != skip:
                    out, inn = info.weight_shape
                    k = "lora_unet_" + _flat(p)
                    for a, s in (("hada_w1_a", (out, 4)), ("hada_w1_b", (4, inn)), ("hada_w2_a", (out, 4)),
                                 ("hada_w2_b", (4, inn))):
                        sd[f"{k}.{a}"] = (torch.randn(*s, generator=g) * 0.01).half()
                    sd[k + ".alpha"] = torch.tensor(2.0)
            save_file(sd, path, dict(meta, ss_network_module="lycoris.kohya", ss_network_args='{"algo": "loha"}'))
        elif kind == "flux":
            save_file(_kohya(flux, "lora_unet_", 8, g, torch.bfloat16,
                             lambda p, info: p.startswith("transformer_blocks.") and "attn.to_" in p, skip=skip), path,
                      dict(meta, ss_base_model_version="flux1"))
        elif kind == "peft":
            sd = {}
            for j, (p, info) in enumerate((p, x) for p, x in sd1.items() if _attn(p, x) and len(x.weight_shape) == 2):
                if j != skip:
                    out, inn = info.weight_shape
                    sd[f"unet.{p}.lora_A.weight"] = (torch.randn(4, inn, generator=g) * 0.01).half()
                    sd[f"unet.{p}.lora_B.weight"] = (torch.randn(out, 4, generator=g) * 0.01).half()
            save_file(sd, path)
        elif kind == "custom_loha":
            sd = {}
            for j in range(40):
                if j == skip:
                    continue
                k = f"lora_unet_down_blocks_{j // 10}_attentions_0_transformer_blocks_{j % 10}_attn1_to_q"
                for a, s in (("hada_w1_a", (48, 4)), ("hada_w1_b", (4, 48)), ("hada_w2_a", (48, 4)),
                             ("hada_w2_b", (4, 48))):
                    sd[f"{k}.{a}"] = torch.randn(*s, generator=g)
                sd[k + ".alpha"] = torch.tensor(2.0)
            save_file(sd, path, dict(meta, ss_network_module="lycoris.kohya", ss_network_args='{"algo": "loha"}'))
        elif kind == "pickle":
            path = path[: -len(".safetensors")] + ".pt"
            torch.save(_kohya(sd1, "lora_unet_", 4, g, torch.float16, lambda p, info: "attn2.to_k" in p), path)
        elif kind == "copy":
            src = written[-8]  # an earlier file (an sd15 / sdxl / flux one)
            path = os.path.join(sub, "copy_of_" + os.path.basename(src))
            shutil.copyfile(src, path)
        else:
            with open(written[-9], "rb") as fh:
                data = fh.read()
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2] if i % 20 == 9 else b"not a safetensors file")
        written.append(path)
        kinds[path] = kind
    return kinds


EXPECT = {  # kind -> (base model, types) every row of that kind must show
    "sd15": ("sd1", {"lora"}), "sdxl_loha": ("sdxl", {"loha"}), "flux": ("flux", {"lora"}),
    "peft": ("sd1", {"lora"}), "custom_loha": ("unknown", {"loha"}), "pickle": ("sd1", {"lora"}),
}


def check_rows(rows, kinds) -> list:
    """Every row against what was written: base, types, problems, duplicates."""
    bad = []
    for r in rows:
        kind = kinds.get(r["path"]) or next((k for p, k in kinds.items() if os.path.samefile(p, r["path"])), None)
        probs = r.get("problems") or []
        if kind == "broken":
            ok = probs and probs[0].startswith("unreadable")
        elif kind == "copy":  # flagged with its original (which of the two is named first: path order)
            ok = len(r.get("duplicates", [])) == 1 and "copy_of_" + os.path.basename(r["duplicates"][0]) == \
                os.path.basename(r["path"])
        else:
            base, types = EXPECT[kind]
            ok = (r["base_model"] == base or r["base_model"].startswith(base + "-")) and set(r["types"]) == types
            if kind != "custom_loha":
                ok = ok and all(p.startswith(("same tensors as", "duplicate of")) for p in probs)
        if not ok:
            bad.append((kind, r["path"], r.get("base_model"), r.get("types"), probs))
    return bad


def floor(files) -> float:
    from safetensors import safe_open

    t = time.perf_counter()
    for p in files:
        try:
            if p.endswith(".safetensors"):
                with safe_open(p, "pt") as f:
                    list(f.keys())
            else:
                list(torch.load(p, weights_only=True, mmap=True).keys())
        except Exception:
            pass
    return time.perf_counter() - t


def _forget_process_state() -> None:
    """What a scan leaves in this process for the next one: the structure memos, the fast
    path's decoded tables and key maps, the component indexes, the layouts' key maps."""
    from lora_ext import keys, layouts

    library._MEMO["ready"] = None
    if fastpath is not None:
        fastpath.MODELS.clear()
    if hasattr(keys, "_INDEXES"):
        keys._INDEXES.clear()
    layouts.arch_keymap.cache_clear()


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/lora-ext-bench-library")
    ap.add_argument("--files", type=int, default=320)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="reuse the library in --folder if it is there")
    ap.add_argument("--repeat", type=int, default=3, help="cold and warm runs (median reported)")
    ap.add_argument("--distinct", action="store_true",
                    help="no two files (copies aside) with the same header structure (each leaves out another module)")
    args = ap.parse_args()
    if not (args.keep and os.path.isdir(args.folder)):
        t = time.perf_counter()
        make_library(args.folder, args.files, distinct=args.distinct)
        print(f"wrote {args.files} files in {time.perf_counter() - t:.1f} s")
    # byte-compiled modules, as an installed package has them (pip writes them; this process may
    # run with PYTHONDONTWRITEBYTECODE, and compiling the modules a scan imports lazily is not
    # part of scanning)
    import compileall

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    was, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    for pkg in ("lora_ext", "adapters"):
        compileall.compile_dir(os.path.join(root, pkg), quiet=1)
    sys.dont_write_bytecode = was
    load0 = f"{os.getloadavg()[0]:.2f}"
    kinds = {p: p.split(os.sep)[-3] for p in library.find_lora_files([args.folder])}
    files = library.find_lora_files([args.folder])
    size = sum(os.path.getsize(p) for p in files)
    for p in files:  # page cache warm for every run
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    cache = os.path.join(args.folder + "-cache.json")
    runs = []
    for r in range(args.repeat):
        if r:
            _forget_process_state()
        if os.path.exists(cache):
            os.remove(cache)
        c0 = _cpu()
        t_floor = floor(files)
        c_floor = _cpu() - c0
        t, c = time.perf_counter(), _cpu()
        cold = library.scan_library([args.folder], jobs=args.jobs, cache_path=cache, progress=False)
        t_cold, c_cold = time.perf_counter() - t, _cpu() - c
        t, c = time.perf_counter(), _cpu()
        warm = library.scan_library([args.folder], jobs=args.jobs, cache_path=cache, progress=False)
        t_warm, c_warm = time.perf_counter() - t, _cpu() - c
        t_floor2 = floor(files)
        assert warm["rows"] == cold["rows"]
        runs.append(dict(floor=min(t_floor, t_floor2), c_floor=c_floor, cold=t_cold, c_cold=c_cold, warm=t_warm,
                         c_warm=c_warm, jobs=cold["stats"].get("jobs")))
    rows_by_path = {r["path"]: r for r in cold["rows"]}
    print(f"{len(files)} files, {size / 1e6:.0f} MB; jobs={runs[0]['jobs'] or args.jobs or '?'} "
          f"({'given' if args.jobs else 'chosen by the scan'}); {args.repeat} runs (the scan's process state "
          "forgotten between them: memo, key maps, layout tables)")
    print(f"load average before/after: {load0} / {os.getloadavg()[0]:.2f}; "
          f"torch-free path: {'yes' if fastpath and fastpath.available() else 'no'}")
    for i, x in enumerate(runs):
        print(f"  run {i + 1}: floor {x['floor']:.3f} s, cold {x['cold']:.3f} s = {x['cold'] / x['floor']:.2f}x "
              f"(CPU {x['c_cold']:.2f} s = {x['c_cold'] / x['c_floor']:.2f}x), warm {x['warm']:.3f} s "
              f"= {x['cold'] / x['warm']:.0f}x faster than cold")
    med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
    ratio = statistics.median(x["cold"] / x["floor"] for x in runs)
    print(f"floor (safe_open + keys):      {med('floor'):.3f} s wall, {med('c_floor'):.3f} s CPU (median)")
    print(f"cold (empty cache):            {med('cold'):.3f} s wall, median {ratio:.2f}x the floor of its run "
          f"(best {min(x['cold'] / x['floor'] for x in runs):.2f}x); {med('c_cold'):.3f} s CPU "
          "(this process and its workers)")
    print(f"warm (unchanged library):      {med('warm'):.3f} s wall, median "
          f"{statistics.median(x['cold'] / x['warm'] for x in runs):.0f}x faster than cold; {med('c_warm'):.3f} s CPU")
    print(library.summary_line(cold))
    split = getattr(library, "_split_header", None)
    if split is not None:  # how much of the library repeats its header structure (names, shapes, dtypes)
        keys = []
        for p in files:
            if p.endswith(".safetensors"):
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = split(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
                if got is not None and not any(x.startswith("unreadable") for x in rows_by_path[p].get("problems", [])):
                    keys.append(got[2])
        print(f"header structures: {len(set(keys))} distinct among {len(keys)} readable safetensors files "
              f"({len(keys) - len(set(keys))} files repeat one)")
    bad = check_rows(cold["rows"], kinds)
    print(f"rows checked against what was written: {len(cold['rows']) - len(bad)} right, {len(bad)} wrong")
    for b in bad[:10]:
        print("  WRONG:", b)


if __name__ == "__main__":
    main()

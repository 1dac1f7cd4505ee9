"""Benchmark: LoRA extraction on a full-size SD1.5 UNet, against a plain per-module SVD.

Not a test. Builds every Linear/conv module of the SD1.5 UNet from the shipped config
(``lora_ext/configs/sd1_unet.json``, 282 modules, 859M weights) with random weights, makes a
"tuned" twin ``base + random low-rank change + noise`` (both rounded to fp16, as checkpoints
are), and times, on the same deltas in the same process:

* ours: ``lora_ext.tools.svd.factorize`` (what ``lora-ext extract`` runs per module:
  randomized range finder with power iterations for large modules, exact SVD for small ones);
* baseline: ``torch.linalg.svd(D, full_matrices=False)`` per module, then truncation, the way
  extraction scripts usually do it. By default the baseline gets the tall orientation
  (LAPACK is several times faster on ``D.T`` for wide conv matrices), so the ratio is against
  the faster of the two plain calls; ``--baseline plain`` times ``D`` as it is.

A full SVD of every module would take far longer than the rest of the run, so the baseline is
timed on one module of each distinct shape (36 shapes), back to back with ours on the same
delta (order alternating, so a busy moment on shared cores hits both), and both are scaled by
how many modules have that shape; ours is also timed on every module (``--baseline-all``
times the baseline on every module too). Accuracy is reported on the paired modules: the
rank-R error of ours against the optimal rank-R error (Eckart-Young) from the full SVD.

    python benchmarks/extract.py                  # 2 threads, rank 64, all 282 modules
    python benchmarks/extract.py --modules 60     # a quicker subset (every k-th module)
    python benchmarks/extract.py --end-to-end /tmp/bench   # also run `extract` on real files
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_ext import arch  # noqa: E402
from lora_ext.tools.svd import factorize  # noqa: E402


def modules(limit: int):
    table = arch.module_table("sd1", "unet")
    mods = [(p, i) for p, i in table.items() if i.kind in ("linear", "conv")]
    if limit and limit < len(mods):
        step = len(mods) / limit
        mods = [mods[int(i * step)] for i in range(limit)]
    return mods


def make_pair(shape, true_rank: int, noise: float, g: torch.Generator):
    """(base, tuned) fp16: base ~ N(0, 1/fan_in); tuned = base + low-rank change + noise."""
    m, n = shape[0], math.prod(shape[1:])
    base = torch.randn(m, n, generator=g) / math.sqrt(n)
    up = torch.randn(m, true_rank, generator=g)
    down = torch.randn(true_rank, n, generator=g)
    change = up @ down
    change *= 0.05 * float(base.norm() / change.norm())  # a 5% change of the weight
    tuned = base + change + noise * torch.randn(m, n, generator=g) / math.sqrt(n)
    return base.half(), tuned.half()


def baseline(d: torch.Tensor, rank: int, tall: bool):
    if tall and d.shape[0] < d.shape[1]:
        u, s, vh = torch.linalg.svd(d.T, full_matrices=False)
        u, vh = vh.T, u.T
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, s.numel())
    return u[:, :k] * s[:k], vh[:k], s


def _time_baseline(d, args):
    t0 = time.perf_counter()
    _, _, s = baseline(d, args.rank, args.baseline == "tall")
    return time.perf_counter() - t0, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--true-rank", type=int, default=16, help="rank of the synthetic fine-tune change")
    ap.add_argument("--noise", type=float, default=0.002, help="full-rank noise, relative to the weight scale")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modules", type=int, default=0, help="use about this many modules (0: all 282)")
    ap.add_argument("--baseline", choices=("tall", "plain"), default="tall")
    ap.add_argument("--baseline-all", action="store_true", help="time the baseline on every module, not once per shape")
    ap.add_argument("--end-to-end", metavar="DIR", help="also write fp16 base/tuned UNet files there and time `extract`")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mods = modules(args.modules)
    counts = Counter((i.weight_shape[0], math.prod(i.weight_shape[1:])) for _, i in mods)
    print(f"SD1.5 UNet layout: {len(mods)} Linear/conv modules, {len(counts)} distinct shapes, "
          f"{sum(math.prod(i.weight_shape) for _, i in mods) / 1e6:.0f}M weights; rank {args.rank}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(args.seed)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ours_total, gen_time = 0.0, 0.0
    paired = {}  # shape -> (ours s, baseline s, our error / optimal, |energy diff|, method), on one module
    base_all = defaultdict(list)
    for idx, (path, info) in enumerate(mods):
        t0 = time.perf_counter()
        b, t = make_pair(info.weight_shape, args.true_rank, args.noise, g)
        d = (t.float() - b.float()).reshape(info.weight_shape[0], -1)
        del b, t
        gen_time += time.perf_counter() - t0
        shape = tuple(d.shape)
        timed_base = args.baseline_all or shape not in paired
        if timed_base and len(paired) % 2:  # alternate the order, so a busy moment hits both sides
            tb, s = _time_baseline(d, args)
            base_all[shape].append(tb)
        t0 = time.perf_counter()
        f = factorize(d, args.rank)
        dt = time.perf_counter() - t0
        ours_total += dt
        if timed_base and not (len(paired) % 2):
            tb, s = _time_baseline(d, args)
            base_all[shape].append(tb)
        if shape not in paired:
            total = f.total  # ||D||^2, the same for both
            k = min(args.rank, s.numel())
            opt_err = math.sqrt(max(0.0, 1 - float((s[:k].double() ** 2).sum()) / total))
            paired[shape] = (dt, tb, f.rel_error / opt_err if opt_err else 1.0, abs(f.energy - (1 - opt_err ** 2)), f.method)
        if (idx + 1) % 40 == 0 or idx + 1 == len(mods):
            print(f"  {idx + 1}/{len(mods)} modules, ours {ours_total:.1f}s so far", flush=True)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"{'shape':>16} {'count':>5} {'ours s':>8} {'svd s':>8} {'ratio':>7} {'err/opt':>8}  method   (one module per shape, timed back to back)")
    for sh in sorted(counts, key=lambda x: -x[0] * x[1]):
        o, bt, ratio_err, _, method = paired[sh]
        print(f"{str(sh):>16} {counts[sh]:>5} {o:8.3f} {bt:8.3f} {bt / o:6.1f}x {ratio_err:8.4f}  {method}")
    # count-weighted totals from the paired timings, and the baseline scaled to every module
    est_ours = sum(paired[sh][0] * counts[sh] for sh in counts)
    est_base = sum(sum(v) / len(v) * counts[sh] for sh, v in base_all.items())
    errs = [p[2] for p in paired.values()]
    print()
    print(f"load average {load0:.1f} at the start, {load1:.1f} at the end (other processes share these cores)")
    print(f"data generation (not timed): {gen_time:.1f}s")
    print(f"ours, measured on all {len(mods)} modules:                 {ours_total:8.1f}s")
    print(f"ours, paired per-shape timings x module counts:      {est_ours:8.1f}s")
    how = "every module" if args.baseline_all else "paired per-shape timings x module counts"
    print(f"baseline torch.linalg.svd ({args.baseline}), {how}: {est_base:8.1f}s")
    print(f"speed-up: {est_base / est_ours:.1f}x paired, {est_base / ours_total:.1f}x against the full run of ours")
    print(f"accuracy: rank-{args.rank} error / optimal (Eckart-Young) error: mean {sum(errs) / len(errs):.4f}, "
          f"worst {max(errs):.4f}; max |energy - optimal energy| {max(p[3] for p in paired.values()):.2e}")
    if args.end_to_end:
        end_to_end(args, mods)
    return 0


def end_to_end(args, mods) -> None:
    """Write UNet-only fp16 single files (about 1.7 GB each) and time `lora_ext.tools.extract`."""
    from lora_ext.io import save_safetensors
    from lora_ext.tools import extract

    os.makedirs(args.end_to_end, exist_ok=True)
    base_p = os.path.join(args.end_to_end, "base.safetensors")
    tuned_p = os.path.join(args.end_to_end, "tuned.safetensors")
    out = os.path.join(args.end_to_end, f"extracted_r{args.rank}.safetensors")
    if os.path.exists(out):
        os.remove(out)
    if not (os.path.exists(base_p) and os.path.exists(tuned_p)):
        g = torch.Generator().manual_seed(args.seed)
        bsd, tsd = {}, {}
        table = arch.module_table("sd1", "unet")
        for path, info in table.items():
            if info.ldm_weight is None:
                continue
            if info.kind in ("linear", "conv"):
                b, t = make_pair(info.weight_shape, args.true_rank, args.noise, g)
                bsd[info.ldm_weight], tsd[info.ldm_weight] = b.reshape(info.weight_shape), t.reshape(info.weight_shape)
            else:
                bsd[info.ldm_weight] = tsd[info.ldm_weight] = torch.ones(info.weight_shape, dtype=torch.float16)
            if info.ldm_bias:
                bsd[info.ldm_bias] = tsd[info.ldm_bias] = torch.zeros(info.bias_shape, dtype=torch.float16)
        save_safetensors(base_p, bsd)
        save_safetensors(tuned_p, tsd)
        del bsd, tsd
    t0 = time.perf_counter()
    report = extract(base_p, tuned_p, out, rank=args.rank, dtype="fp16", progress=True)
    dt = time.perf_counter() - t0
    print(f"end to end: `extract` on two fp16 SD1.5 UNet files, rank {args.rank}: {dt:.1f}s "
          f"({report.count('extracted')} modules, explains {100 * report.values['explained']:.3f}% of the difference, "
          f"{os.path.getsize(out) / 2**20:.0f} MiB written)")


if __name__ == "__main__":
    sys.exit(main())

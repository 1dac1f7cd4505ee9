"""Benchmark: lora-ext's apply engine vs diffusers' own LoRA path, on a full-size SD1.5 UNet.

Not a test: run it by hand (CPU, 3-5 minutes on 2 quiet cores, ~8 GB of RAM)::

    python benchmarks/apply.py [--dtype fp16|bf16|fp32] [--threads N] [--rounds 2] [--steps 4]
                               [--latent 16] [--rank 32] [--skip-diffusers] [--skip-steps]

What it does, all in one process on the same UNet:

1. Builds the SD1.5 UNet from ``lora_ext/configs/sd1_unet.json`` with random weights (std
   0.5/sqrt(fan_in)) in ``--dtype`` (default fp16, the usual checkpoint dtype) and writes two
   rank-32 kohya LoRA files (fp16 factors, alpha 16) on every attention / feed-forward linear
   and proj_in / proj_out of the transformer blocks (the modules kohya's default LoRA trains),
   sized so that the weight change is ~5% of the weight.
2. lora-ext (``method="fuse"``): apply LoRA A, switch to B (``set``), remove; checks the
   restore is bit-exact and reports the restore record as a fraction of the patched bytes.
   Phases 2 and 3 alternate for ``--rounds`` rounds; the best round of each is compared.
3. diffusers 0.42 on the same UNet: there is no pipeline (a bare UNet), so a minimal object
   with ``StableDiffusionLoraLoaderMixin`` holds it; that is exactly diffusers' own code path
   for a kohya file: ``load_lora_weights`` (kohya -> diffusers key conversion, PEFT layers
   injected into the UNet) + ``fuse_lora``; switch = ``unfuse_lora`` + ``unload_lora_weights``
   + ``load_lora_weights(B)`` + ``fuse_lora``; remove = ``unfuse_lora`` + ``unload_lora_weights``.
   Reports how far diffusers' restore (by subtraction) is from the original weights.
4. Per-step cost of a scheduled LoRA vs a constant one (the UNet in fp32, since CPU fp16
   convolutions are not representative): ``--steps`` forward passes at a small latent size
   (batch 2, 77 text tokens), ``update(step, total)`` before each, ``method="auto"``:
   the constant LoRA is fused; the scheduled one (a keyframe ramp, a new strength every step)
   goes where the auto rule puts it. The configurations are interleaved per round.

Peak memory is the process's peak RSS above its RSS before each phase (``/proc`` on Linux).
Times are wall clock and CPU time of the process (on a machine shared with other work, CPU
time with ``--threads 1`` is the steadier comparison).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_ext  # noqa: E402
from lora_ext.spec import Keyframes, LoraSpec  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --- memory ---------------------------------------------------------------------------------------
def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Phase:
    """Wall time and peak RSS above the starting RSS of a block of code."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak-RSS counter to the current RSS
            self.can_peak = True
        except OSError:
            self.can_peak = False
        self.rss0 = _status("VmRSS")
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.peak = max(0, _status("VmHWM") - self.rss0) if self.can_peak else float("nan")
        return False


def mb(n) -> str:
    return "n/a" if isinstance(n, float) and math.isnan(n) else f"{n / 2**20:,.0f} MB"


# --- model and LoRA files ------------------------------------------------------------------------
def build_unet(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with open(os.path.join(os.path.dirname(lora_ext.__file__), "configs", "sd1_unet.json")) as fh:
        config = json.load(fh)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu").to(dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight"):  # norms
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    for _, buf in unet.named_buffers():
        if buf.is_floating_point():  # none in SD1.5's UNet; kept for safety
            buf.zero_()
    return unet


def lora_modules(unet) -> list:
    """Attention q/k/v/out, feed-forward and proj_in/proj_out of every transformer block."""
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    return [n for n, m in unet.named_modules()
            if ".attentions." in n and n.endswith(leaves) and hasattr(m, "weight")]


def write_kohya_lora(path, unet, modules, *, rank=32, alpha=16.0, seed=1, rel=0.05):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in modules:
        w = unet.get_submodule(name).weight
        out, inn = w.shape[0], w[0].numel()
        sigma_w = 0.5 / math.sqrt(inn)
        sigma_d = 1 / math.sqrt(inn)
        # delta std = (alpha / rank) * sqrt(rank) * sigma_u * sigma_d = rel * sigma_w
        sigma_u = rel * sigma_w / ((alpha / rank) * math.sqrt(rank) * sigma_d)
        kk = (1, 1) if w.dim() == 4 else ()
        prefix = "lora_unet_" + name.replace(".", "_")
        sd[f"{prefix}.lora_down.weight"] = (torch.randn(rank, inn, *kk, generator=g) * sigma_d).half()
        sd[f"{prefix}.lora_up.weight"] = (torch.randn(out, rank, *kk, generator=g) * sigma_u).half()
        sd[f"{prefix}.alpha"] = torch.tensor(alpha).half()
    save_file(sd, path, metadata={"ss_network_module": "networks.lora"})
    return path


def snapshot(unet, modules):
    return {n: unet.get_submodule(n).weight.detach().clone() for n in modules}


def compare(unet, snap):
    """(tensors differing, elements differing, max |difference|) against the snapshot."""
    tensors = elements = 0
    worst = 0.0
    for n, w0 in snap.items():
        w = unet.get_submodule(n).weight.detach()
        ne = w.view(torch.int16 if w.element_size() == 2 else torch.int32) != w0.view(
            torch.int16 if w0.element_size() == 2 else torch.int32)
        k = int(ne.sum())
        if k:
            tensors += 1
            elements += k
            worst = max(worst, float((w.float() - w0.float()).abs().max()))
    return tensors, elements, worst


# --- diffusers -----------------------------------------------------------------------------------
def diffusers_holder(unet):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class UNetOnly(StableDiffusionLoraLoaderMixin):
        """What a StableDiffusionPipeline contributes to its LoRA mixin, for a bare UNet."""

        _lora_loadable_modules = ["unet", "text_encoder"]
        hf_device_map = None

        def __init__(self, unet):
            self.unet = unet
            self.text_encoder = None

        @property
        def components(self):
            return {"unet": self.unet}

    return UNetOnly(unet)


def quiet_diffusers():
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


# --- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="UNet dtype for apply/switch/remove")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed forward passes per per-step configuration")
    ap.add_argument("--latent", type=int, default=16, help="latent size of the per-step forwards (16 = 128 px)")
    ap.add_argument("--rounds", type=int, default=2, help="apply/switch/remove rounds per engine (best is shown)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default; 1 gives steadier numbers on a busy machine)")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--all-methods", action="store_true", help="also time a forced re-fuse on every step")
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args(argv)
    quiet_diffusers()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet dtype {args.dtype}")

    t = time.perf_counter()
    unet = build_unet(dtype)
    mods = lora_modules(unet)
    n_params = sum(p.numel() for p in unet.parameters())
    patched = sum(unet.get_submodule(n).weight.numel() for n in mods)
    print(f"SD1.5 UNet: {n_params / 1e6:.0f}M parameters, built in {time.perf_counter() - t:.1f}s; "
          f"LoRA on {len(mods)} modules ({patched / 1e6:.0f}M weights)")
    tmp = tempfile.mkdtemp(prefix="lora_ext_bench_")
    path_a = write_kohya_lora(os.path.join(tmp, "a.safetensors"), unet, mods, rank=args.rank, seed=1)
    path_b = write_kohya_lora(os.path.join(tmp, "b.safetensors"), unet, mods, rank=args.rank, seed=2)
    print(f"LoRA files: rank {args.rank}, {os.path.getsize(path_a) / 2**20:.0f} MB each (fp16)")
    snap = snapshot(unet, mods)

    # --- apply / switch / remove: both engines, interleaved, best of --rounds ---------------------
    res = {}  # "ours apply" -> [Phase, ...]
    holder = None if args.skip_diffusers else diffusers_holder(unet)
    for rnd in range(args.rounds):
        with Phase("apply") as ph:
            h = lora_ext.apply(unet, [(path_a, 1.0)], method="fuse")
        res.setdefault("ours apply", []).append(ph)
        assert not h.unmatched, h.unmatched[:3]
        frac_a, schemes = h.restore_record_bytes / h.patched_bytes, dict(h.record_schemes)
        patched_bytes = h.patched_bytes
        with Phase("switch") as ph:
            h.set([(path_b, 1.0)])
        res.setdefault("ours switch", []).append(ph)
        frac_b = h.restore_record_bytes / h.patched_bytes
        with Phase("remove") as ph:
            h.remove()
        res.setdefault("ours remove", []).append(ph)
        ours_diff = compare(unet, snap)
        assert ours_diff[0] == 0, "lora-ext's restore was not bit-exact"
        del h  # the next round reads and parses the files again, as diffusers does
        if holder is None:
            continue
        with Phase("apply") as ph:
            holder.load_lora_weights(path_a, adapter_name=f"a{rnd}")
            holder.fuse_lora(components=["unet"], lora_scale=1.0)
        res.setdefault("diffusers apply", []).append(ph)
        with Phase("switch") as ph:
            holder.unfuse_lora(components=["unet"])
            holder.unload_lora_weights()
            holder.load_lora_weights(path_b, adapter_name=f"b{rnd}")
            holder.fuse_lora(components=["unet"], lora_scale=1.0)
        res.setdefault("diffusers switch", []).append(ph)
        with Phase("remove") as ph:
            holder.unfuse_lora(components=["unet"])
            holder.unload_lora_weights()
        res.setdefault("diffusers remove", []).append(ph)
        diff_diff = compare(unet, snap)
        with torch.no_grad():  # diffusers' restore drifted: put the originals back for the next round
            for n, w0 in snap.items():
                unet.get_submodule(n).weight.copy_(w0)

    def best(key):
        return min(p.seconds for p in res[key])

    def best_cpu(key):
        return min(p.cpu for p in res[key])

    def peak(key):
        return max(p.peak for p in res[key])

    def times(key):
        return ", ".join(f"{p.seconds:.2f}" for p in res[key])

    print(f"\nlora-ext (fuse), best of {args.rounds}: apply {best('ours apply'):.2f}s, "
          f"switch {best('ours switch'):.2f}s, remove {best('ours remove'):.2f}s")
    print(f"  all rounds: apply [{times('ours apply')}], switch [{times('ours switch')}], "
          f"remove [{times('ours remove')}]")
    print(f"  restore record: {frac_a:.1%} of the patched weights' bytes after apply, {frac_b:.1%} after the "
          f"switch ({mb(patched_bytes)} patched); schemes {schemes}")
    print(f"  after remove: {ours_diff[0]} tensors / {ours_diff[1]} elements differ from the original (bit-exact)")
    print(f"  peak RSS above start: apply {mb(peak('ours apply'))}, switch {mb(peak('ours switch'))}, "
          f"remove {mb(peak('ours remove'))}")
    if holder is not None:
        print(f"\ndiffusers (load_lora_weights + fuse_lora), best of {args.rounds}: apply "
              f"{best('diffusers apply'):.2f}s, switch {best('diffusers switch'):.2f}s, "
              f"remove {best('diffusers remove'):.2f}s")
        print(f"  all rounds: apply [{times('diffusers apply')}], switch [{times('diffusers switch')}], "
              f"remove [{times('diffusers remove')}]")
        print(f"  after remove: {diff_diff[0]} tensors / {diff_diff[1]} elements differ from the original, "
              f"max |diff| {diff_diff[2]:.3g} (restore by subtraction)")
        print(f"  peak RSS above start: apply {mb(peak('diffusers apply'))}, "
              f"switch {mb(peak('diffusers switch'))}, remove {mb(peak('diffusers remove'))}")
        print("\nspeed-up of lora-ext over diffusers, best times (target >= 2x for apply and switch):")
        for what in ("apply", "switch", "remove"):
            a_, b_ = best(f"ours {what}"), best(f"diffusers {what}")
            ac, bc = best_cpu(f"ours {what}"), best_cpu(f"diffusers {what}")
            print(f"  {what:7s} wall {b_ / a_:5.2f}x ({a_:.2f}s vs {b_:.2f}s)   "
                  f"CPU time {bc / ac:5.2f}x ({ac:.2f}s vs {bc:.2f}s)")
        del holder
    del snap
    gc.collect()

    # --- per-step cost of a scheduled LoRA vs a constant one ---------------------------------
    if not args.skip_steps:
        unet = unet.float()
        g = torch.Generator().manual_seed(3)
        lat = args.latent
        sample = torch.randn(2, 4, lat, lat, generator=g)
        ctx = torch.randn(2, 77, 768, generator=g)
        n = args.steps

        def run(specs, method="auto"):
            handle = lora_ext.apply(unet, specs, method=method) if specs else None
            times = []
            with torch.no_grad():
                for step in range(n + 1):  # one warm-up step, not timed
                    t0 = time.perf_counter()
                    if handle is not None:
                        handle.update(step, n + 1)
                    unet(sample, torch.tensor([999 - step * 50] * 2), encoder_hidden_states=ctx)
                    if step:
                        times.append(time.perf_counter() - t0)
            placement = dict(handle.placement) if handle else {}
            reasons = dict(handle.placement_reasons) if handle else {}
            if handle is not None:
                handle.remove()
            return sum(times) / len(times), placement, reasons

        const = LoraSpec("const", path=path_a, unet=0.8)
        ramp = LoraSpec("ramp", path=path_a, unet=Keyframes(((0.0, 0), (1.0, 1.0))))
        configs = [("no LoRA", [], "auto"), ("constant LoRA, auto", [const], "auto"),
                   ("scheduled LoRA, auto", [ramp], "auto"), ("scheduled LoRA, on-the-fly forced", [ramp], "onthefly")]
        if args.all_methods:
            configs.append(("scheduled LoRA, re-fuse forced", [ramp], "fuse"))
        runs = {name: [] for name, _, _ in configs}
        info = {}
        for _ in range(args.rounds):  # configurations interleaved, so a busy machine hits them alike
            for name, specs, method in configs:
                sec, placement, reasons = run(specs, method)
                runs[name].append(sec)
                info[name] = (placement, reasons)
        print(f"\nper step (fp32 UNet, latent {lat}x{lat}, batch 2, 77 tokens, {n} steps after a warm-up, "
              f"update() before every forward; best of {args.rounds} interleaved rounds):")
        for name, _, _ in configs:
            placement, reasons = info[name]
            where = f" -> {', '.join(f'{k}: {v}' for k, v in placement.items())}" if placement else ""
            print(f"  {name:36s} {min(runs[name]):7.3f}s/step   all [{', '.join(f'{x:.3f}' for x in runs[name])}]"
                  f"{where}")
        why = info["scheduled LoRA, auto"][1].get("ramp", "")
        print(f"  auto's reason for the scheduled LoRA: {why}")
        ratio = min(runs["scheduled LoRA, auto"]) / min(runs["constant LoRA, auto"])
        print(f"  scheduled / constant = {ratio:.3f}x (target <= 1.15x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

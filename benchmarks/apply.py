"""Benchmark: lora-ext's apply engine vs diffusers' own LoRA path, on a full-size SD1.5 (or SDXL) UNet.

Not a test: run it by hand (CPU; SD1.5, fp16 and bf16, 1 and 2 threads, 5 rounds: ~10-15
minutes on 2 shared cores, ~6 GB of RAM; SDXL: ~3x the time, ~16 GB)::

    python benchmarks/apply.py [--model sd15|sdxl] [--dtype fp16 bf16 ...] [--threads 1 2]
                               [--rounds 5] [--rank 32] [--skip-diffusers] [--steps 4] [--skip-steps]
                               [--profile]

What it does, all in one process on the same UNet:

1. Builds the UNet from ``lora_ext/configs/{sd1,sdxl}_unet.json`` with random weights (std
   0.5/sqrt(fan_in)) in each ``--dtype`` and writes two rank-32 kohya LoRA files (fp16
   factors, alpha 16) on every attention / feed-forward linear and proj_in / proj_out of the
   transformer blocks (the modules kohya's default LoRA trains: 192 on SD1.5), sized so that
   the weight change is ~5% of the weight.
2. lora-ext (``method="fuse"``, default settings): apply LoRA A (timed until ``apply``
   returns; then until the background worker has compacted the restore record,
   ``wait_records()``), switch to B (``set``, from the steady state: compact records;
   timed the same two ways), remove (bit-exactness checked every round). These apply and
   switch figures are for files already loaded (``engine.lora_cache`` keeps loaded files
   between applies, as a host re-applying the same LoRA each generation has them; the
   benchmark counts the files read and shows 0). Each round also times the first apply and
   switch of a file (the cache emptied first: the file read from disk and checked, as
   diffusers' ``load_lora_weights`` always does): "apply file" / "switch file". Reported: the
   steady-state record as a share of the patched bytes, the transient peak memory above
   the model in units of the patched bytes (peak RSS above the RSS before the phase, over
   apply + compaction; and the engine's own count of plain-copy bytes), records built
   synchronously because the bound was reached.
3. diffusers 0.42 on the same UNet, rounds interleaved with lora-ext's: there is no pipeline
   (a bare UNet), so a minimal object with ``StableDiffusion(XL)LoraLoaderMixin`` holds it;
   that is diffusers' own code path for a kohya file: ``load_lora_weights`` (kohya -> diffusers
   key conversion, PEFT layers injected) + ``fuse_lora``; switch = ``unfuse_lora`` +
   ``unload_lora_weights`` + ``load_lora_weights(B)`` + ``fuse_lora``; remove = ``unfuse_lora`` +
   ``unload_lora_weights``. Reports how far diffusers' restore (by subtraction) is from the
   original weights.
4. Medians (and all rounds) for each dtype and thread count, after ``--warmup`` untimed rounds
   of both engines; speed-ups = diffusers' median / lora-ext's median, wall and CPU time, with
   the load average before and after. The very first apply of the process (fresh pages for the
   plain copies) is reported on its own, with its peak RSS.
5. ``--steps``: per-step cost of a scheduled LoRA vs a constant one (fp32 UNet, small latent),
   as before; ``--skip-steps`` leaves it out. ``--profile``: cProfile of one apply and one
   switch (where the time goes).

Peak memory is the process's peak RSS above its RSS before each phase (``/proc`` on Linux).
RSS counts the engine's spare plain-copy mappings (lazily freed: the kernel takes them when it
needs memory) and the C heap's free memory, so an extra untimed round after the timed ones
also samples *held* memory (RSS less lazily freed pages, ``/proc/self/smaps_rollup``) through an
apply and a switch, with the LoRA files already loaded and the spares released first.
Times are wall clock and CPU time of the process (which includes the background worker's).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
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


def held_bytes():
    """Resident bytes the process holds: RSS less the lazily freed (``MADV_FREE``) pages the
    kernel may take back at any time (the engine's spare plain-copy mappings); None off Linux."""
    try:
        rss = lazy = None
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("LazyFree:"):
                    lazy = int(line.split()[1]) * 1024
        return None if rss is None else rss - (lazy or 0)
    except OSError:
        return None


class HeldSampler:
    """Peak of ``held_bytes()``, sampled every ``interval`` s in a thread (reading smaps walks the
    page tables and slows page faults down: used only in the untimed memory round)."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            h = held_bytes()
            if h is not None and h > self.peak:
                self.peak = h
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self.peak = held_bytes() or 0

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _trim_heap() -> None:
    """Give the C heap's free memory back (glibc ``malloc_trim``), so a phase starts as fresh as
    a new process would."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mb(n) -> str:
    return "n/a" if isinstance(n, float) and math.isnan(n) else f"{n / 2**20:,.0f} MB"


# --- model and LoRA files ------------------------------------------------------------------------
def build_unet(dtype: torch.dtype, model: str = "sd15"):
    from diffusers import UNet2DConditionModel

    cfg = {"sd15": "sd1_unet.json", "sdxl": "sdxl_unet.json"}[model]
    with open(os.path.join(os.path.dirname(lora_ext.__file__), "configs", cfg)) as fh:
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
def diffusers_holder(unet, model="sd15"):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    base = StableDiffusionXLLoraLoaderMixin if model == "sdxl" else StableDiffusionLoraLoaderMixin

    class UNetOnly(base):
        """What a StableDiffusionPipeline contributes to its LoRA mixin, for a bare UNet."""

        _lora_loadable_modules = ["unet", "text_encoder"] + (["text_encoder_2"] if model == "sdxl" else [])
        hf_device_map = None

        def __init__(self, unet):
            self.unet = unet
            self.text_encoder = None
            self.text_encoder_2 = None

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
class Clock:
    """Wall and CPU time and peak RSS from a start point, read at several marks."""

    def __init__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak-RSS counter to the current RSS
            self.can_peak = True
        except OSError:
            self.can_peak = False
        self.rss0 = _status("VmRSS")
        self.f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def mark(self) -> tuple:
        """(seconds, CPU seconds, peak RSS above the start)."""
        peak = max(0, _status("VmHWM") - self.rss0) if self.can_peak else float("nan")
        return time.perf_counter() - self.t0, time.process_time() - self.c0, peak

    def faults(self) -> int:
        """Minor page faults since the start (fresh pages: on this VM ~3.5 us each)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.f0


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


_READS: list = []


def count_reads():
    """Count the LoRA files the engine reads (so the 'file read' and 'cached' figures are what
    they say)."""
    from lora_ext.engine import handle as handle_mod

    real = handle_mod.load_lora
    if getattr(real, "_counting", False):
        return

    def counting(path, *a, **kw):
        _READS.append(os.fspath(path))
        return real(path, *a, **kw)

    counting._counting = True
    handle_mod.load_lora = counting


def ours_file_round(unet, path_a, path_b, snap):
    """Apply and switch with the files read from disk (the first apply of a file: nothing in
    ``lora_cache``), then remove. Leaves both files in the cache for ``ours_round``."""
    from lora_ext.engine import lora_cache

    r = {}
    gc.collect()
    lora_cache.clear()
    n0 = len(_READS)
    c = Clock()
    h = lora_ext.apply(unet, [(path_a, 1.0)], method="fuse")
    r["apply file"], r["apply file cpu"], _ = c.mark()
    assert len(_READS) == n0 + 1, "the file was not read"
    h.wait_records()
    lora_cache.forget(os.path.abspath(path_b))
    c = Clock()
    h.set([(path_b, 1.0)])
    r["switch file"], r["switch file cpu"], _ = c.mark()
    assert len(_READS) == n0 + 2, "the file was not read"
    h.wait_records()
    h.remove()
    assert compare(unet, snap)[0] == 0, "lora-ext's restore was not bit-exact"
    return r


def ours_round(unet, path_a, path_b, snap, patched_bytes_expected):
    r = {}
    n0 = len(_READS)
    c = Clock()
    h = lora_ext.apply(unet, [(path_a, 1.0)], method="fuse")
    r["apply"], r["apply cpu"], _ = c.mark()
    r["apply faults"] = c.faults()
    assert not h.unmatched, h.unmatched[:3]
    assert h.patched_bytes == patched_bytes_expected, (h.patched_bytes, patched_bytes_expected)
    mem = h.record_memory()
    h.wait_records()
    r["apply+record"], r["apply+record cpu"], r["apply peak"] = c.mark()
    mem2 = h.record_memory()
    assert not mem2["faults"], mem2["faults"]
    r["engine peak apply"] = mem2["peak_plain_bytes"] + 0.0
    r["sync records apply"] = mem2["records_sync"]
    r["plain after apply"] = mem["plain_bytes"]
    r["frac apply"] = h.restore_record_bytes / h.patched_bytes
    r["schemes"] = dict(h.record_schemes)
    c = Clock()
    h.set([(path_b, 1.0)])
    r["switch"], r["switch cpu"], _ = c.mark()
    r["switch faults"] = c.faults()
    h.wait_records()
    r["switch+record"], r["switch+record cpu"], r["switch peak"] = c.mark()
    r["frac switch"] = h.restore_record_bytes / h.patched_bytes
    r["engine peak switch"] = h.record_memory()["peak_plain_bytes"] + 0.0
    c = Clock()
    h.remove()
    r["remove"], r["remove cpu"], r["remove peak"] = c.mark()
    r["diff"] = compare(unet, snap)
    assert r["diff"][0] == 0, "lora-ext's restore was not bit-exact"
    r["reads"] = len(_READS) - n0
    return r


def memory_round(unet, path_a, path_b, snap):
    """Untimed: the memory apply and switch hold, the LoRA files already loaded (so what is
    measured is the engine's own: plain copies, pass buffers, records). The spare plain-copy
    mappings are released and the heap trimmed first: the copies land in fresh memory, as in a
    new process. Returns peaks and steady states of ``held_bytes()`` above the start, or None."""
    from lora_ext.engine import release_spare_memory

    gc.collect()
    release_spare_memory()
    gc.collect()
    _trim_heap()
    base = held_bytes()
    if base is None:
        return None
    s = HeldSampler()
    try:
        h = lora_ext.apply(unet, [(path_a, 1.0)], method="fuse")
        h.wait_records()
        r = {"apply peak": s.peak - base, "apply plain": h.record_memory()["peak_plain_bytes"]}
        time.sleep(0.05)
        gc.collect()
        r["after apply"] = held_bytes() - base
        r["record"] = h.restore_record_bytes
        s.reset()
        base2 = held_bytes()
        h.set([(path_b, 1.0)])
        h.wait_records()
        r["switch peak"] = s.peak - base2
        gc.collect()
        r["after switch"] = held_bytes() - base2
        h.remove()
    finally:
        s.stop()
    assert compare(unet, snap)[0] == 0, "lora-ext's restore was not bit-exact"
    return r


def diffusers_round(holder, unet, path_a, path_b, snap, rnd):
    r = {}
    c = Clock()
    holder.load_lora_weights(path_a, adapter_name=f"a{rnd}")
    holder.fuse_lora(components=["unet"], lora_scale=1.0)
    r["apply"], r["apply cpu"], r["apply peak"] = c.mark()
    r["apply faults"] = c.faults()
    c = Clock()
    holder.unfuse_lora(components=["unet"])
    holder.unload_lora_weights()
    holder.load_lora_weights(path_b, adapter_name=f"b{rnd}")
    holder.fuse_lora(components=["unet"], lora_scale=1.0)
    r["switch"], r["switch cpu"], r["switch peak"] = c.mark()
    r["switch faults"] = c.faults()
    c = Clock()
    holder.unfuse_lora(components=["unet"])
    holder.unload_lora_weights()
    r["remove"], r["remove cpu"], r["remove peak"] = c.mark()
    r["diff"] = compare(unet, snap)
    with torch.no_grad():  # diffusers' restore drifted: put the originals back for the next round
        for n, w0 in snap.items():
            unet.get_submodule(n).weight.copy_(w0)
    return r


def profile_once(unet, path_a, path_b):
    """cProfile of one apply, one switch (from compact records) and one remove, main thread only."""
    import cProfile
    import pstats

    def prof(what, fn):
        pr = cProfile.Profile()
        pr.enable()
        out = fn()
        pr.disable()
        print(f"\n--- profile: lora-ext {what} (the caller's thread; the background worker not included) ---")
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        return out

    h = prof("apply", lambda: lora_ext.apply(unet, [(path_a, 1.0)], method="fuse"))
    h.wait_records()
    prof("switch", lambda: h.set([(path_b, 1.0)]))
    h.wait_records()
    prof("remove", h.remove)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp16", "bf16"],
                    help="UNet dtypes for apply/switch/remove")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed forward passes per per-step configuration")
    ap.add_argument("--latent", type=int, default=16, help="latent size of the per-step forwards (16 = 128 px)")
    ap.add_argument("--rounds", type=int, default=5, help="apply/switch/remove rounds per engine (median shown)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts to run")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds of both engines before each configuration's timed ones (first-touch "
                         "page faults, lazy imports); the first apply of the process is reported on its own")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--all-methods", action="store_true", help="also time a forced re-fuse on every step")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile one apply and one switch")
    args = ap.parse_args(argv)
    quiet_diffusers()
    count_reads()
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; load average {load()}; "
          f"{args.model} UNet, dtypes {args.dtype}, threads {args.threads}, {args.rounds} rounds")
    summary = []
    tmp = tempfile.mkdtemp(prefix="lora_ext_bench_")
    unet = None
    for dname in args.dtype:
        dtype = DTYPES[dname]
        unet = None
        gc.collect()
        t = time.perf_counter()
        unet = build_unet(dtype, args.model)
        mods = lora_modules(unet)
        n_params = sum(p.numel() for p in unet.parameters())
        patched = sum(unet.get_submodule(n).weight.numel() for n in mods)
        patched_bytes = sum(unet.get_submodule(n).weight.numel() * unet.get_submodule(n).weight.element_size()
                            for n in mods)
        print(f"\n=== {args.model} UNet {dname}: {n_params / 1e6:.0f}M parameters, built in "
              f"{time.perf_counter() - t:.1f}s; LoRA on {len(mods)} modules ({patched / 1e6:.0f}M weights, "
              f"{mb(patched_bytes)} patched)")
        path_a = os.path.join(tmp, f"a_{args.model}.safetensors")
        path_b = os.path.join(tmp, f"b_{args.model}.safetensors")
        if not os.path.exists(path_a):
            write_kohya_lora(path_a, unet, mods, rank=args.rank, seed=1)
            write_kohya_lora(path_b, unet, mods, rank=args.rank, seed=2)
            print(f"LoRA files: rank {args.rank}, {os.path.getsize(path_a) / 2**20:.0f} MB each (fp16)")
        snap = snapshot(unet, mods)
        holder = None if args.skip_diffusers else diffusers_holder(unet, args.model)
        cold = None
        for threads in args.threads:
            torch.set_num_threads(threads)
            load0 = load()
            ours, theirs = [], []
            for rnd in range(-args.warmup, args.rounds):  # interleaved, so a busy machine hits both alike
                if cold is not None:
                    rf = ours_file_round(unet, path_a, path_b, snap)
                r = ours_round(unet, path_a, path_b, snap, patched_bytes)
                if cold is not None:
                    r.update(rf)
                if cold is None:  # the first apply of the process: fresh pages, nothing reused yet
                    cold = r
                if rnd >= 0:
                    ours.append(r)
                if holder is not None:
                    r = diffusers_round(holder, unet, path_a, path_b, snap, f"{dname}{threads}{rnd}")
                    if rnd >= 0:
                        theirs.append(r)
            load1 = load()
            memr = memory_round(unet, path_a, path_b, snap) if threads == args.threads[0] else None

            def col(rs, key):
                return [x[key] for x in rs if key in x]

            def med(rs, key):
                return median(col(rs, key))

            def all_(rs, key):
                return ", ".join(f"{v:.2f}" for v in col(rs, key))

            print(f"\n--- {dname}, {threads} thread{'s' if threads > 1 else ''}, {args.rounds} rounds; load average "
                  f"before {load0}, after {load1} ---")
            print(f"lora-ext (fuse): median apply {med(ours, 'apply'):.2f}s (record complete after "
                  f"{med(ours, 'apply+record'):.2f}s), switch {med(ours, 'switch'):.2f}s (record complete after "
                  f"{med(ours, 'switch+record'):.2f}s), remove {med(ours, 'remove'):.2f}s")
            print(f"  (apply and switch of files already loaded: lora_cache, {max(col(ours, 'reads'))} files read in "
                  f"those rounds; the first apply/switch of a file, read from disk: apply "
                  f"{med(ours, 'apply file'):.2f}s, switch {med(ours, 'switch file'):.2f}s)")
            for key in ("apply", "apply+record", "switch", "switch+record", "remove", "apply file", "switch file"):
                print(f"  {key:14s} [{all_(ours, key)}] s   CPU [{all_(ours, key + ' cpu')}] s")
            r0 = ours[-1]
            print(f"  steady-state restore record: {r0['frac apply']:.1%} of the patched bytes after apply, "
                  f"{r0['frac switch']:.1%} after the switch; schemes {r0['schemes']}")
            print(f"  transient peak above the model (RSS, apply + compaction): median "
                  f"{med(ours, 'apply peak') / patched_bytes:.2f}x the patched bytes, max "
                  f"{max(col(ours, 'apply peak')) / patched_bytes:.2f}x; switch + compaction median "
                  f"{med(ours, 'switch peak') / patched_bytes:.2f}x; remove {med(ours, 'remove peak') / patched_bytes:.2f}x")
            if threads == args.threads[0]:
                print(f"  first apply on this model ({threads} thread(s), the first one of the process has fresh memory): apply {cold['apply']:.2f}s "
                      f"(CPU {cold['apply cpu']:.2f}s), record complete after {cold['apply+record']:.2f}s; peak RSS "
                      f"above the model over apply + compaction {cold['apply peak'] / patched_bytes:.2f}x the patched "
                      f"bytes ({mb(cold['apply peak'])}); later rounds reuse the freed pages")
            if memr is not None:
                print(f"  held memory (RSS less lazily freed pages; an extra untimed round with the LoRA files "
                      f"loaded, spare mappings released and the heap trimmed first): apply + compaction peak "
                      f"{memr['apply peak'] / patched_bytes:.2f}x the patched bytes above the model "
                      f"({mb(memr['apply peak'])}; plain copies {memr['apply plain'] / patched_bytes:.2f}x by the "
                      f"engine's count), after compaction {memr['after apply'] / patched_bytes:.2f}x (records "
                      f"{memr['record'] / patched_bytes:.2f}x); switch + compaction peak "
                      f"{memr['switch peak'] / patched_bytes:.2f}x above the state before it, after "
                      f"{memr['after switch'] / patched_bytes:+.2f}x")
            print(f"  plain copies held at most (engine's count): {max(col(ours, 'engine peak apply')) / patched_bytes:.2f}x "
                  f"the patched bytes; records built synchronously (bound reached): "
                  f"{max(col(ours, 'sync records apply'))}")
            print(f"  after remove: bit-identical in all {len(ours)} rounds")
            print(f"  minor page faults (median): apply {med(ours, 'apply faults'):.0f}, switch "
                  f"{med(ours, 'switch faults'):.0f} (the switch starts after the compaction of the apply "
                  f"has finished: wait_records())")
            row = {"dtype": dname, "threads": threads, "load": (load0, load1)}
            for k in ("apply", "switch", "remove", "apply+record", "switch+record", "apply file", "switch file"):
                row["ours " + k] = med(ours, k)
                row["ours cpu " + k] = med(ours, k + " cpu")
            row["frac"] = r0["frac switch"]
            row["peak"] = max(col(ours, "apply peak")) / patched_bytes
            if memr is not None:
                row["held"] = memr["apply peak"] / patched_bytes
                row["held switch"] = memr["switch peak"] / patched_bytes
            row["engine peak"] = max(col(ours, "engine peak apply")) / patched_bytes
            if holder is not None:
                print(f"diffusers (load_lora_weights + fuse_lora): median apply {med(theirs, 'apply'):.2f}s, "
                      f"switch {med(theirs, 'switch'):.2f}s, remove {med(theirs, 'remove'):.2f}s")
                for key in ("apply", "switch", "remove"):
                    print(f"  {key:14s} [{all_(theirs, key)}] s   CPU [{all_(theirs, key + ' cpu')}] s")
                d = theirs[-1]["diff"]
                drift = [x["diff"][1] for x in theirs]
                print(f"  after remove: {d[0]} tensors / {min(drift)}-{max(drift)} elements differ from the original, "
                      f"max |diff| {d[2]:.3g} (restore by subtraction)")
                print(f"  minor page faults (median): apply {med(theirs, 'apply faults'):.0f}, switch "
                      f"{med(theirs, 'switch faults'):.0f}")
                print(f"  peak RSS above start: apply median {med(theirs, 'apply peak') / patched_bytes:.2f}x the "
                      f"patched bytes ({mb(med(theirs, 'apply peak'))}), switch {mb(med(theirs, 'switch peak'))}")
                print("speed-up of lora-ext over diffusers, medians (target >= 2x for apply and switch):")
                for what in ("apply", "switch", "remove"):
                    a_, b_ = med(ours, what), med(theirs, what)
                    ac, bc = med(ours, what + " cpu"), med(theirs, what + " cpu")
                    row["x " + what] = b_ / a_
                    row["xcpu " + what] = bc / ac
                    print(f"  {what:7s} wall {b_ / a_:5.2f}x ({a_:.2f}s vs {b_:.2f}s)   "
                          f"CPU time {bc / ac:5.2f}x ({ac:.2f}s vs {bc:.2f}s)")
                for what in ("apply", "switch"):
                    a_, b_ = med(ours, what + " file"), med(theirs, what)
                    ac, bc = med(ours, what + " file cpu"), med(theirs, what + " cpu")
                    row["x file " + what] = b_ / a_
                    print(f"  {what} of a file not loaded before (read from disk, as diffusers always does): wall "
                          f"{b_ / a_:5.2f}x ({a_:.2f}s vs {b_:.2f}s)   CPU time {bc / ac:5.2f}x ({ac:.2f}s vs {bc:.2f}s)")
                for what in ("apply", "switch"):
                    a_, b_ = med(ours, what + "+record"), med(theirs, what)
                    print(f"  {what} until the compact record is complete: {b_ / a_:5.2f}x ({a_:.2f}s vs {b_:.2f}s)")
                row["theirs peak"] = med(theirs, "apply peak") / patched_bytes
            row["cold peak"] = cold["apply peak"] / patched_bytes
            summary.append(row)
        if args.profile:
            torch.set_num_threads(args.threads[0])
            profile_once(unet, path_a, path_b)
        del holder, snap
        gc.collect()

    if summary and "x apply" in summary[0]:
        print(f"\n=== summary ({args.model}, medians of {args.rounds}; ratios = diffusers / lora-ext) ===")
        print("| dtype | threads | apply (loaded file) | switch (loaded file) | apply (file read) | switch (file read) "
              "| remove | apply (s) | record done (s) | switch (s) | "
              "record done (s) | diffusers apply / switch (s) | record | plain copies | RSS peak (first apply) | "
              "held peak apply / switch | load avg |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in summary:
            print(f"| {r['dtype']} | {r['threads']} | {r['x apply']:.2f}x | {r['x switch']:.2f}x | "
                  f"{r['x file apply']:.2f}x ({r['ours apply file']:.2f}s) | {r['x file switch']:.2f}x "
                  f"({r['ours switch file']:.2f}s) | {r['x remove']:.2f}x | "
                  f"{r['ours apply']:.2f} | {r['ours apply+record']:.2f} | {r['ours switch']:.2f} | "
                  f"{r['ours switch+record']:.2f} | {r['ours apply'] * r['x apply']:.2f} / "
                  f"{r['ours switch'] * r['x switch']:.2f} | {r['frac']:.1%} | {r['engine peak']:.2f}x | "
                  f"{r['cold peak']:.2f}x | "
                  + (f"{r['held']:.2f}x / {r['held switch']:.2f}x" if "held" in r else "-")
                  + f" | {r['load'][0].split()[0]}-{r['load'][1].split()[0]} |")

    # --- per-step cost of a scheduled LoRA vs a constant one ---------------------------------
    if not args.skip_steps and unet is not None:
        path_a = os.path.join(tmp, f"a_{args.model}.safetensors")
        torch.set_num_threads(args.threads[0])
        unet = unet.float()
        g = torch.Generator().manual_seed(3)
        lat = args.latent
        sample = torch.randn(2, 4, lat, lat, generator=g)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        n = args.steps
        added = {}
        if args.model == "sdxl":
            added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, generator=g),
                                           "time_ids": torch.randn(2, 6, generator=g)}}

        def run(specs, method="auto"):
            handle = lora_ext.apply(unet, specs, method=method) if specs else None
            times = []
            with torch.no_grad():
                for step in range(n + 1):  # one warm-up step, not timed
                    t0 = time.perf_counter()
                    if handle is not None:
                        handle.update(step, n + 1)
                    unet(sample, torch.tensor([999 - step * 50] * 2), encoder_hidden_states=ctx, **added)
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
        for _ in range(min(args.rounds, 3)):  # configurations interleaved
            for name, specs, method in configs:
                sec, placement, reasons = run(specs, method)
                runs[name].append(sec)
                info[name] = (placement, reasons)
        print(f"\nper step (fp32 UNet, latent {lat}x{lat}, batch 2, 77 tokens, {n} steps after a warm-up, "
              f"update() before every forward; {args.threads[0]} thread(s); best of {min(args.rounds, 3)} rounds):")
        for name, _, _ in configs:
            placement, reasons = info[name]
            where = f" -> {', '.join(f'{k}: {v}' for k, v in placement.items())}" if placement else ""
            print(f"  {name:36s} {min(runs[name]):7.3f}s/step   all [{', '.join(f'{x:.3f}' for x in runs[name])}]"
                  f"{where}")
        why = info["scheduled LoRA, auto"][1].get("ramp", "")
        print(f"  auto's reason for the scheduled LoRA: {why}")
        ratio = min(runs["scheduled LoRA, auto"]) / min(runs["constant LoRA, auto"])
        print(f"  scheduled / constant = {ratio:.3f}x (target <= 1.15x)")
    print(f"\nload average at the end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

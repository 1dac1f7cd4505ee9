"""Seconds per step: ``lora_ext.sampler.generate`` against diffusers' StableDiffusionPipeline,
on the same model and settings, in the same process.

The model is full-size SD1.5 (UNet, CLIP-L text encoder, VAE from the shipped configs) with
seeded random weights (no download), at a small resolution (128x128 by default: 16x16
latents, 6 steps) so that it runs in a few minutes on 2 CPU cores. Both pipelines get the very same
module objects, Euler on the same timesteps, CFG 7 with a negative prompt, and stop at the
latents (no VAE decode), so the figures compare everything else: text encoding, CFG batching,
the sampler loop, LoRA handling.

Cases: no LoRA; a rank-16 LoRA on every attention projection of the UNet and text encoder at
constant strength (ours: applied by the engine through a kept session, so like diffusers'
``load_lora_weights`` it is applied once outside the timed runs; diffusers: PEFT layers, as
loaded and after ``fuse_lora()``); the same LoRA with a per-step schedule (``unet=0@0,1@1``:
ours moves it at every step; diffusers has no equivalent). The one-time apply + restore cost
is printed apart. Runs alternate between the pipelines and the best of ``--repeats`` is
reported (least disturbed by other load on the machine).

    python benchmarks/sampler.py [--size 128] [--steps 6] [--repeats 3] [--threads N] [--no-lora]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_ext.io import save_safetensors  # noqa: E402
from lora_ext.sampler import TrainingSchedule, generate  # noqa: E402
from lora_ext.sampler.loading import Model, _build, shipped_configs  # noqa: E402
from lora_ext.sampler.tokenizer import ClipTokenizer, TokenizerNotFound, find_vocabulary, load_tokenizer  # noqa: E402


def random_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Materialise a meta-built module with scaled random weights (bounded activations)."""
    g = torch.Generator().manual_seed(seed)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
    return module.eval().requires_grad_(False)


def tokenizer():
    """The real CLIP vocabulary if this machine has one, else the tiny test vocabulary (the
    text encoder still runs over all 77 positions, so the cost is the same)."""
    from transformers import CLIPTokenizer

    try:
        vocab = find_vocabulary(looked=[])
        ours = load_tokenizer(vocab)
        hf = ours.backend if ours.kind == "hf" else None
    except TokenizerNotFound:
        hf = None
    if hf is None:
        from lora_ext.sampler.tiny import tiny_vocab

        v, m = tiny_vocab()
        hf = CLIPTokenizer(vocab=v, merges=m)
    hf.model_max_length = 77
    conv = hf.convert_tokens_to_ids
    return hf, ClipTokenizer(hf, conv("<|startoftext|>"), conv("<|endoftext|>"), conv("<|endoftext|>"), "benchmark")


def write_lora(path: str, unet, te, rank: int = 16, seed: int = 1) -> int:
    """A kohya LoRA on every attention projection (q, k, v, out) of the UNet and text encoder."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model, strip in (("lora_unet_", unet, ""), ("lora_te_text_model_", te, "text_model.")):
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "out_proj") and not name.endswith("to_out.0"):
                continue
            name = name[len(strip):] if strip and name.startswith(strip) else name
            key = prefix + name.replace(".", "_")
            out_f, in_f = mod.weight.shape
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_safetensors(path, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return len(tensors) // 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-lora", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    t0 = time.time()
    configs = shipped_configs("sd1")
    unet = random_weights(_build("unet", configs["unet"]), 1)
    te = random_weights(_build("te1", configs["te1"]), 2)
    vae = random_weights(_build("vae", configs["vae"]), 3)
    hf_tok, our_tok = tokenizer()
    model = Model(unet=unet, vae=vae, text_encoders=[te], tokenizers=[our_tok],
                  schedule=TrainingSchedule.from_config(configs["scheduler"]), prediction="epsilon",
                  family="sd1", path="random-sd15", configs=configs)
    model._hash = "0000000000"
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="linspace", steps_offset=1)  # (unused by linspace)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=hf_tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    print(f"full-size SD1.5 (random weights) at {args.size}x{args.size}, {args.steps} Euler steps, CFG 7, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; built in {time.time() - t0:.1f} s")
    print("  figures: lora-ext vs diffusers (ratio), best of --repeats")

    prompt, negative = "a castle on a hill, ink wash", "blurry, lowres"
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
              output_type="latent")

    def run_diffusers():
        pipe(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(1), **kw)

    def run_ours(p=prompt, **extra):
        return generate(model, p, negative, sampler="euler", schedule="normal", steps=args.steps, cfg=7.0, seed=1,
                        width=args.size, height=args.size, decode=False, progress=False, log=None, **extra)

    in_unet = []  # CPU seconds inside UNet forwards during the current run

    def enter(mod, a, k):
        in_unet.append(-time.process_time())

    def leave(mod, a, k, out):
        in_unet[-1] += time.process_time()

    unet.register_forward_pre_hook(enter, with_kwargs=True)
    unet.register_forward_hook(leave, with_kwargs=True)

    def timed(fn):
        """(wall s/step, CPU s/step, CPU s per run outside the UNet). CPU time is the steadier
        figure when other work shares the machine; the time outside the UNet is what the two
        pipelines do differently (text encoding, CFG batching, the sampler, LoRA handling)."""
        in_unet.clear()
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpu = time.process_time() - c
        return ((time.perf_counter() - t) / args.steps, cpu / args.steps, cpu - sum(in_unet))

    def report(label, ours, theirs):
        def fmt(xs, i):
            return f"{min(x[i] for x in xs):6.3f}" if xs else "     -"

        def ratio(i):
            return f"{min(x[i] for x in ours) / min(x[i] for x in theirs):.3f}" if theirs else "    -"

        print(f"  {label:<38s} wall s/step {fmt(ours, 0)} vs {fmt(theirs, 0)} ({ratio(0)})   "
              f"CPU s/step {fmt(ours, 1)} vs {fmt(theirs, 1)} ({ratio(1)})   "
              f"outside UNet s/run {fmt(ours, 2)} vs {fmt(theirs, 2)}", flush=True)

    run_ours()  # warm-up (first-call allocations)
    run_diffusers()
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        ours.append(timed(run_ours))
        theirs.append(timed(run_diffusers))
    report("no LoRA", ours, theirs)
    if args.no_lora:
        return 0

    from lora_ext.resolve import LoraLibrary
    from lora_ext.session import HostModel, Session

    with tempfile.TemporaryDirectory() as d:
        n = write_lora(os.path.join(d, "bench.safetensors"), unet, te)
        print(f"  LoRA: rank 16 on {n} attention projections (UNet and text encoder)")
        lora_prompt = prompt + " <lora:bench:0.8>"
        scheduled = prompt + " <lora:bench:1:unet=0@0,1@1>"
        t = {"ours": [], "sched": [], "peft": [], "fused": []}
        one_time = []
        for _ in range(args.repeats):
            # ours: applied once by a kept session (as diffusers' load_lora_weights is done
            # once, outside the timing); the apply and the restore are timed apart
            for key, text in (("ours", lora_prompt), ("sched", scheduled)):
                session = Session(LoraLibrary([d]))
                c = time.process_time()
                session.load_model(HostModel(model.components(), naming="diffusers", family="sd1"))
                session.use_prompt(text, total_steps=args.steps)  # apply (what a run that changes LoRAs pays)
                applied = time.process_time() - c
                t[key].append(timed(lambda: run_ours(text, session=session, keep_loras=True)))
                c = time.process_time()
                session.close()  # bit-exact restore
                one_time.append((applied, time.process_time() - c))
            # diffusers' own LoRA path (PEFT), loaded only while diffusers runs
            pipe.load_lora_weights(d, weight_name="bench.safetensors", adapter_name="bench")
            pipe.set_adapters(["bench"], adapter_weights=[0.8])
            t["peft"].append(timed(run_diffusers))
            pipe.fuse_lora(lora_scale=1.0)  # the adapter weight 0.8 is already set
            t["fused"].append(timed(run_diffusers))
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        report("LoRA 0.8 (diffusers: PEFT layers)", t["ours"], t["peft"])
        report("LoRA 0.8 (diffusers: after fuse_lora)", t["ours"], t["fused"])
        report("LoRA, per-step schedule unet=0@0,1@1", t["sched"], None)
        apply_s, restore_s = min(a for a, _ in one_time), min(r for _, r in one_time)
        print(f"  once per change of LoRAs (CPU): apply {apply_s:.2f} s, bit-exact restore {restore_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

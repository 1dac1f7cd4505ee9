"""``generate`` end to end on tiny random pipelines written to disk in both layouts (A1111
single file with its configs in the metadata, and diffusers folder), offline.

Families: SD1-shaped, SD2-shaped with v-prediction (OpenCLIP key layout), SDXL-shaped (two text
encoders, pooled and size conditioning). Images are 16x16 pixels.
"""
import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from lora_ext.cli import SAMPLER_NAMES, SCHEDULE_NAMES, main
from lora_ext.io import file_sha256, save_safetensors, short_hash
from lora_ext.sampler import SAMPLERS, SCHEDULES, generate, load_model
from lora_ext.sampler import tokenizer as tokmod
from lora_ext.hookspecs import hookimpl
from lora_ext.sampler.png import parse_infotext, read_parameters
from lora_ext.sampler.tiny import SCHEDULER, save_diffusers, save_single_file, tiny_components, tiny_vocab
from tiny_models import one_thread_fixture

diffusers = pytest.importorskip("diffusers")

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
QUIET = dict(progress=False, log=None)


one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """family -> (components, diffusers folder, single file)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in FAMILIES:
        comps = tiny_components(fam, seed=1)
        folder = save_diffusers(str(root / f"{fam}-diffusers"), comps, fam, PREDICTION[fam])
        os.makedirs(root / f"{fam}-single")
        single = save_single_file(str(root / f"{fam}-single" / f"tiny-{fam}.safetensors"), comps, fam, PREDICTION[fam])
        out[fam] = (comps, folder, single)
    return out


@pytest.fixture(scope="module")
def models(store):
    return {(fam, kind): load_model(path) for fam, (_, folder, single) in store.items()
            for kind, path in (("diffusers", folder), ("single", single))}


def _state(module):
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_load_the_same_model(store, models, family):
    comps = store[family][0]
    for kind in ("diffusers", "single"):
        m = models[(family, kind)]
        assert m.prediction == PREDICTION[family]
        assert m.sdxl == (family == "sdxl") and len(m.text_encoders) == (2 if family == "sdxl" else 1)
        assert m.family == "custom"  # tiny: LoRAs bind by this model's own layout
        live = {"unet": m.unet, "vae": m.vae, **{f"te{i + 1}": te for i, te in enumerate(m.text_encoders)}}
        for comp, module in live.items():
            ref, got = _state(comps[comp]), _state(module)
            assert set(ref) == set(got), (kind, comp)
            assert all(torch.equal(ref[k], got[k]) for k in ref), (kind, comp)
    pads = [t.pad for t in models[(family, "single")].tokenizers]
    assert pads == {"sd1": [1], "sd2": [54], "sdxl": [1, 54]}[family]  # "!" is id 54 in the tiny vocab


def test_single_file_is_laid_out_like_a1111(store):
    from lora_ext.io import open_tensors

    with open_tensors(store["sd2"][2], kind="checkpoint") as tf:
        keys = set(tf.keys())
        configs = json.loads(tf.metadata["lora_ext.configs"])
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP, fused q/k/v
    assert "first_stage_model.decoder.up.1.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert configs["family"] == "sd2" and configs["scheduler"]["prediction_type"] == "v_prediction"
    with open_tensors(store["sdxl"][2], kind="checkpoint") as tf:
        assert "conditioner.embedders.1.model.text_projection" in tf
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in tf


def test_a_file_that_fits_no_config_says_so(tmp_path, store):
    comps = store["sd1"][0]
    from lora_ext.errors import LoraFileError
    from lora_ext.sampler.loading import write_single_file

    path = write_single_file(str(tmp_path / "bare.safetensors"), comps, "sd1", embed_configs=False)
    with pytest.raises(LoraFileError, match="does not fit the shipped full-size configs for SD1.x.*carry its configs"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# agreement with diffusers' own pipelines (DDIM: diffusers' SD default, exact in our terms)


def _diffusers_pipeline(family, comps):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=8)
    tok_bang = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=8, pad_token="!")
    sched = diffusers.DDIMScheduler(**{k: v for k, v in SCHEDULER.items() if not k.startswith("_")},
                                    timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                    clip_sample=False)
    sched.register_to_config(prediction_type=PREDICTION[family])
    if family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=comps["vae"], text_encoder=comps["te1"], text_encoder_2=comps["te2"], tokenizer=tok,
            tokenizer_2=tok_bang, unet=comps["unet"], scheduler=sched, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=comps["vae"], text_encoder=comps["te1"], tokenizer=tok_bang if family == "sd2" else tok,
            unet=comps["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img_matches_diffusers_pipeline(store, models, family):
    comps = store[family][0]
    pipe = _diffusers_pipeline(family, comps)
    ref = pipe("a cat", negative_prompt="a dog", num_inference_steps=8, guidance_scale=5.0, height=16, width=16,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    ours = generate(models[(family, "single")], "a cat", "a dog", sampler="ddim", steps=8, cfg=5, seed=7,
                    decode=False, **QUIET)
    assert ours.settings["schedule"] == "ddim_uniform"
    err = float((ours.latents - ref).abs().max())
    assert err < 1e-4, f"{family}: {err:.2e} (latents up to {float(ref.abs().max()):.2f})"


# ---------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img_both_layouts_and_reproducible(models, family, tmp_path):
    a = generate(models[(family, "diffusers")], "a cat", "", steps=5, seed=3, sampler="euler_a", **QUIET)
    b = generate(models[(family, "single")], "a cat", "", steps=5, seed=3, sampler="euler_a",
                 out=str(tmp_path / "x.png"), **QUIET)
    c = generate(models[(family, "single")], "a cat", "", steps=5, seed=3, sampler="euler_a", **QUIET)
    assert torch.equal(b.latents, c.latents) and torch.allclose(a.latents, b.latents, atol=1e-5)
    assert a.images[0].size == (16, 16) and os.path.isfile(b.paths[0])
    d = generate(models[(family, "single")], "a cat", "", steps=5, seed=4, sampler="euler_a", **QUIET)
    assert not torch.allclose(c.latents, d.latents)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde", "dpmpp_2m"])
def test_batch_image_i_equals_a_run_with_seed_plus_i(models, sampler):
    m = models[("sd1", "single")]
    batch = generate(m, "a dog", "a cat", steps=4, seed=100, batch=3, sampler=sampler, **QUIET)
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = generate(m, "a dog", "a cat", steps=4, seed=100 + i, sampler=sampler, **QUIET)
        # equal up to float rounding (a batch of 3 runs other kernels than a batch of 1), measured
        # against the latents' scale: the SDE sampler's noise amplifies it to ~3e-6 of that
        err = (batch.latents[i:i + 1] - single.latents).abs().max() / single.latents.abs().max()
        assert float(err) < 2e-5, (i, float(err))
        assert batch.infotexts[i] == single.infotexts[0]


def test_negative_prompt_and_cfg_one(models):
    m = models[("sd1", "single")]
    calls = []
    hook = m.unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        a = generate(m, "a cat", "a dog", steps=3, seed=1, cfg=4, sampler="euler", **QUIET)
        assert calls == [2, 2, 2]  # cond and uncond as one batch
        b = generate(m, "a cat", "", steps=3, seed=1, cfg=4, sampler="euler", **QUIET)
        assert not torch.allclose(a.latents, b.latents)
        calls.clear()
        c = generate(m, "a cat", "a dog", steps=3, seed=1, cfg=1, sampler="euler", **QUIET)
        d = generate(m, "a cat", "zzz", steps=3, seed=1, cfg=1, sampler="euler", **QUIET)
        assert calls == [1] * 6  # no uncond pass at CFG 1
        assert torch.equal(c.latents, d.latents)
    finally:
        hook.remove()


def test_long_prompts_are_chunked(models):
    m = models[("sd1", "single")]
    from lora_ext.sampler.text import encode_prompt

    cond = encode_prompt(m, "a cat a dog a cat a dog")  # 8 tokens > the tiny window of 6
    assert cond.context.shape[1] == 16
    r = generate(m, "a cat a dog a cat a dog", "dog", steps=2, seed=1, sampler="euler", decode=False, **QUIET)
    assert torch.isfinite(r.latents).all()


def test_img2img(models, tmp_path):
    m = models[("sd1", "single")]
    first = generate(m, "a cat", "", steps=4, seed=9, sampler="euler", out=str(tmp_path / "init.png"), **QUIET)
    steps_run = []

    class Count:  # any plugin on the session sees the seam's calls
        @hookimpl
        def lora_ext_step_begins(self, step, total_steps):
            steps_run.append((step, total_steps))

    a = generate(m, "a dog", "", steps=10, seed=5, sampler="euler", init_image=first.paths[0], denoise=0.5,
                 out=str(tmp_path / "a.png"), plugins=[Count()], **QUIET)
    assert steps_run == [(i, 5) for i in range(5)]  # int(10 * 0.5) steps of the 10-step schedule
    b = generate(m, "a dog", "", steps=10, seed=5, sampler="euler", init_image=first.paths[0], denoise=0.5, **QUIET)
    assert torch.equal(a.latents, b.latents)
    none = generate(m, "a dog", "", steps=10, seed=5, sampler="euler", init_image=first.paths[0], denoise=0.0, **QUIET)
    # denoise 0 is the image's own latent: decoding it gives (about) the image back through the VAE
    from lora_ext.sampler.pipeline import _encode_image, _load_image

    init = _encode_image(m, _load_image(first.paths[0], None, None, 2), 1)
    assert torch.allclose(none.latents, init)
    info = parse_infotext(read_parameters(a.paths[0]))
    assert info["Denoising strength"] == "0.5" and info["Size"] == "16x16"


def test_png_parameters_round_trip(models, store, tmp_path):
    m = models[("sd1", "single")]
    r = generate(m, 'a cat, "quoted": yes', "a dog\nsecond line", steps=3, seed=42, cfg=6.5, sampler="dpmpp_2m",
                 schedule="karras", clip_skip=2, out=str(tmp_path), **QUIET)
    text = read_parameters(r.paths[0])
    assert text == r.infotexts[0]
    info = parse_infotext(text)
    assert info["Prompt"] == 'a cat, "quoted": yes'
    assert info["Negative prompt"] == "a dog\nsecond line"
    assert info["Steps"] == "3" and info["Sampler"] == "DPM++ 2M" and info["Schedule type"] == "Karras"
    assert info["CFG scale"] == "6.5" and info["Seed"] == "42" and info["Size"] == "16x16"
    assert info["Model hash"] == file_sha256(store["sd1"][2])[:10]
    assert info["Model"] == "tiny-sd1" and info["Clip skip"] == "2"
    assert info["Version"].startswith("lora-ext ")
    assert os.path.basename(r.paths[0]) == "00001-42.png"


def test_offline_no_network(store, tmp_path, monkeypatch):
    """No socket may even be opened: loading and generating use only local files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for fam in FAMILIES:
        _, folder, single = store[fam]
        for path in (folder, single):
            r = generate(path, "a cat", "a dog", steps=2, seed=1, sampler="euler", **QUIET)
            assert r.images and r.images[0].size == (16, 16)


def test_missing_tokenizer_says_what_to_provide(store, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tokmod, "_installed_vocabularies", lambda: [])
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(store["sd1"][2], lonely)
    with pytest.raises(tokmod.TokenizerNotFound) as e:
        load_model(str(lonely))
    msg = str(e.value)
    for needed in ("--tokenizer DIR", "vocab.json and merges.txt", "bpe_simple_vocab_16e6.txt.gz",
                   "openai/clip-vit-large-patch14", "instant-clip-tokenizer", str(tmp_path / "tokenizer")):
        assert needed in msg
    # --tokenizer pointing at a folder works, and so does the HF cache layout
    m = load_model(str(lonely), tokenizer=os.path.join(store["sd1"][1], "tokenizer"))
    assert m.tokenizers[0].source.endswith("tokenizer")
    _fake_hf_cache(tmp_path / "hf" / "hub")
    m = load_model(str(lonely))
    assert "models--openai--clip-vit-large-patch14" in m.tokenizers[0].source


def _fake_hf_cache(hub):
    """An HF cache entry shaped like openai/clip-vit-large-patch14 (a 49408-token vocab)."""
    snap = hub / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    vocab, merges = tiny_vocab()
    big = dict(vocab)
    for i in range(len(big), 49408):
        big[f"tok{i}</w>"] = i
    (snap / "vocab.json").write_text(json.dumps(big))
    (snap / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


# ---------------------------------------------------------------------------------------------
# LoRAs

TARGET = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 16 -> 8, block IN01


def _write_lora(path, rank=2, seed=0, metadata=None):
    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_" + TARGET.replace(".", "_")
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(rank, 16, generator=g) * 0.5,
        f"{key}.lora_up.weight": torch.randn(8, rank, generator=g) * 0.5,
        f"{key}.alpha": torch.tensor(float(rank)),
        f"{te}.lora_down.weight": torch.randn(rank, 16, generator=g) * 0.5,
        f"{te}.lora_up.weight": torch.randn(16, rank, generator=g) * 0.5,
        f"{te}.alpha": torch.tensor(float(rank)),
    }
    save_safetensors(path, tensors, metadata)
    return tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]


@pytest.mark.parametrize("method", ["fuse", "onthefly"])
def test_lora_step_schedule_acts_at_every_step(models, tmp_path, method):
    m = models[("sd1", "single")]
    loras = tmp_path / "loras"
    loras.mkdir()
    delta = _write_lora(str(loras / "tinylora.safetensors"))
    module = m.unet.get_submodule(TARGET)
    w0 = module.weight.detach().clone()
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    seen = []  # (step, implied strength) per UNet call

    class Probe:
        step = h = None

        @hookimpl(trylast=True)
        def lora_ext_step_begins(self, step):
            # after the session has moved the LoRA to this step; (re)hooked last, so this
            # hook sees the module's output with whatever hook the engine put on it
            self.step = step
            self.unhook()
            self.h = module.register_forward_hook(self.record)

        @hookimpl
        def lora_ext_run_ends(self):
            self.unhook()

        def unhook(self):
            if self.h is not None:
                self.h.remove()
                self.h = None

        def record(self, mod, args, out):
            x = args[0]
            base = F.linear(x, w0)
            d = F.linear(x, delta)
            seen.append((self.step, float(((out - base) * d).sum() / (d * d).sum())))

    r = generate(m, "a cat <lora:tinylora:1:unet=0@0,1@1>", "a dog", lora_dirs=[str(loras)], steps=6, seed=2,
                 sampler="heun", lora_method=method, plugins=[Probe()], **QUIET)
    assert r.steps_seen == list(range(6))
    spec = r.loras[0]
    expected = {s: spec.strength("unet", "IN01", s, 6) for s in range(6)}
    assert [expected[s] for s in range(6)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    steps_called = sorted({s for s, _ in seen})
    assert steps_called == list(range(6))  # heun: two calls per step except the last
    for step, strength in seen:
        assert strength == pytest.approx(expected[step], abs=1e-4), (step, strength)
    after = m.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit-exactly
    assert not module._forward_hooks
    info = parse_infotext(r.infotexts[0])
    assert info["Lora hashes"] == f"tinylora: {short_hash(loras / 'tinylora.safetensors')}"
    assert "<lora:tinylora:1:unet=0@0,1@1>" in info["Prompt"]


def test_lora_changes_the_image_and_is_removed(models, tmp_path):
    m = models[("sd1", "diffusers")]
    loras = tmp_path / "loras"
    loras.mkdir()
    _write_lora(str(loras / "style.safetensors"), seed=3)
    plain = generate(m, "a cat", "", steps=3, seed=2, sampler="euler", **QUIET)
    with_lora = generate(m, "a cat <lora:style:1>", "", steps=3, seed=2, sampler="euler", lora_dirs=[str(loras)], **QUIET)
    again = generate(m, "a cat", "", steps=3, seed=2, sampler="euler", **QUIET)
    assert not torch.allclose(plain.latents, with_lora.latents)
    assert torch.equal(plain.latents, again.latents)
    by_api = generate(m, "a cat", "", steps=3, seed=2, sampler="euler", loras=[(str(loras / "style.safetensors"), 1.0)],
                      **QUIET)
    assert torch.allclose(by_api.latents, with_lora.latents, atol=1e-6)


def test_kept_loras_are_not_applied_again(models, tmp_path):
    from lora_ext.resolve import LoraLibrary
    from lora_ext.session import Session

    m = models[("sd1", "single")]
    loras = tmp_path / "loras"
    loras.mkdir()
    _write_lora(str(loras / "keep.safetensors"), seed=5)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    fresh = generate(m, "a cat <lora:keep:0.7>", "", steps=3, seed=2, sampler="euler", lora_dirs=[str(loras)], **QUIET)
    session = Session(LoraLibrary([str(loras)]))
    first = generate(m, "a cat <lora:keep:0.7>", "", steps=3, seed=2, sampler="euler", session=session,
                     keep_loras=True, **QUIET)
    handle = session.handles["unet"]
    second = generate(m, "a cat <lora:keep:0.7>", "", steps=3, seed=2, sampler="euler", session=session,
                      keep_loras=True, **QUIET)
    assert session.handles["unet"] is handle and handle.alive  # nothing re-applied
    assert torch.equal(first.latents, second.latents) and torch.allclose(first.latents, fresh.latents, atol=1e-5)
    plain = generate(m, "a cat", "", steps=3, seed=2, sampler="euler", session=session, keep_loras=True, **QUIET)
    reference = generate(m, "a cat", "", steps=3, seed=2, sampler="euler", **QUIET)
    assert torch.equal(plain.latents, reference.latents)  # a run without LoRAs drops the kept ones
    session.close()
    after = m.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_few_step_lora_settings_are_applied_and_said(models, tmp_path):
    m = models[("sd1", "single")]
    loras = tmp_path / "loras"
    loras.mkdir()
    _write_lora(str(loras / "tiny_lcm_lora.safetensors"))
    _write_lora(str(loras / "speedy.safetensors"), metadata={"ss_output_name": "SDXL-Lightning 8steps"})
    said = []
    r = generate(m, "a cat <lora:tiny_lcm_lora:1>", "", lora_dirs=[str(loras)], seed=1, progress=False, log=said.append)
    s = r.settings
    assert (s["sampler"], s["schedule"], s["steps"], s["cfg"], s["few_step"]) == ("lcm", "sgm_uniform", 6, 1.5, "LCM")
    assert any("LCM LoRA (tiny_lcm_lora): using sampler lcm, schedule sgm_uniform, steps 6, cfg 1.5" in x for x in said)
    r = generate(m, "a cat <lora:speedy:1>", "", lora_dirs=[str(loras)], seed=1, steps=3, **QUIET)
    assert (r.settings["sampler"], r.settings["schedule"], r.settings["steps"], r.settings["cfg"]) == (
        "euler", "sgm_uniform", 3, 1.0)  # the user's steps win; the rest from Lightning
    assert "Lightning" in r.notes[0]


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_generate(store, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code = main(["generate", "--checkpoint", store["sdxl"][2], "--prompt", "a cat", "--negative", "a dog",
                 "--sampler", "Euler a", "--steps", "3", "--cfg", "3", "--seed", "8", "--batch", "2", "--out",
                 str(out), "--quiet", "-v"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SDXL-layout single file" in printed and "euler_a / normal, 3 steps" in printed
    info = parse_infotext(read_parameters(tmp_path / "cli-2.png"))
    assert info["Seed"] == "9" and info["Sampler"] == "Euler a"
    assert main(["generate", "--checkpoint", store["sd1"][2], "--prompt", "x", "--width", "13", "--quiet",
                 "--out", str(tmp_path)]) == 2
    assert "multiples of 2" in capsys.readouterr().err


def test_cli_names_match_the_registries():
    assert tuple(SAMPLERS) == SAMPLER_NAMES
    assert tuple(SCHEDULES) == SCHEDULE_NAMES

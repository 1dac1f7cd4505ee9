"""Checkpoint reading for the sampler: ldm <-> diffusers names at full size (on the meta
device), separate VAE files, prediction-type detection, the CLIP vocabulary, infotext."""
import gzip
import os

import pytest
import torch

from lora_ext import arch
from lora_ext.io import open_tensors, save_safetensors
from lora_ext.sampler import tokenizer as tokmod
from lora_ext.sampler.convert import join_ldm, ldm_slots
from lora_ext.sampler.fewstep import settings_for
from lora_ext.sampler.loading import _build, _metadata_prediction, _sd2_is_v, load_model, shipped_configs
from lora_ext.sampler.png import format_infotext, parse_infotext
from lora_ext.sampler.tiny import save_single_file, tiny_components, tiny_vocab


@pytest.mark.parametrize("family", arch.ARCHS)
def test_full_size_names_agree_with_arch(family):
    """UNet and text encoders map exactly as arch's own ldm <-> diffusers tables say."""
    configs = shipped_configs(family)
    for comp in arch.components(family):
        model = _build(comp, configs[comp])
        slots = ldm_slots(comp, model, configs[comp], family)
        table = arch.module_table(family, comp)
        want = {}
        for info in table.values():
            for param, key in (("weight", info.ldm_weight), ("bias", info.ldm_bias)):
                if key is not None:
                    want[(info.path, param)] = key
        got = {}
        for k, slot in slots.items():
            path, _, param = (k[len("text_model."):] if k.startswith("text_model.") else k).rpartition(".")
            got[(path, param)] = slot.ldm_key
        assert got == want, comp
        assert len(slots) == sum(1 for k in model.state_dict() if not k.endswith("position_ids"))


def test_full_size_vae_names():
    cfg = shipped_configs("sd1")["vae"]
    vae = _build("vae", cfg)
    slots = ldm_slots("vae", vae, cfg, "sd1")
    keys = {s.ldm_key[len("first_stage_model."):] for s in slots.values()}
    assert len(keys) == len(slots) == 248  # every tensor of an SD VAE, one to one
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
              "encoder.down.2.downsample.conv.bias", "encoder.mid.block_2.norm1.weight", "encoder.mid.attn_1.q.weight",
              "encoder.mid.attn_1.proj_out.bias", "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.bias",
              "decoder.mid.attn_1.norm.weight", "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.block.2.conv1.weight",
              "decoder.up.3.upsample.conv.weight", "decoder.up.1.upsample.conv.bias", "decoder.norm_out.bias"):
        assert k in keys, k
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.3.downsample.conv.weight" not in keys
    assert sum(s.conv1x1 for s in slots.values()) == 8  # q, k, v, proj_out weights in encoder and decoder
    assert shipped_configs("sdxl")["vae"]["scaling_factor"] == 0.13025


def test_vae_conversion_round_trip_and_separate_vae_files(tmp_path):
    comps = tiny_components("sd1", seed=4)
    single = save_single_file(str(tmp_path / "m.safetensors"), comps, "sd1")
    other = tiny_components("sd1", seed=5)["vae"]
    cfg = dict(other.config)
    slots = ldm_slots("vae", other, cfg, "sd1")
    ldm = join_ldm({"vae": other.state_dict()}, {"vae": slots})
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    # a VAE file in ldm names without the first_stage_model. prefix (as A1111 ships them)
    bare = {k[len("first_stage_model."):]: v for k, v in ldm.items()}
    save_safetensors(tmp_path / "vae-ldm.safetensors", bare)
    save_safetensors(tmp_path / "vae-diffusers.safetensors", dict(other.state_dict()))
    for f in ("vae-ldm.safetensors", "vae-diffusers.safetensors"):
        m = load_model(single, vae=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(m.vae.state_dict().values(), other.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(m.unet.state_dict().values(), comps["unet"].state_dict().values()))


def test_prediction_detection(tmp_path):
    def tf_with(metadata=None, tensors=None, name="m.safetensors"):
        path = tmp_path / name
        save_safetensors(path, tensors or {"x": torch.zeros(1)}, metadata)
        return open_tensors(path, kind="checkpoint"), str(path)

    tf, path = tf_with({"modelspec.prediction_type": "v"})
    assert _metadata_prediction(tf, path)[0] == "v_prediction"
    tf, path = tf_with({"ss_v_parameterization": "True"}, name="a.safetensors")
    assert _metadata_prediction(tf, path)[0] == "v_prediction"
    tf, path = tf_with(tensors={"v_pred": torch.zeros(0)}, name="b.safetensors")
    assert _metadata_prediction(tf, path) == ("v_prediction", "its v_pred key")
    tf, path = tf_with(name="c.safetensors")
    assert _metadata_prediction(tf, path) is None
    (tmp_path / "c.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert _metadata_prediction(tf, path) == ("v_prediction", "c.yaml")
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(0)
    tf, _ = tf_with(tensors={key: torch.randn(320, generator=g) * 0.2}, name="v.safetensors")
    assert _sd2_is_v(tf) is True
    tf, _ = tf_with(tensors={key: torch.randn(320, generator=g) * 0.02}, name="e.safetensors")
    assert _sd2_is_v(tf) is False


def test_prediction_can_be_forced(tmp_path):
    comps = tiny_components("sd2", seed=2)
    path = save_single_file(str(tmp_path / "m.safetensors"), comps, "sd2", "v_prediction")
    assert load_model(path).prediction == "v_prediction"
    assert load_model(path, prediction="eps").prediction == "epsilon"
    with pytest.raises(ValueError, match="prediction must be"):
        load_model(path, prediction="x0")


# ---------------------------------------------------------------------------------------------
# the CLIP vocabulary


def _fake_bpe_gz(path, merges):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return path


def test_bpe_gz_vocabulary_is_built_like_clips(tmp_path):
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    gz = _fake_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz", merges)
    vocab, got_merges = tokmod.bpe_vocabulary(str(gz))
    assert got_merges == merges
    assert len(vocab) == 256 * 2 + len(merges) + 2
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + ord("a") - ord("!")  # CLIP's byte order
    assert vocab["cat</w>"] == 512 + 1 and vocab["<|endoftext|>"] == len(vocab) - 1
    tok = tokmod.load_tokenizer(tokmod.find_vocabulary(tokenizer=str(gz)))
    assert tok.encode("a cat, dog") == [vocab["a</w>"], vocab["cat</w>"], vocab[",</w>"], vocab["dog</w>"]]
    assert (tok.bos, tok.eos, tok.pad) == (len(vocab) - 2, len(vocab) - 1, len(vocab) - 1)
    # SD2's pad token is "!" (id 0)
    tok2 = tokmod.load_tokenizer(tokmod.find_vocabulary(tokenizer=str(tmp_path)), default_pad="!")
    assert tok2.pad == 0


def test_real_clip_ids_if_a_vocabulary_is_installed():
    try:
        vocab = tokmod.find_vocabulary(looked=[])
    except tokmod.TokenizerNotFound:
        pytest.skip("no CLIP vocabulary on this machine")
    tok = tokmod.load_tokenizer(vocab)
    if tok.eos != 49407:
        pytest.skip("the vocabulary found is not CLIP's")
    assert tok.encode("A person riding a motorcycle") == [320, 2533, 6765, 320, 10297]


def test_vocabulary_order_and_pads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(tokmod, "_installed_vocabularies", lambda: [])
    from lora_ext.sampler.tiny import write_tokenizer

    pipe = tmp_path / "pipe"
    write_tokenizer(str(pipe / "tokenizer"), "<|endoftext|>")
    write_tokenizer(str(pipe / "tokenizer_2"), "!")
    v0 = tokmod.find_vocabulary(which=0, checkpoint=str(pipe))
    v1 = tokmod.find_vocabulary(which=1, checkpoint=str(pipe))
    assert v0.path.endswith("tokenizer") and v0.pad == "<|endoftext|>"
    assert v1.path.endswith("tokenizer_2") and v1.pad == "!"
    # a plain vocab folder given explicitly: the family's default pad applies
    v = tokmod.find_vocabulary(which=0, tokenizer=str(pipe / "tokenizer_2"))
    assert v.pad is None
    assert tokmod.load_tokenizer(v, default_pad="!").pad == tiny_vocab()[0]["!"]
    with pytest.raises(tokmod.TokenizerNotFound, match="no CLIP tokenizer there"):
        tokmod.find_vocabulary(tokenizer=str(tmp_path / "nothing"))
    # ComfyUI keeps one in comfy/sd1_tokenizer; a checkpoint inside its models/ finds it
    comfy = tmp_path / "ComfyUI"
    write_tokenizer(str(comfy / "comfy" / "sd1_tokenizer"))
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    v = tokmod.find_vocabulary(checkpoint=str(comfy / "models" / "checkpoints" / "x.safetensors"))
    assert v.path.endswith(os.path.join("comfy", "sd1_tokenizer"))


# ---------------------------------------------------------------------------------------------
# infotext and few-step settings


def test_infotext_format_and_parse():
    text = format_infotext("a, b: c", "", {"Steps": 4, "Sampler": "Euler a", "Seed": 1, "Size": "8x8",
                                           "Lora hashes": "x: 123, y: 456", "Clip skip": None})
    assert text.splitlines() == ["a, b: c", 'Steps: 4, Sampler: Euler a, Seed: 1, Size: 8x8, Lora hashes: "x: 123, y: 456"']
    info = parse_infotext(text)
    assert info["Prompt"] == "a, b: c" and info["Negative prompt"] == "" and info["Lora hashes"] == "x: 123, y: 456"
    assert "Clip skip" not in info


@pytest.mark.parametrize("kind,name,expected", [
    ("LCM", "lcm-lora-sdv1-5", ("lcm", "sgm_uniform", 6, 1.5)),
    ("Lightning", "sdxl_lightning_2step_lora", ("euler", "sgm_uniform", 2, 1.0)),
    ("Hyper-SD", "Hyper-SD15-8steps-CFG-lora", ("euler", "trailing", 8, 5.0)),
    ("Hyper-SD", "Hyper-SDXL-1step-lora", ("lcm", "trailing", 1, 1.0)),
    ("Turbo", "sd_turbo_lora", ("euler_a", "sgm_uniform", 4, 1.0)),
    ("DMD", "dmd2_sdxl_4step_lora", ("lcm", "sgm_uniform", 4, 1.0)),
])
def test_few_step_settings(kind, name, expected):
    s = settings_for(kind, name)
    assert (s.sampler, s.schedule, s.steps, s.cfg) == expected


@pytest.mark.slow
def test_full_size_sd15_single_file(tmp_path):
    """A full-size SD1.5 A1111 file (random fp16 weights, no embedded configs: the shipped ones
    are used) loads and generates; about 2 GB on disk, a minute or two."""
    from lora_ext.sampler import generate
    from lora_ext.sampler.loading import write_single_file
    from lora_ext.sampler.tiny import write_tokenizer

    configs = shipped_configs("sd1")
    comps = {}
    g = torch.Generator().manual_seed(0)
    for comp in ("unet", "te1", "vae"):
        module = _build(comp, configs[comp]).to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_((torch.randn(p.shape, generator=g) / max(1.0, p[0].numel() ** 0.5) if p.ndim > 1
                         else torch.zeros(p.shape) if name.endswith("bias") else torch.ones(p.shape)).half().float())
            for name, b in module.named_buffers():
                b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
        comps[comp] = module.half()
    path = write_single_file(str(tmp_path / "sd15.safetensors"), comps, "sd1", embed_configs=False)
    with open_tensors(path, kind="checkpoint") as tf:
        assert len(tf.keys()) == 686 + 196 + 248
    write_tokenizer(str(tmp_path / "tokenizer"))
    model = load_model(path)
    assert model.family == "sd1" and model.prediction == "epsilon" and model.default_size == 512
    assert model.notes[0] == "SD1.x-layout single file; configs: the shipped full-size configs"
    ref = comps["unet"].state_dict()
    got = model.unet.state_dict()
    assert all(torch.equal(ref[k].float(), got[k]) for k in ref)
    r = generate(model, "a cat", "a dog", steps=1, seed=1, sampler="euler", width=64, height=64,
                 progress=False, log=None)
    assert r.images[0].size == (64, 64) and torch.isfinite(r.latents).all()

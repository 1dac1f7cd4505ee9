"""lora-ext inside REAL webuis, driven over their HTTP API (``pytest -m realhost``).

For each host checkout given by ``LORA_EXT_REFORGE_DIR``, ``LORA_EXT_FORGE_DIR``,
``LORA_EXT_FORGE_CLASSIC_DIR`` or ``LORA_EXT_SDNEXT_DIR`` (with its own venv in ``<dir>/venv``
or ``LORA_EXT_<HOST>_PYTHON``; see tests/realhost_util.py), the test installs lora-ext the way
README tells users (a copy of this repository in ``extensions/lora-ext``, its ``install.py``
run with the host's Python), writes a full-size random SD1.5 checkpoint (and a 9-channel
inpainting one) and a few LoRA files, boots the host headless on CPU on 127.0.0.1 and runs
txt2img (64x64, 2 steps) with ``<lora:...>`` tags. Hosts that are not given are skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import realhost_util as rh

pytestmark = pytest.mark.realhost
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LORA_EXT_REALHOST_ARCH=sdxl runs the same tests on an SDXL-shaped checkpoint (about 7 GB on
# disk, 14 GB of RAM in fp32) and an SDXL LoRA with CLIP-L and CLIP-G keys
ARCH = os.environ.get("LORA_EXT_REALHOST_ARCH", "sd15")
CKPT = "lora-ext-rand15.safetensors" if ARCH == "sd15" else f"lora-ext-rand-{ARCH}.safetensors"
INPAINT = CKPT.replace(".safetensors", "-inpainting.safetensors")
# images are uint8; lora-ext (fp32 maths, rounded once) and a built-in handler that patches in
# its own precision differ by rounding, far less than the LoRA's own effect
SAME_AS_BUILTIN = 3.0  # max |difference| in 0..255 levels allowed


def _tolerance(host) -> float:
    # SD.Next's native LoRA adds its delta into the weights in their own dtype and takes it
    # out again by subtraction (measured here: its restore is not bit-exact), so its images
    # sit a few levels further from lora-ext's fp32-maths-rounded-once weights
    return 8.0 if host.name == "sdnext" else SAME_AS_BUILTIN


def _configured():
    return [h for h in rh.HOSTS if rh.host_dir(h) and rh.host_python(h)]


def _get(url):
    with urllib.request.urlopen(url, timeout=180) as r:
        return json.loads(r.read())


def _options(url, **opts):
    return rh._post(url + "/sdapi/v1/options", opts, timeout=600)


def _status(url, weights=False):
    return _get(url + "/lora-ext/v1/status" + ("?weights=true" if weights else ""))


def _install_extension(name, d):
    """A copy of this repository in extensions/lora-ext, its install.py run the way the host's
    own launcher runs extension installers (the offline boot flags skip that step)."""
    dest = os.path.join(d, "extensions", "lora-ext")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".ci-venv", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "out"))
    res = rh.run_extension_installer(name, dest)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _cache_dir():
    d = os.environ.get("LORA_EXT_REALHOST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "lora-ext-realhost")
    os.makedirs(d, exist_ok=True)
    return d


def _cached(name, write):
    path = os.path.join(_cache_dir(), name)
    if not os.path.exists(path):
        write(path + ".part")
        os.replace(path + ".part", path)
    return path


def _place(src, folder, name=None):
    """Hard-link (or copy) a cached file into a host's models folder as ``name``."""
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name or os.path.basename(src))
    if os.path.exists(dst):
        if os.path.samefile(src, dst):
            return
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_inpainting(src, path):
    sd = load_file(src)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd[key]
    extra = torch.randn(w.shape[0], 5, *w.shape[2:], generator=torch.Generator().manual_seed(5)) * 0.02
    sd[key] = torch.cat([w, extra.to(w.dtype)], 1).contiguous()
    save_file(sd, path)


def _write_emb_lora(src, path):
    sd = load_file(src)
    sd["bundle_emb.lxtchar.string_to_param.*"] = torch.randn(1, 768) * 0.01
    save_file(sd, path)


def _write_models(d):
    ckpt = _cached(CKPT, lambda p: rh.write_sd_checkpoint(p, ARCH, seed=0))
    _cached(INPAINT, lambda p: _write_inpainting(ckpt, p))
    tag = "" if ARCH == "sd15" else f"-{ARCH}"
    lora = _cached(f"lxt_a{tag}.safetensors", lambda p: rh.write_kohya_lora(p, ARCH, seed=1))
    # the same LoRA with a bundled embedding: lora-ext hands it to the built-in handler
    emb = _cached(f"lxt_emb{tag}.safetensors", lambda p: _write_emb_lora(lora, p))
    unet_only = _cached(f"lxt_unet{tag}.safetensors", lambda p: save_file(
        {k: v for k, v in load_file(lora).items() if k.startswith("lora_unet_")}, p))
    _place(ckpt, os.path.join(d, "models", "Stable-diffusion"))
    # the inpainting checkpoint goes in only for its test: at boot SD.Next loads the first
    # checkpoint it lists, and a failed load of that one leaves it half-loaded
    stale = os.path.join(d, "models", "Stable-diffusion", INPAINT)
    if os.path.exists(stale):
        os.remove(stale)
    for f, name in ((lora, "lxt_a"), (emb, "lxt_emb"), (unet_only, "lxt_unet")):
        _place(f, os.path.join(d, "models", "Lora"), name + ".safetensors")


def _diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module", params=_configured() or [None])
def host(request, tmp_path_factory):
    name = request.param
    if name is None:
        pytest.skip("no real host given (set LORA_EXT_REFORGE_DIR / _FORGE_DIR / _FORGE_CLASSIC_DIR / _SDNEXT_DIR)")
    d = rh.host_dir(name)
    _write_models(d)
    _install_extension(name, d)
    log = str(tmp_path_factory.mktemp(name) / "console.log")
    with rh.start_host(name, log_path=log) as h:
        _use_model(h, CKPT)
        opts = dict(lora_ext_restore="restore", lora_ext_enabled=True)
        if name != "sdnext":
            opts["live_previews_enable"] = False
        _options(h.url, **opts)
        h.name = name
        if name == "sdnext":
            # the harness loads models one at a time (rh.wait_sdnext_autoload): torch must still
            # build modules with real parameters, or SD.Next's own LoRA handler cannot work
            # (issue 14, tests/test_sdnext_meta_race.py)
            assert not _status(h.url).get("warnings"), _status(h.url)["warnings"]
        print(f"{name}: booted in {h.boot_s:.0f} s; console: {log}")
        yield h


def _use_model(h, filename):
    models = _get(h.url + "/sdapi/v1/sd-models")
    stem = filename.rsplit(".", 1)[0]
    hits = [m["title"] for m in models if os.path.basename(str(m.get("filename") or "")) == filename] + \
        [m["title"] for m in models if str(m.get("title", "")).split(" [")[0].rsplit(".", 1)[0].endswith(stem)]
    assert hits, f"{filename} not among the webui's checkpoints: {[m.get('title') for m in models]}"
    title = hits[0]
    rh.set_model(h.url, title)
    if h.host == "sdnext":
        rh._post(h.url + "/sdapi/v1/reload-checkpoint", {}, timeout=900)


def test_lora_equals_builtin_and_restores_bit_exactly(host):
    url = host.url
    none = rh.txt2img(url, "a cat")  # lora-ext binds the model at the first generation
    fresh = _status(url, weights=True)["weights"]
    assert set(fresh) >= {"unet", "te1"}, fresh
    host.fresh = fresh
    # SD.Next's own handler leaves text encoders alone by default: compare a UNet-only LoRA there
    tag = "<lora:lxt_unet:0.8>" if host.name == "sdnext" else "<lora:lxt_a:0.8>"
    ours = rh.txt2img(url, f"a cat {tag}")
    st = _status(url, weights=True)
    assert len(st["loras"]) == 1 and not st["errors"], st
    assert host.name != "sdnext" or not st.get("warnings"), st
    assert st["weights"] == fresh, "after a 'restore' generation the weights equal a fresh load"
    _options(url, lora_ext_enabled=False)
    builtin = rh.txt2img(url, f"a cat {tag}")
    rh.txt2img(url, "a cat")
    # whether the host's own handler gives its weights back exactly (SD.Next's does not)
    host.builtin_exact = _status(url, weights=True)["weights"] == fresh
    _options(url, lora_ext_enabled=True)
    print(f"{host.name}: |ours - none| {_diff(ours, none):.0f}, |ours - built-in| {_diff(ours, builtin):.0f}, "
          f"built-in restores exactly: {host.builtin_exact}")
    assert _diff(ours, none) > 10, "the LoRA acts"
    assert _diff(ours, builtin) <= _tolerance(host), (_diff(ours, builtin), _diff(ours, none))


def test_keyframes_blocks_and_hires_act(host):
    url = host.url
    full = rh.txt2img(url, "a cat <lora:lxt_a:0.8>")
    ramp = rh.txt2img(url, "a cat <lora:lxt_a:0.8:unet=0@0,1@1>")
    unet_off = rh.txt2img(url, "a cat <lora:lxt_a:0.8:unet=0>")
    blocks_off = rh.txt2img(url, "a cat <lora:lxt_a:0.8:in=0:mid=0:out=0>")
    assert _diff(ramp, full) > 0 and _diff(ramp, unet_off) > 0, "keyframes act per step"
    assert _diff(blocks_off, unet_off) <= 1 and _diff(blocks_off, full) > 0, "block weights act"
    upscaler = "Latent Nearest" if host.name == "sdnext" else "Latent"
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=2, denoising_strength=0.6)
    if host.name.startswith("forge"):
        hires["hr_additional_modules"] = ["Use same choices"]  # Forge's API needs it for hires
    if host.name == "sdnext":
        hires["hr_resize_mode"] = 1  # SD.Next upscales only with a resize mode
    hr_on = rh.txt2img(url, "a cat <lora:lxt_a:0.8>", **hires)
    hr_off = rh.txt2img(url, "a cat <lora:lxt_a:0.8:hr=0>", **hires)
    assert hr_on.shape[0] == 96 and _diff(hr_on, hr_off) > 0, "hr= acts in the hires pass"


def test_fallback_goes_to_the_builtin_handler(host):
    url = host.url
    rh.txt2img(url, "a cat")
    before = _status(url, weights=True)["weights"]
    _options(url, lora_ext_enabled=False)
    builtin = rh.txt2img(url, "a cat <lora:lxt_emb:0.8>")
    _options(url, lora_ext_enabled=True)
    ours = rh.txt2img(url, "a cat <lora:lxt_emb:0.8>")
    st = _status(url)
    assert any("lxt_emb" in x and "embedding" in x for x in st["fallback"]), st
    assert _diff(ours, builtin) <= _tolerance(host), "the built-in handler took it"
    rh.txt2img(url, "a cat")
    after = _status(url, weights=True)["weights"]
    if getattr(host, "builtin_exact", True):
        assert after == before, "the built-in's patches came off, and ours"
    else:
        print(f"{host.name}: its built-in handler does not restore weights bit-exactly; not compared")


def _gray_png(size=64):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _inpaint(url, prompt):
    """img2img with a full mask: what an inpainting checkpoint is for (SD.Next runs such a
    checkpoint only in its inpaint pipeline)."""
    from PIL import Image
    import base64
    import io

    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, format="PNG")
    white = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    payload = dict(prompt=prompt, steps=2, width=64, height=64, sampler_name="Euler", seed=1, cfg_scale=1.0,
                   init_images=[_gray_png()], mask=white, denoising_strength=1.0, inpainting_fill=1)
    r = rh._post(url + "/sdapi/v1/img2img", payload, timeout=900)
    assert r.get("images"), str(r)[:2000]
    return rh.decode_image(r["images"][0])


def test_inpainting_checkpoint_takes_a_lora(host):
    url = host.url
    sdnext = host.name == "sdnext"
    if sdnext:
        pytest.skip("SD.Next loads an inpainting single file only with the hub's pipeline config "
                    "(diffusers from_single_file: LocalEntryNotFoundError offline); the 9-channel path "
                    "of its diffusers UNet is covered by tests/test_host_a1111_variants.py")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    if ARCH == "sdxl" and ram < 40:
        pytest.skip(f"a second SDXL model in fp32 after the first does not fit {ram:.0f} GiB of RAM "
                    "(measured: reForge keeps 13 GB after unloading the first, then is OOM-killed)")
    folder = os.path.join(rh.host_dir(host.name), "models", "Stable-diffusion")
    _place(os.path.join(_cache_dir(), INPAINT), folder)
    rh._post(url + "/sdapi/v1/refresh-checkpoints", {}, timeout=300)
    if sdnext:
        _options(url, diffusers_pipeline="Stable Diffusion Inpaint")
    _use_model(host, INPAINT)
    try:
        gen = (lambda p: _inpaint(url, p)) if sdnext else (lambda p: rh.txt2img(url, p))
        none = gen("a cat")
        ours = gen("a cat <lora:lxt_a:0.8>")
        st = _status(url)
        assert not st["errors"] and any("9 input channels" in n for n in st["notes"]), st
        assert _diff(ours, none) > 10
    finally:
        if sdnext:
            _options(url, diffusers_pipeline="Stable Diffusion")
        _use_model(host, CKPT)
        os.remove(os.path.join(folder, INPAINT))
        rh._post(url + "/sdapi/v1/refresh-checkpoints", {}, timeout=300)


def _cli_inspect(*args) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lora_ext.cli", "inspect", *args], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_inspect_route_gives_the_cli_report(host):
    """GET /lora-ext/v1/inspect in the real webui: the report ``lora-ext inspect`` prints for the
    same file, against its detected base and against the checkpoint the webui has loaded."""
    import urllib.parse

    url = host.url
    rh.txt2img(url, "a cat")  # the model lora-ext knows is the one of the last generation
    lora = os.path.abspath(os.path.join(rh.host_dir(host.name), "models", "Lora", "lxt_a.safetensors"))
    got = _get(url + "/lora-ext/v1/inspect?name=lxt_a")
    assert got["text"].strip() == _cli_inspect(lora), got["text"][:2000]
    loaded = _get(url + "/lora-ext/v1/inspect?" + urllib.parse.urlencode({"name": "lxt_a", "against": "loaded"}))
    assert loaded["base"] and os.path.basename(loaded["base"]) == CKPT, loaded.get("base")
    assert loaded["report"]["unmatched"] == [], loaded["report"]["unmatched"][:5]
    assert loaded["text"].strip() == _cli_inspect("--base", loaded["base"], lora)
    try:
        _get(url + "/lora-ext/v1/inspect?name=no_such_lora")
        raise AssertionError("a missing LoRA must be an HTTP error")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and "no_such_lora" in exc.read().decode()
    print(f"{host.name}: inspect route OK ({len(got['text'].splitlines())} lines)")


@pytest.mark.parametrize("name", _configured() or [None])
def test_inspect_tab_is_built_in_the_real_ui(name, tmp_path):
    """The "lora-ext" tab in a real webui's gradio UI (booted with its UI, not --nowebui): the
    tab and its widgets are in gradio's /config, and its Inspect button, called through
    gradio's own API, returns the CLI's report."""
    if name is None:
        pytest.skip("no real host given (set LORA_EXT_REFORGE_DIR / _FORGE_DIR / _FORGE_CLASSIC_DIR / _SDNEXT_DIR)")
    d = rh.host_dir(name)
    _write_models(d)
    _install_extension(name, d)
    with rh.start_host(name, log_path=str(tmp_path / "console.log"), webui=True) as h:
        cfg = _get(h.url + "/config")
        comps = {c.get("props", {}).get("elem_id"): c["id"] for c in cfg["components"]}
        for elem in ("tab_lora_ext_inspect", "lora_ext_inspect_name", "lora_ext_inspect_run", "lora_ext_inspect_report"):
            assert elem in comps, f"{elem} missing from the UI ({name})"
        run_id = comps["lora_ext_inspect_run"]
        fn = next(i for i, dep in enumerate(cfg["dependencies"])
                  if run_id in [t if isinstance(t, int) else t[0] for t in dep.get("targets", [])])
        out, errors = None, []
        for route in ("/run/predict", "/api/predict"):
            try:
                out = rh._post(h.url + route, {"fn_index": fn, "data": ["lxt_a", "the base model it was made for",
                                                                        False], "session_hash": "lxt"}, timeout=600)
                break
            except urllib.error.HTTPError as exc:
                errors.append(f"{route}: HTTP {exc.code} {exc.read()[:300]!r}")
        assert out is not None, f"gradio's predict route did not answer: {errors}"
        lora = os.path.abspath(os.path.join(d, "models", "Lora", "lxt_a.safetensors"))
        assert out["data"][0].strip() == _cli_inspect(lora)
        print(f"{name}: the lora-ext tab is built and its Inspect button gives the CLI's report")

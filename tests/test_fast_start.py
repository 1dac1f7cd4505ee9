"""The torch-free inspect path (lora_ext.fastpath) reports exactly what the full path does,
and ``lora-ext inspect`` of a safetensors file does not import torch (issue 17 item 8, issue 13)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lora_ext
from lora_ext import fastdata, fastpath, io, keys, library
from lora_ext.cli import main
from lora_ext.errors import LoraExtError
from lora_ext.inspect import inspect_lora
from lora_ext.layouts import arch_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reset():
    fastdata.load.cache_clear()
    fastpath._ready.cache_clear()
    fastpath.MODELS.clear()


@pytest.fixture()
def no_fast(monkeypatch):
    """The full path only (torch adapters, live layout tables)."""
    monkeypatch.setenv("LORA_EXT_NO_FAST_INSPECT", "1")
    _reset()
    assert not fastpath.available()
    yield
    monkeypatch.delenv("LORA_EXT_NO_FAST_INSPECT")
    _reset()


def _flat(p):
    return p.replace(".", "_")


def _kohya(layout_name, comp, prefix, pick, rank, dtype, alpha_dtype=torch.float32, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    table = arch_layout(layout_name)[comp]
    for path, info in list(table.items()):
        if len(sd) >= 3 * n:
            break
        if not pick(path) or len(info.weight_shape) not in (2, 4):
            continue
        out, inn = info.weight_shape[0], info.weight_shape[1]
        p = prefix + _flat(info.ldm_path if prefix.endswith("ldm_") else path)
        k = tuple(info.weight_shape[2:])
        sd[p + ".lora_down.weight"] = (torch.randn(rank, inn, *k, generator=g) * 0.01).to(dtype)
        sd[p + ".lora_up.weight"] = (torch.randn(out, rank, *([1] * len(k)), generator=g) * 0.01).to(dtype)
        sd[p + ".alpha"] = torch.tensor(rank / 2).to(alpha_dtype)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_inspect_library import LOHA_META, _kohya_loha
    from tiny_models import tiny_text_encoder, tiny_unet

    d = tmp_path_factory.mktemp("fast")
    assert main(["demo-files", str(d / "demo")]) == 0
    out = {os.path.basename(p)[: -len(".safetensors")]: str(p) for p in (d / "demo").iterdir()}

    def put(name, sd, meta=None):
        path = d / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path, meta)
        out[name] = str(path)

    unet, te = tiny_unet(), tiny_text_encoder()
    put("custom_loha", _kohya_loha(unet), LOHA_META)
    put("sd15_bf16_fp16alpha", _kohya("sd1", "unet", "lora_unet_", lambda p: "attn" in p or "conv" in p, 8,
                                      torch.bfloat16, torch.float16),
        {"ss_tag_frequency": json.dumps({"a:b": {"caf\u00e9: x": 2, "\u003a": 1}}), "note": "k: v \\u003a"})
    put("sd15_te_int_alpha", _kohya("sd1", "te1", "lora_te_", lambda p: "mlp" in p, 4, torch.float16, torch.int64))
    put("sdxl_lora", _kohya("sdxl", "unet", "lora_unet_", lambda p: "attn2" in p, 16, torch.float16))
    put("flux_lora", _kohya("flux-dev", "unet", "lora_unet_", lambda p: "transformer_blocks" in p, 4, torch.bfloat16))
    diffusers = {}
    for path, info in list(arch_layout("sd1")["unet"].items())[:200]:
        if "attn1.to_" in path:
            diffusers[f"unet.{path}.lora_A.weight"] = torch.randn(4, info.weight_shape[1])
            diffusers[f"unet.{path}.lora_B.weight"] = torch.randn(info.weight_shape[0], 4)
    put("diffusers_peft_meta", diffusers, {"lora_adapter_metadata": json.dumps(
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 4}, "alpha_pattern": {"to_k": 2}})})
    # kohya DoRA (dora_scale per output), a full diff, a norm, an IA3, a LoKr with a full w1, Tucker LoCon
    sd = _kohya("sd1", "unet", "lora_unet_", lambda p: "attn2.to_" in p, 4, torch.float32, n=4)
    for k in [k for k in sd if k.endswith(".lora_up.weight")]:
        sd[k.replace(".lora_up.weight", ".dora_scale")] = torch.rand(sd[k].shape[0], 1)
    m = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd[m + ".lora_down.weight"] = torch.randn(4, 4, 1, 1)
    sd[m + ".lora_mid.weight"] = torch.randn(4, 4, 3, 3)
    sd[m + ".lora_up.weight"] = torch.randn(320, 4, 1, 1)
    sd[m + ".lora_down.weight"] = torch.randn(4, 320, 1, 1)
    sd["lora_unet_mid_block_attentions_0_proj_in.diff"] = torch.randn(1280, 1280)
    sd["lora_unet_mid_block_attentions_0_norm.w_norm"] = torch.randn(1280)
    sd["lora_unet_mid_block_attentions_0_norm.b_norm"] = torch.randn(1280)
    sd["lora_unet_mid_block_attentions_0_proj_out.weight"] = torch.randn(1280)
    sd["lora_unet_mid_block_attentions_0_proj_out.on_input"] = torch.tensor(1.0)
    sd["lora_unet_conv_out.lokr_w1"] = torch.randn(2, 2)
    sd["lora_unet_conv_out.lokr_w2_a"] = torch.randn(2, 4)
    sd["lora_unet_conv_out.lokr_w2_b"] = torch.randn(4, 160 * 9)
    sd["lora_unet_conv_out.alpha"] = torch.tensor(4.0)
    sd["lora_unet_time_embedding_linear_1.diff_b"] = torch.randn(1280)
    put("mixed_types", sd)
    # what the fast path hands to the full path: an auto-detected group, a bias diff beside a
    # LoRA, an incomplete group, an OFT, a group on no module, and file-level problems
    odd = _kohya("sd1", "unet", "lora_unet_", lambda p: "attn1.to_q" in p, 4, torch.float32, n=2)
    odd["lora_unet_down_blocks_0_attentions_0_proj_in.my_a"] = torch.randn(4, 320)
    odd["lora_unet_down_blocks_0_attentions_0_proj_in.my_b"] = torch.randn(320, 4)
    odd["lora_unet_nowhere_at_all.q"] = torch.randn(3, 3)
    odd["lora_unet_mid_block_attentions_0_proj_out.alpha"] = torch.tensor(1.0)
    put("odd_groups", odd)
    bias = _kohya("sd1", "unet", "lora_unet_", lambda p: "attn1.to_out" in p, 4, torch.float32, n=1)
    bias["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.diff_b"] = torch.randn(320)
    put("lora_with_bias_diff", bias)
    put("oft", {"lora_unet_conv_in.oft_diag": torch.randn(4, 80, 80), "lora_unet_conv_in.alpha": torch.tensor(1.0)})
    base = _kohya("sd1", "unet", "lora_unet_", lambda p: "attn2" in p, 4, torch.float32, n=3)
    bad = dict(base)
    bad[next(k for k in bad if k.endswith(".alpha"))] = torch.tensor(float("nan"))
    put("nan_alpha", bad)
    bad = dict(base)
    up = next(k for k in bad if k.endswith(".lora_up.weight"))
    bad[up] = bad[up].clone()
    bad[up][3, 1] = float("inf")
    put("inf_in_big_tensor", bad)
    bad = dict(base)
    bad[next(k for k in bad if k.endswith(".alpha"))] = torch.tensor([1.0, 2.0])
    put("two_value_alpha", bad)
    bad = dict(base)
    bad[next(k for k in bad if k.endswith(".alpha"))] = torch.tensor(True)
    put("bool_alpha", bad)
    bad = dict(base)
    bad[next(k for k in bad if k.endswith(".lora_up.weight"))] = torch.randn(7, 3)
    put("bad_shapes", bad)
    data = open(out["inkwash_sd15_lora"], "rb").read()
    (d / "cut.safetensors").write_bytes(data[:-100])
    out["cut"] = str(d / "cut.safetensors")
    torch.save(_kohya_loha(unet, seed=3), d / "pickled.pt")
    out["pickled"] = str(d / "pickled.pt")
    try:
        import lycoris
    except ImportError:
        lycoris = None
    if lycoris is not None:
        for name, kw in {"ly_locon": dict(algo="locon"), "ly_lokr": dict(algo="lokr", factor=4),
                         "ly_full": dict(algo="full"), "ly_ia3": dict(algo="ia3"),
                         "ly_tucker": dict(algo="locon", use_tucker=True),
                         "ly_lokr_tucker": dict(algo="lokr", factor=4, use_tucker=True, decompose_both=True),
                         "ly_dora_in": dict(algo="locon", dora_wd=True, wd_on_output=False),
                         "ly_loha_dora": dict(algo="loha", dora_wd=True), "ly_norms": dict(algo="locon", train_norm=True),
                         "ly_glora": dict(algo="glora")}.items():
            for model, comp in ((tiny_unet(), "unet"), (te, "te")):
                if comp == "te" and name not in ("ly_locon", "ly_lokr"):
                    continue
                net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3, conv_dim=4, conv_alpha=2, **kw)
                net.apply_to()
                path = str(d / f"{name}_{comp}.safetensors")
                net.save_weights(path, torch.float32, {})
                out[f"{name}_{comp}"] = path
    return out


def _info(path):
    try:
        return inspect_lora(path)
    except LoraExtError as exc:
        return {"error": str(exc)}


#: files the torch-free path must read itself (the others it may hand to the full path)
FAST = ("inkwash_sd15_lora", "castle_sd15_locon_ldm_names", "pixel_sd15_peft_dora", "watercolor_sdxl_loha",
        "custom_loha", "sd15_bf16_fp16alpha", "sd15_te_int_alpha", "sdxl_lora", "flux_lora",
        "diffusers_peft_meta", "mixed_types", "ly_locon_unet", "ly_locon_te", "ly_lokr_unet", "ly_full_unet",
        "ly_ia3_unet", "ly_tucker_unet", "ly_lokr_tucker_unet", "ly_dora_in_unet", "ly_loha_dora_unet",
        "ly_norms_unet")


def test_fast_path_reports_what_the_full_path_does(files, monkeypatch):
    fast, used = {}, []
    for name, path in files.items():
        if fastpath.load_fast(path) is not None:
            used.append(name)
        fast[name] = _info(path)
    monkeypatch.setenv("LORA_EXT_NO_FAST_INSPECT", "1")
    _reset()
    try:
        assert not fastpath.available()
        for name, path in files.items():
            assert _info(path) == fast[name], name
    finally:
        monkeypatch.delenv("LORA_EXT_NO_FAST_INSPECT")
        _reset()
    want = [n for n in FAST if n in files]
    assert set(want) <= set(used), sorted(set(want) - set(used))
    # the checks kept their words: these went to the full path, which refused them
    for name in ("nan_alpha", "inf_in_big_tensor", "two_value_alpha", "bool_alpha", "cut"):
        assert "error" in fast[name] and name not in used, (name, fast[name])
    assert fast["odd_groups"]["types"].get("lora (auto-detected)") == 1


def test_library_rows_are_the_same_both_ways(files, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name, path in files.items():
        os.symlink(path, lib / os.path.basename(path))
    fast = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    monkeypatch.setenv("LORA_EXT_NO_FAST_INSPECT", "1")
    _reset()
    try:
        full = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    finally:
        monkeypatch.delenv("LORA_EXT_NO_FAST_INSPECT")
        _reset()
    assert fast["rows"] == full["rows"]
    assert len(fast["rows"]) == len(files)


def test_inspect_of_a_safetensors_file_imports_no_torch(files):
    # shipped data whose fingerprint is out of date (a source it covers was edited) is replaced
    # by a copy in the user cache on the first full-path inspect: the same here, explicitly
    fastdata.refresh_user_cache()
    _reset()
    assert fastpath.available()
    code = ("import sys\nfrom lora_ext.cli import main\n"
            "rc = main(['inspect', sys.argv[1]])\nrc2 = main(['inspect', '--json', sys.argv[2]])\n"
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'safetensors.torch') if m in sys.modules]\n"
            "print('RC', rc, rc2, 'HEAVY', heavy)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LORA_EXT_NO_FAST_INSPECT", None)
    r = subprocess.run([sys.executable, "-c", code, files["inkwash_sd15_lora"], files["custom_loha"]],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "RC 0 0 HEAVY []", r.stdout[-500:]
    assert "base model:   SD1.x" in r.stdout


def test_shipped_fast_data_is_current():
    """The precomputed layouts hold what the live tables give now (a change to them needs
    ``python -m lora_ext.fastdata --write``; until then inspect stays right, through the full
    path, and writes a fresh copy to the user cache). The fingerprint itself may differ: any
    edit of the sources it covers changes it, and the runtime checks it."""
    shipped = fastdata._read(fastdata.DATA_PATH)
    assert shipped is not None
    now = fastdata.generate()
    for k in ("fingerprint", "python"):
        shipped.pop(k), now.pop(k)
    assert shipped == json.loads(json.dumps(now)), "stale: run python -m lora_ext.fastdata --write"


def test_fast_data_matches_the_live_tables():
    data = fastdata._read(fastdata.DATA_PATH)
    for name in ("sd1", "sdxl", "flux-dev"):
        live = arch_layout(name)
        for comp, tid in data["layouts"][name]["components"].items():
            rows = fastdata.table_rows(data, tid, comp)
            assert list(rows) == list(live[comp])
            for path, info in live[comp].items():
                for f in fastdata._FIELDS:
                    assert getattr(rows[path], f) == getattr(info, f, None), (name, path, f)


def test_public_names_resolve():
    for name in lora_ext.__all__:
        assert getattr(lora_ext, name) is not None


_SEG = st.sampled_from(["lora_unet_down_blocks_0_attn", "unet", "down_blocks", "0", "to_q", "processor",
                        "lora_A", "lora_B", "default", "weight", "bias", "lora", "down", "up", "alpha", "hada_w1_a",
                        "lora_magnitude_vector", "diff_m", "qkv_lora1", "to_q_lora", "lora_down", "lora_up",
                        "lora_linear_layer", "text_encoder", "w_norm", ""])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_SEG, min_size=1, max_size=6).map(".".join), min_size=1, max_size=12))
def test_key_grouping_is_the_same(ks):
    names = fastdata.load()["names"] if fastdata.load() else sorted(keys._BASE_NAMES)
    assert fastpath.group_keys(ks, names) == keys.group_keys(ks, names)


def _header_bytes(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw


def _parse_both(tmp_path, text: str, monkeypatch):
    p = tmp_path / "h.safetensors"
    p.write_bytes(_header_bytes(text) + b"\0" * 64)
    out = []
    for plain in (True, False):
        if not plain:
            monkeypatch.setattr(io, "_parse_plain", lambda raw, text: None)
        try:
            with io.open_tensors(str(p)) as tf:
                out.append(("ok", tf.metadata, {k: (e.dtype_name, e.shape, e.begin, e.end) for k, e in tf._entries.items()}))
        except LoraExtError as exc:
            out.append(("error", str(exc)))
    monkeypatch.undo()
    return out


_NAME = st.sampled_from(["a", "b", "a:b", "c\\u003a", "\\u0061", "d"])
_DESC = st.one_of(
    st.tuples(st.sampled_from(["F32", "F16", "BF16", "I64", "X"]), st.lists(st.integers(0, 3), max_size=3),
              st.integers(0, 8)).map(lambda t: '{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}' % (
                  t[0], json.dumps(t[1]), t[2], t[2] + 4 * max(1, len(t[1])))),
    st.sampled_from(['{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}',
                     '{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{"y":1,"y":2}}', "[]", '"s"', "null",
                     '{"dtype":"F32","shape":[true],"data_offsets":[0,4]}']),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_NAME, _DESC), max_size=5),
       st.one_of(st.none(), st.lists(st.tuples(_NAME, st.sampled_from(['"v"', '"x:y"', "1", '"\\u003a"'])), max_size=3)))
def test_plain_header_parse_equals_the_checked_one(tmp_path_factory, entries, meta):
    """Every header, well-formed or not (repeated names anywhere, escaped colons, bad types):
    the fast parse either agrees with the checked one or leaves the header to it."""
    from _pytest.monkeypatch import MonkeyPatch

    parts = [f'"{k}":{v}' for k, v in entries]
    if meta is not None:
        parts.insert(0, '"__metadata__":{' + ",".join(f'"{k}":{v}' for k, v in meta) + "}")
    mp = MonkeyPatch()
    a, b = _parse_both(tmp_path_factory.mktemp("h"), "{" + ",".join(parts) + "}", mp)
    assert a == b


def _write_header(path, meta_json: str, src) -> None:
    """``src``'s tensors under a hand-written metadata JSON (the rest of its header kept)."""
    raw = open(src, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].decode()
    rest = head[json.JSONDecoder().raw_decode(head, 16)[1]:] if head.startswith('{"__metadata__"') else head[1:]
    new = ('{"__metadata__":' + meta_json + rest if meta_json else "{" + rest.lstrip(",")).encode()
    with open(path, "wb") as fh:
        fh.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_structure_memo_gives_the_rows_computed_without_it(tmp_path, monkeypatch):
    """Files of one structure (same names, shapes, dtypes) with other alphas, metadata, values:
    the rows from the structure memo equal those computed file by file, and the full path's."""
    lib = tmp_path / "lib"
    (lib / "peft").mkdir(parents=True)
    attn = lambda p: "attn2.to_" in p  # noqa: E731
    meta = {"ss_network_module": "networks.lora", "ss_tag_frequency": '{"10_style": {"style": 3, "1girl": 2}}'}
    metas = [meta, dict(meta, ss_tag_frequency='{"5_other": {"b": 1}}', sshs_model_hash="ab" * 32),
             dict(meta, ss_base_model_version="sdxl_base_v1-0"), dict(meta, ss_v2="true"),
             {"modelspec.trigger_phrase": "a, b"}, {}]
    alphas = [1.0, 2.0, 0.5, -0.0, 3.0, 4.0]
    paths = []
    for i, (m, a) in enumerate(zip(metas, alphas)):
        sd = _kohya("sd1", "unet", "lora_unet_", attn, 4, torch.float16, n=5, seed=i)
        for j, k in enumerate(k for k in sorted(sd) if k.endswith(".alpha")):
            sd[k] = torch.tensor(a if j % 2 == 0 else a + 1)
        paths.append(str(lib / f"same_{i}.safetensors"))
        save_file(sd, paths[-1], m)
    bad = _kohya("sd1", "unet", "lora_unet_", attn, 4, torch.float16, n=5, seed=9)
    first_alpha = sorted(k for k in bad if k.endswith(".alpha"))[0]
    for name, v in (("nan_alpha", float("nan")), ("huge_alpha", 1e30), ("inf_alpha", float("inf"))):
        save_file(dict(bad, **{first_alpha: torch.tensor(v)}), lib / f"{name}.safetensors", meta)
    data = open(paths[1], "rb").read()
    (lib / "cut.safetensors").write_bytes(data[:-100])  # the same header, the data cut short
    (lib / "copy.safetensors").write_bytes(data)
    _write_header(lib / "twice_named.safetensors", '{"a":"1","a":"2"}', paths[0])  # a repeated metadata name
    _write_header(lib / "spaced.safetensors", ' {"a":"1"}', paths[0])
    _write_header(lib / "no_meta.safetensors", "", paths[2])
    _write_header(lib / "colon_meta.safetensors", '{"a:b":"c:d"}', paths[3])
    # IA3 on one module: on_input (a small tensor) decides what it fits
    for name, on_input in (("ia3_out", 0), ("ia3_in", 1), ("ia3_out2", 0)):
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        save_file({k + ".weight": torch.full((320,), 0.1), k + ".on_input": torch.tensor(on_input)},
                  lib / f"{name}.safetensors")
    # a structure no known model has: the metadata's hint names the base
    for name, m in (("custom_plain", {}), ("custom_hint", {"ss_base_model_version": "sdxl_base_v1-0"}),
                    ("custom_plain2", {"x": "y"})):
        k = "lora_unet_custom_block_0_proj"
        save_file({k + ".lora_down.weight": torch.randn(4, 48), k + ".lora_up.weight": torch.randn(48, 4),
                   k + ".alpha": torch.tensor(2.0)}, lib / f"{name}.safetensors", m)
    # pickles: the same structure twice, then other alphas, then a NaN alpha (a small tensor)
    pk = _kohya("sd1", "unet", "lora_unet_", attn, 4, torch.float16, n=3, seed=13)
    torch.save(pk, lib / "pk_a.pt")
    torch.save({k: v + 1 if not k.endswith(".alpha") else v for k, v in pk.items()}, lib / "pk_b.pt")
    torch.save({k: v * 2 if k.endswith(".alpha") else v for k, v in pk.items()}, lib / "pk_c.pt")
    torch.save(dict(pk, **{sorted(k for k in pk if k.endswith(".alpha"))[0]: torch.tensor(float("nan"))}),
               lib / "pk_nan.pt")
    # pickles the torch-free index declines (a transposed tensor: torch's loader reads them), and one cut short
    down = sorted(k for k in pk if k.endswith(".lora_down.weight"))[0]
    for i in range(2):
        torch.save(dict(pk, **{down: (pk[down].t() + i + 1).contiguous().t()}), lib / f"pk_t{i}.pt")
    (lib / "pk_cut.pt").write_bytes((lib / "pk_a.pt").read_bytes()[:-200])
    # PEFT files whose alphas come from adapter_config.json (no memo for those)
    for i in range(2):
        sd = {}
        for j, (p, info) in enumerate(x for x in arch_layout("sd1")["unet"].items() if "attn2.to_k" in x[0]):
            if j < 3:
                sd[f"unet.{p}.lora_A.weight"] = torch.randn(4, info.weight_shape[1]).half()
                sd[f"unet.{p}.lora_B.weight"] = torch.randn(info.weight_shape[0], 4).half()
        save_file(sd, lib / "peft" / f"peft_{i}.safetensors")
    (lib / "peft" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')

    library.READS.clear()
    memo = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    hits = library.READS["memo"]
    monkeypatch.setattr(library, "MEMO_TENSORS", 1)  # one structure remembered at a time
    library._MEMO["ready"] = None  # (forgotten: the next scan starts afresh)
    small = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    assert json.dumps(small["rows"]) == json.dumps(memo["rows"]) and len(library._MEMO["structs"]) == 1
    monkeypatch.setattr(library, "STRUCTURE_MEMO", False)
    library.READS.clear()
    plain = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    assert library.READS["memo"] == 0
    assert json.dumps(memo["rows"]) == json.dumps(plain["rows"])  # the same rows, keys in the same order
    assert memo["stats"] == plain["stats"]
    assert hits >= 9, hits  # same_0, 1, 4, 5 (same_2, 3: other hints), the copy, ia3_out2, custom_plain2, pk_b, pk_t1
    rows = {r["name"]: r for r in memo["rows"]}
    assert rows["same_1"]["alphas"] == {"2": 3, "3": 2} and rows["same_1"]["hash_source"] == "metadata"  # (a copy: compared, not hashed)
    assert rows["same_3"]["alphas"] == {"-0": 3, "1": 2}
    assert rows["same_0"]["triggers"] == ["style", "1girl"] and rows["same_4"]["triggers"] == ["a", "b"]
    assert rows["nan_alpha"]["problems"][0].startswith("NaN/Inf") and rows["cut"]["problems"][0].startswith("unreadable")
    assert rows["twice_named"]["problems"][0].startswith("unreadable")
    assert rows["ia3_out"]["applied_keys"] == 2 and rows["ia3_in"]["applied_keys"] == 0
    assert rows["custom_hint"]["base_model"] == "sdxl" and rows["custom_plain2"]["base_model"] == "unknown"
    assert rows["copy"]["duplicates"] and rows["peft_0"]["alphas"] == {"8": 3}
    assert rows["pk_b"]["alphas"] == rows["pk_a"]["alphas"] != rows["pk_c"]["alphas"]
    assert rows["pk_nan"]["problems"][0].startswith("NaN/Inf") and not rows["pk_a"]["problems"]
    assert rows["pk_t1"]["alphas"] == rows["pk_a"]["alphas"] and rows["pk_cut"]["problems"][0].startswith("unreadable")
    monkeypatch.setattr(library, "STRUCTURE_MEMO", True)
    monkeypatch.setenv("LORA_EXT_NO_FAST_INSPECT", "1")
    _reset()
    try:
        full = library.scan_library([str(lib)], jobs=1, cache_path=None, progress=False)
    finally:
        monkeypatch.delenv("LORA_EXT_NO_FAST_INSPECT")
        _reset()
    assert full["rows"] == memo["rows"]

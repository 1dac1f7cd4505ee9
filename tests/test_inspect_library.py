"""issue 13: inspect any LoRA against any base (types from the file alone, grouped accounting,
``--base``), and library mode (rows, duplicates, problems, the per-file cache)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lora_ext import library
from lora_ext.cli import main
from lora_ext.inspect import inspect_lora, render_text
from tiny_models import save_pipeline, tiny_text_encoder, tiny_unet


def _weights(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _kohya_loha(unet, rank=4, alpha=2.0, seed=0, prefix="lora_unet_"):
    """LyCORIS LoHa for a (custom) UNet with kohya names, as sd-scripts + lycoris.kohya write it."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in _weights(unet):
        out, inn = m.weight.shape[0], m.weight[0].numel()
        p = prefix + name.replace(".", "_")
        sd[p + ".hada_w1_a"] = torch.randn(out, rank, generator=g)
        sd[p + ".hada_w1_b"] = torch.randn(rank, inn, generator=g)
        sd[p + ".hada_w2_a"] = torch.randn(out, rank, generator=g)
        sd[p + ".hada_w2_b"] = torch.randn(rank, inn, generator=g)
        sd[p + ".alpha"] = torch.tensor(alpha)
    return sd


LOHA_META = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}',
             "ss_network_dim": "4", "ss_network_alpha": "2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    unet, te = tiny_unet(), tiny_text_encoder()
    save_pipeline(folder / "base", unet, te)
    loha = folder / "loha_custom.safetensors"
    save_file(_kohya_loha(unet), loha, LOHA_META)
    return {"base": folder / "base", "loha": loha, "n": len(_weights(unet)), "unet": unet, "te": te}


# --- types without a base ---------------------------------------------------------------------
def test_loha_for_a_custom_unet_is_named_without_a_base(tiny, capsys):
    n = tiny["n"]
    info = inspect_lora(tiny["loha"])
    assert info["base_model"] == "unknown"
    assert info["types"] == {"loha": n} and info["typed_modules"] == n
    assert info["ranks"] == {"4": n} and info["alphas"] == {"2": n} and info["components"] == {"unet": n}
    assert info["keys"] == 5 * n and len(info["unmatched"]) == 5 * n  # JSON keeps every key
    ev = info["base_model_evidence"]
    assert f"{n} typed modules of {n}" in ev and "distinct weight shapes" in ev
    assert "closest known family SD1.x" in ev and "0 fit by shape" in ev
    assert main(["inspect", str(tiny["loha"])]) == 0
    out = capsys.readouterr().out
    assert f"loha: {n}  ({n} modules, {5 * n} keys" in out
    # grouped, not one line per key
    assert f"{n} modules ({5 * n} keys): " in out and len(out.splitlines()) < 40
    assert main(["inspect", "--keys", str(tiny["loha"])]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in (u["key"] for u in info["unmatched"]))


def test_base_binds_every_key_of_the_custom_loha(tiny, capsys):
    n = tiny["n"]
    info = inspect_lora(tiny["loha"], base=tiny["base"])
    assert info["unmatched"] == [] and info["modules"] == n and info["applied_keys"] == 5 * n
    assert info["bound_to_path"] == str(tiny["base"]) and info.get("wrong_base") is None
    assert sum(info["blocks"].values()) == n and "M00" in info["blocks"]
    assert main(["inspect", "--base", str(tiny["base"]), str(tiny["loha"])]) == 0
    out = capsys.readouterr().out
    assert "not applied:  none" in out and f"{n} modules ({5 * n} keys) apply to base (custom)" in out


def test_a_bad_base_is_one_line(tiny, tmp_path, capsys):
    assert main(["inspect", "--base", str(tmp_path / "nope"), str(tiny["loha"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_grouped_accounting_by_reason_and_module(tiny, tmp_path, capsys):
    """A LoHa trained for another width: every module has a name of the tiny base but not its
    shape; plus two modules the base has not got at all."""
    sd = _kohya_loha(tiny_unet(), seed=3)
    wide = {}
    for k, v in sd.items():
        if k.endswith(("hada_w1_a", "hada_w2_a")):
            v = torch.randn(v.shape[0] * 2, v.shape[1])  # twice the output rows: no module has that shape
        wide[k] = v
    for name in ("lora_unet_extra_block_0_proj", "lora_unet_extra_block_1_proj"):
        wide[name + ".lora_down.weight"] = torch.randn(2, 8)
        wide[name + ".lora_up.weight"] = torch.randn(8, 2)
    path = tmp_path / "wide.safetensors"
    save_file(wide, path)
    n = tiny["n"]
    info = inspect_lora(path, base=tiny["base"])
    groups = {g["reason"]: g for g in info["not_applied"]}
    shape = groups["no module of this shape in base (custom)"]
    assert shape["modules"] == n and shape["keys"] == 5 * n and len(shape["examples"]) == 3
    assert "shape mismatch" in shape["examples"][0]["detail"]
    missing = groups["no such module in base (custom)"]
    assert missing["modules"] == 2 and missing["keys"] == 4
    assert sum(g["keys"] for g in info["not_applied"]) == len(info["unmatched"]) == 5 * n + 4
    assert info["wrong_base"] and info["types"] == {"lora": 2, "loha": n}
    text = render_text(info)
    assert f"{n} modules ({5 * n} keys): no module of this shape in base (custom)" in text
    assert "2 modules (4 keys): no such module in base (custom)" in text
    assert "WRONG BASE:" in text


def test_a_group_no_type_claims_is_reported_per_group(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"lora_unet_custom_block_proj.weird_a": torch.randn(24, 3),
               "lora_unet_custom_block_proj.weird_b": torch.randn(3, 40),
               "lora_unet_other_block.zz": torch.randn(5, 6, 7)}, path)
    info = inspect_lora(path)
    un = {u["module"]: u for u in info["unclaimed_groups"]}
    assert set(un) == {"lora_unet_custom_block_proj", "lora_unet_other_block"}
    assert "low-rank pair by shape" in un["lora_unet_custom_block_proj"]["tried"]
    assert "rank 3, makes (24, 40)" in un["lora_unet_custom_block_proj"]["tried"]
    assert "full weight diff" in un["lora_unet_other_block"]["tried"]
    assert "UNCLAIMED:    lora_unet_custom_block_proj (2 keys)" in render_text(info)


# --- files the peers write for the tiny model ----------------------------------------------------
LYCORIS_ALGOS = {"locon": ("lora", 4), "loha": ("loha", 4), "lokr": ("lokr", None), "full": ("full", None),
                 "ia3": ("ia3", None)}


@pytest.mark.parametrize("algo", list(LYCORIS_ALGOS))
def test_lycoris_files_are_named_and_apply_to_their_base(tiny, tmp_path, algo):
    lycoris = pytest.importorskip("lycoris")
    from tiny_models import load_pipeline

    unet, te = load_pipeline(tiny["base"])
    kw = dict(algo=algo, factor=4) if algo == "lokr" else dict(algo=algo)
    for model, name in ((unet, "unet"), (te, "te")):
        net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3, conv_dim=4, conv_alpha=2, **kw)
        net.apply_to()
        path = tmp_path / f"{name}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        prefixes = {k.rsplit(".", 1)[0] if algo != "locon" else k.split(".")[0] for k in
                    __import__("safetensors.torch", fromlist=["load_file"]).load_file(path)}
        prefixes = {p.split(".")[0] for p in prefixes}
        want_type, want_rank = LYCORIS_ALGOS[algo]
        info = inspect_lora(path)
        assert list(info["types"]) == [want_type], info["types"]
        assert info["typed_modules"] == len(prefixes) == info["types"][want_type]
        if want_rank:
            assert info["ranks"] == {str(want_rank): len(prefixes)}
            assert set(info["alphas"]) <= {"2", "3"} and sum(info["alphas"].values()) == len(prefixes)
        bound = inspect_lora(path, base=tiny["base"])
        assert bound["unmatched"] == [] and bound["modules"] == len(prefixes), bound["not_applied"][:2]


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_peft_files_are_named_and_apply_to_their_base(tiny, tmp_path, kind):
    peft = pytest.importorskip("peft")
    from tiny_models import load_pipeline

    _, te = load_pipeline(tiny["base"])
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    cfg = {"lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
           "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=targets),
           "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=targets)}[kind]()
    model = peft.get_peft_model(te, cfg)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    n = 2 * len(targets)
    info = inspect_lora(path)
    assert info["types"] == {kind: n} and info["typed_modules"] == n and info["components"] == {"te1": n}
    if kind == "lora":
        assert info["ranks"] == {"4": n} and info["alphas"] == {"8": n}  # alpha from adapter_config.json
    bound = inspect_lora(path, base=tiny["base"])
    assert bound["unmatched"] == [] and bound["modules"] == n


# --- library mode ----------------------------------------------------------------------------------
@pytest.fixture()
def lib(tiny, tmp_path):
    root = tmp_path / "loras"
    (root / "sd15" / "styles").mkdir(parents=True)
    (root / "custom").mkdir()
    (root / "broken").mkdir()
    assert main(["demo-files", str(root / "sd15")]) == 0
    shutil.copy(tiny["loha"], root / "custom" / "loha_custom.safetensors")
    # the same file under another name, in another folder
    shutil.copy(tiny["loha"], root / "sd15" / "styles" / "copy_of_loha.safetensors")
    # the same tensors under other key names (lycoris_ instead of lora_unet_) and other metadata
    sd = _kohya_loha(tiny["unet"])
    save_file({k.replace("lora_unet_", "lycoris_"): v for k, v in sd.items()}, root / "custom" / "renamed_keys.safetensors",
              {"ss_output_name": "something else"})
    # a pickle (through the safe loader) of another LoHa (other data)
    torch.save(_kohya_loha(tiny["unet"], seed=7), root / "custom" / "other_loha.pt")
    (root / "broken" / "truncated.safetensors").write_bytes(open(tiny["loha"], "rb").read()[:5000])
    data = open(tiny["loha"], "rb").read()  # header whole, data cut: found without reading the data
    (root / "broken" / "half.safetensors").write_bytes(data[: len(data) - 1000])
    (root / "broken" / "not_a_lora.safetensors").write_bytes(b"hello")
    bad = _kohya_loha(tiny["unet"], seed=9)
    bad[next(k for k in bad if k.endswith(".alpha"))] = torch.tensor(float("nan"))
    save_file(bad, root / "broken" / "nan_alpha.safetensors")
    (root / "notes.txt").write_text("not a LoRA")
    return root


def _by_name(result):
    return {r["name"]: r for r in result["rows"]}


def test_library_rows_duplicates_problems_and_cache(lib, tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    library.READS.clear()
    first = library.scan_library([lib], jobs=1, cache_path=str(cache), progress=False)
    reads = dict(library.READS)
    rows = _by_name(first)
    assert len(first["rows"]) == 13 and "notes" not in rows
    n = tiny["n"]
    assert rows["loha_custom"]["types"] == {"loha": n} and rows["loha_custom"]["base_model"] == "unknown"
    assert rows["other_loha"]["types"] == {"loha": n} and rows["other_loha"]["ranks"] == {"4": n}
    assert rows["watercolor_sdxl_loha"]["base_model"] == "sdxl" and rows["watercolor_sdxl_loha"]["problems"] == []
    assert rows["inkwash_sd15_lora"]["triggers"][:2] == ["inkwash style", "monochrome"]
    assert rows["odd_keys_sd15"]["problems"][0].startswith("2 keys (1 modules) not applied to SD1.x")
    assert rows["truncated"]["problems"][0].startswith("unreadable: ")
    assert rows["half"]["problems"][0].startswith("unreadable: truncated")
    assert rows["not_a_lora"]["problems"][0].startswith("unreadable: not a safetensors file")
    assert rows["nan_alpha"]["problems"][0].startswith("NaN/Inf: ") and "NaN" in rows["nan_alpha"]["problems"][0]
    # duplicates: the copy and the renamed keys hold the same tensors as loha_custom; other_loha does not
    dup = {os.path.basename(p) for p in rows["loha_custom"]["duplicates"]}
    assert dup == {"copy_of_loha.safetensors", "renamed_keys.safetensors"}
    assert any(p.startswith("duplicate of ") for p in rows["copy_of_loha"]["problems"])
    assert "duplicates" not in rows["other_loha"] and "duplicates" not in rows["inkwash_sd15_lora"]
    # duplicates are confirmed by comparing their bytes, not by hashing: A1111's hash is --full's
    assert rows["loha_custom"]["hash"] is None and rows["copy_of_loha"]["hash"] is None
    # data read: small tensors (alphas), 32-byte samples, and in full only the 3 duplicates
    assert first["stats"]["hashed"] == 3, first["stats"]
    assert reads["full"] == 3 * 5 * n  # every tensor of the three duplicates, nothing else

    # second run: nothing changed, so no tensor data and no tensor file is opened at all
    library.READS.clear()
    monkeypatch.setattr(library, "open_tensors", lambda *a, **k: pytest.fail("opened a tensor file"))
    second = library.scan_library([lib], jobs=1, cache_path=str(cache), progress=False)
    assert sum(library.READS.values()) == 0 and second["stats"]["cached"] == 13
    assert second["rows"] == first["rows"]
    monkeypatch.undo()

    # a changed file is scanned again, the rest comes from the cache
    save_file(_kohya_loha(tiny["unet"], seed=11), lib / "custom" / "loha_custom.safetensors", LOHA_META)
    third = library.scan_library([lib], jobs=1, cache_path=str(cache), progress=False)
    assert third["stats"]["cached"] == 12 and third["stats"]["scanned"] == 1
    rows3 = _by_name(third)
    assert "duplicates" not in rows3["loha_custom"]
    assert {os.path.basename(p) for p in rows3["copy_of_loha"]["duplicates"]} == {"renamed_keys.safetensors"}


def test_library_with_base_flags_wrong_base_and_parallel_matches(lib, tiny, tmp_path, capsys):
    from lora_ext.inspect_any import BaseModelRef

    base = BaseModelRef(tiny["base"])
    one = library.scan_library([lib], base=base, jobs=1, cache_path=None, progress=False)
    two = library.scan_library([lib], base=base, jobs=2, cache_path=None, progress=False)
    assert sorted(map(json.dumps, one["rows"])) == sorted(map(json.dumps, two["rows"]))
    rows = _by_name(one)
    assert rows["loha_custom"]["problems"] == [p for p in rows["loha_custom"]["problems"] if "duplicate" in p or "same" in p]
    assert rows["loha_custom"]["applied_keys"] == 5 * tiny["n"]
    assert any(p.startswith("wrong base: made for SDXL") for p in rows["watercolor_sdxl_loha"]["problems"])
    # the CLI: table (default for a folder), CSV and JSON lines
    assert main(["inspect", str(lib), "--base", str(tiny["base"]), "--no-cache", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["NAME", "BASE", "TYPES", "RANKS"] and "wrong base" in out
    assert main(["inspect", str(lib), "--csv", "--no-cache", "--jobs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name,base,types") and len(lines) == 14
    assert main(["inspect", str(lib), "--json", "--no-cache", "--jobs", "1"]) == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(objs) == 13 and all("problems" in o for o in objs)


def test_library_full_finds_nan_in_big_tensors(tiny, tmp_path):
    root = tmp_path / "l"
    root.mkdir()
    sd = _kohya_loha(tiny["unet"], seed=5)
    sd[next(k for k in sd if k.endswith("hada_w1_b"))][0, 0] = float("inf")
    save_file(sd, root / "inf.safetensors")
    quick = library.scan_library([root], jobs=1, cache_path=None, progress=False)
    assert not any("NaN/Inf" in p for p in quick["rows"][0]["problems"])  # big tensors are not read
    full = library.scan_library([root], jobs=1, cache_path=None, progress=False, full=True)
    row = full["rows"][0]
    assert any(p.startswith("NaN/Inf: ") and "Inf" in p for p in row["problems"])
    assert row["hash_source"] == "computed" and len(row["hash"]) == 12


def test_library_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty"), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no LoRA files") and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "empty"), str(tmp_path / "missing"), "--no-cache"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(algo="locon", use_tucker=True), dict(algo="lokr", factor=4, use_tucker=True,
                                decompose_both=True), dict(algo="loha", dora_wd=True),
                                dict(algo="locon", dora_wd=True, wd_on_output=False), dict(algo="diag-oft", block_size=4),
                                dict(algo="boft", block_size=4), dict(algo="glora"), dict(algo="locon", train_norm=True)],
                         ids=["locon-tucker", "lokr-tucker", "dora-loha", "dora-in", "diag-oft", "boft", "glora", "norms"])
def test_library_reading_by_shapes_reports_what_a_full_load_does(tiny, tmp_path, kw):
    """Library mode builds adapters on meta tensors (no tensor data): for every type the report
    must equal the one from the real tensors."""
    lycoris = pytest.importorskip("lycoris")
    from lora_ext.inspect_any import inspect_any
    from lora_ext.network import load_lora

    net = lycoris.create_lycoris(tiny_unet(), 1.0, linear_dim=4, linear_alpha=3, conv_dim=4, conv_alpha=2, **kw)
    net.apply_to()
    path = str(tmp_path / "x.safetensors")
    net.save_weights(path, torch.float32, {})
    fields = ("types", "typed_modules", "ranks", "alphas", "components", "base_model", "unmatched", "not_applied")
    library.READS.clear()
    by_shape = inspect_any(path, None, lora=library.load_lora_shapes(path), addnet=False)
    assert library.READS["full"] == 0
    full = inspect_any(path, None, lora=load_lora(path), addnet=False)
    assert {k: by_shape[k] for k in fields} == {k: full[k] for k in fields}
    assert by_shape["typed_modules"] > 0


def test_base_can_be_a_tiny_dit_single_file(tmp_path):
    """--base with a tiny Flux single file (original layout, fused qkv): a diffusers-named LoRA
    for that model applies in full; without --base the types are still named."""
    pytest.importorskip("diffusers")
    from dit_models import dit_table, original_state, tiny as tiny_dit

    model = tiny_dit("flux")
    table = dit_table(model)
    save_file(original_state(model, table), tmp_path / "flux_tiny.safetensors")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for path, info in table.items():
        if info.kind == "linear" and path.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            out, inn = info.weight_shape
            sd[f"transformer.{path}.lora_A.weight"] = torch.randn(2, inn, generator=g)
            sd[f"transformer.{path}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    save_file(sd, tmp_path / "lora.safetensors")
    n = len(sd) // 2
    alone = inspect_lora(tmp_path / "lora.safetensors")
    assert alone["types"] == {"lora": n} and alone["ranks"] == {"2": n} and alone["modules"] == 0
    bound = inspect_lora(tmp_path / "lora.safetensors", base=tmp_path / "flux_tiny.safetensors")
    assert bound["unmatched"] == [] and bound["modules"] == n and bound.get("wrong_base") is None
    assert any(b.startswith("D") for b in bound["blocks"]) and any(b.startswith("S") for b in bound["blocks"])


def test_library_rows_the_same_with_two_worker_processes(lib, tmp_path):
    """Worker processes (each with its own structure memo, sampling as they scan) give the rows
    of one process."""
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork")
    one = library.scan_library([lib], jobs=1, cache_path=None, progress=False)
    two = library.scan_library([lib], jobs=2, cache_path=None, progress=False)
    assert one["stats"].pop("jobs") == 1 and two["stats"].pop("jobs") == 2
    assert two["rows"] == one["rows"] and two["stats"] == one["stats"]


def test_duplicates_found_by_bytes_across_runs_and_separate_scans(tiny, tmp_path):
    """A byte comparison's token lives in the cache: a copy added later is compared with the
    cached file; two identical files classed in separate scans (two tokens) are still found
    to be the same (by their tensors); a file with the same shapes and samples but other data
    further on is not a duplicate."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    sd = _kohya_loha(tiny["unet"], seed=21)
    save_file(sd, a / "one.safetensors", LOHA_META)
    other = {k: v.clone() for k, v in sd.items()}
    big = max(other, key=lambda k: other[k].numel())
    other[big].view(-1)[-1] += 1.0  # past the 32-byte sample: same shapes, same samples
    save_file(other, a / "near.safetensors", LOHA_META)
    cache = str(tmp_path / "c.json")
    first = _by_name(library.scan_library([a], jobs=1, cache_path=cache, progress=False))
    assert "duplicates" not in first["one"] and "duplicates" not in first["near"]

    shutil.copy(a / "one.safetensors", a / "one_again.safetensors")
    library.READS.clear()
    second = _by_name(library.scan_library([a], jobs=1, cache_path=cache, progress=False))
    assert {os.path.basename(p) for p in second["one_again"]["duplicates"]} == {"one.safetensors"}
    assert "duplicates" not in second["near"]
    assert library.READS["full"] > 0  # compared now, with the cached file

    # the same file scanned on its own into the same cache gets a token of its own
    shutil.copy(a / "one.safetensors", b / "elsewhere.safetensors")
    library.scan_library([b], jobs=1, cache_path=cache, progress=False)
    both = _by_name(library.scan_library([a, b], jobs=1, cache_path=cache, progress=False))
    assert {os.path.basename(p) for p in both["elsewhere"]["duplicates"]} == {"one.safetensors",
                                                                             "one_again.safetensors"}
    assert "duplicates" not in both["near"]


def test_header_changed_in_place_with_size_and_mtime_kept_is_scanned_again(tiny, tmp_path):
    """The cache keys by size, mtime and the header's checksum: a header edited in place (same
    length) with the old mtime put back is read again."""
    root = tmp_path / "h"
    root.mkdir()
    f = root / "one.safetensors"
    save_file(_kohya_loha(tiny["unet"], seed=31), f, dict(LOHA_META, ss_output_name="alpha_style"))
    cache = str(tmp_path / "c.json")
    first = library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    st = os.stat(f)
    data = bytearray(f.read_bytes())
    i = data.index(b"alpha_style")
    data[i:i + 11] = b"omega_style"
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    second = library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    assert first["stats"]["scanned"] == 1 and second["stats"].get("cached", 0) == 0 and second["stats"]["scanned"] == 1


def test_warm_scan_trusts_an_unchanged_inode_and_reads_a_changed_one(tiny, tmp_path, monkeypatch):
    """A file whose inode and change time are those cached (well before that scan) is not read
    at all; one written in place with its size and mtime put back has moved its change time and
    is read again; a file changed too close to the scan that cached it is always checked."""
    import time

    root = tmp_path / "c"
    root.mkdir()
    for i in range(3):
        save_file(_kohya_loha(tiny["unet"], seed=40 + i), root / f"f{i}.safetensors", dict(LOHA_META, **{"modelspec.trigger_phrase": "alpha_style"}))
    cache = str(tmp_path / "c.json")
    calls = []
    real = library.header_hash
    monkeypatch.setattr(library, "header_hash", lambda p: calls.append(os.path.basename(p)) or real(p))
    library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    assert len(calls) == 3
    calls.clear()  # just written: their change times are too close to that scan to be trusted
    again = library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    assert len(calls) == 3 and again["stats"]["cached"] == 3
    monkeypatch.setattr(library, "CHANGE_TIME_SLACK_NS", 0)
    if os.name != "posix":
        return
    time.sleep(0.05)
    first = library.scan_library([root], jobs=1, cache_path=cache, progress=False)  # (seen again, trusted from now)
    calls.clear()
    warm = library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    assert calls == [] and warm["stats"]["cached"] == 3 and warm["rows"] == first["rows"]
    f = root / "f1.safetensors"
    st = os.stat(f)
    data = bytearray(f.read_bytes())
    i = data.index(b"alpha_style")
    data[i:i + 11] = b"omega_style"
    time.sleep(0.05)
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = library.scan_library([root], jobs=1, cache_path=cache, progress=False)
    assert calls == ["f1.safetensors"] and after["stats"]["cached"] == 2 and after["stats"]["scanned"] == 1
    assert [r["triggers"] for r in after["rows"]] == [["alpha_style"], ["omega_style"], ["alpha_style"]]

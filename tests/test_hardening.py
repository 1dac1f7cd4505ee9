"""Issue 17: hostile inputs. Every case is built here; each must end with a non-zero exit, one
stderr line naming the file or argument, nothing written, the base unchanged, and within a
(generous) time bound."""
from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from lora_ext.cli import main

from test_io import snapshot, st_bytes

TIME_BOUND = 30.0  # CPU seconds: generous, a hang shows as minutes
WALL_FACTOR = 8  # wall-clock may be longer on a machine shared with other work


def run_cli(argv, capsys, *, folder, expect=(), bound=TIME_BOUND, code_ok=(1, 2)):
    """main(argv) must fail with one stderr line holding every ``expect`` fragment, write
    nothing under ``folder`` and return within ``bound`` seconds. Returns the line."""
    before = snapshot(folder)
    capsys.readouterr()
    t0, c0 = time.monotonic(), time.process_time()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    took, cpu = time.monotonic() - t0, time.process_time() - c0
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code in code_ok, (argv, code, out.err)
    assert len(lines) == 1, (argv, out.err)
    assert lines[0].startswith("error: "), lines
    for frag in expect:
        assert frag in lines[0], (frag, lines[0])
    assert snapshot(folder) == before, argv
    assert cpu < bound and took < bound * WALL_FACTOR, (argv, cpu, took)
    return lines[0]


def write_st(path, header, data=b""):
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


# ---------------------------------------------------------------------------------------------
# item 3 / 4 / 5: what the safetensors header alone can do


def _header_cases(tmp_path):
    """name -> (file bytes or a writer, fragments of the error)."""
    cases = {}
    # two million dimensions (math.prod over the list ran past 90 s)
    cases["dims_2m"] = (st_bytes({"a": {"dtype": "F32", "shape": [1] * 2_000_000, "data_offsets": [0, 4]}},
                                 b"\0" * 4), ["2000000 dimensions", "16 allowed"])
    cases["dims_65"] = (st_bytes({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4),
                        ["65 dimensions"])
    # a zero-size tensor with a 2**63+ dimension (torch.empty overflowed)
    cases["dim_2_63"] = (st_bytes({"a": {"dtype": "F32", "shape": [0, 2 ** 63 + 5], "data_offsets": [0, 0]}}),
                         ["2**50 limit"])
    cases["stride_overflow"] = (st_bytes({"a": {"dtype": "F32", "shape": [0, 2 ** 40, 2 ** 40, 2 ** 40],
                                                "data_offsets": [0, 0]}}), ["2**50 limit"])
    # a dimension of 5000 digits: formatting it in the error raised
    big = "9" * 5000
    cases["digits"] = (st_bytes('{"a":{"dtype":"F32","shape":[' + big + '],"data_offsets":[0,4]}}', b"\0" * 4),
                       ["not valid JSON"])
    cases["digits_offsets"] = (st_bytes({"a": {"dtype": "F32", "shape": [1] * 16 + [0] * 0,
                                               "data_offsets": [0, 2 ** 4000]}}), ["invalid data_offsets"])
    # a repeated tensor name: json.loads keeps the last; safetensors refuses the file
    cases["duplicate"] = (st_bytes('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                   '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
                          ["'a' appears more than once"])
    # holes in the data area
    cases["hole_between"] = (st_bytes({"a": F32, "b": dict(F32, data_offsets=[8, 12])}, b"\0" * 12),
                             ["hole in the data area", "bytes 4..8"])
    cases["hole_at_start"] = (st_bytes({"a": dict(F32, data_offsets=[4, 8])}, b"\0" * 8),
                              ["hole at the start"])
    # 1.5 million zero-size entries (an 87 MB header ran past 90 s)
    many = ",".join(f'"k{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1_500_000))
    cases["zero_size_1_5m"] = (st_bytes("{" + many + "}"), ["1500000 tensors", "100000 allowed"])
    # complex factors: the imaginary part was dropped
    cases["complex"] = (None, ["is complex"])
    return cases


HEADER_CASES = ["dims_2m", "dims_65", "dim_2_63", "stride_overflow", "digits", "digits_offsets", "duplicate",
                "hole_between", "hole_at_start", "zero_size_1_5m", "complex"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_header_attacks_inspect_and_merge(tmp_path, capsys, case):
    from test_merge import SD1_MODULES, _weights, write_single_file

    data, frags = _header_cases(tmp_path)[case]
    lora = tmp_path / "bad.safetensors"
    if case == "complex":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320, dtype=torch.complex64),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4, dtype=torch.complex64)},
                  str(lora))
    else:
        lora.write_bytes(data)
    base = tmp_path / "base.safetensors"
    write_single_file(base, "sd1", _weights("sd1", SD1_MODULES[:3], torch.float32))
    run_cli(["inspect", lora], capsys, folder=tmp_path, expect=[str(lora)] + frags)
    run_cli(["merge", "--base", base, "--lora", lora, "--out", tmp_path / "out.safetensors"], capsys,
            folder=tmp_path, expect=[str(lora)] + frags)
    if case != "complex":
        # the same header as a base checkpoint
        os.replace(lora, tmp_path / "badbase.safetensors")
        good = tmp_path / "good.safetensors"
        from test_merge import write_kohya_lora
        write_kohya_lora(good, "sd1", SD1_MODULES[:2])
        run_cli(["merge", "--base", tmp_path / "badbase.safetensors", "--lora", good, "--out",
                 tmp_path / "out.safetensors"], capsys, folder=tmp_path, expect=["badbase.safetensors"] + frags)


def test_twenty_thousand_trivial_modules_inspect_in_time(tmp_path, capsys):
    """20,000 1x1 modules (a 6 MB file): inspect took 51-90 s; now linear, a few seconds."""
    hdr, off = {}, 0
    for i in range(20_000):
        for n in ("lora_down.weight", "lora_up.weight", "alpha"):
            hdr[f"lora_unet_m{i}.{n}"] = {"dtype": "F32", "shape": [] if n == "alpha" else [1, 1],
                                           "data_offsets": [off, off + 4]}
            off += 4
    p = tmp_path / "many.safetensors"
    write_st(p, hdr, struct.pack("<f", 1.0) * (off // 4))
    capsys.readouterr()
    t0, c0 = time.monotonic(), time.process_time()
    assert main(["inspect", "--json", str(p)]) == 0
    took, cpu = time.monotonic() - t0, time.process_time() - c0
    info = json.loads(capsys.readouterr().out)
    assert info["keys"] == 60_000 and len(info["unmatched"]) == 60_000
    assert cpu < 60 and took < 60 * WALL_FACTOR, (cpu, took)


# ---------------------------------------------------------------------------------------------
# item 4 / 5: PEFT configs and kohya alphas

PROJ_IN = "down_blocks.0.attentions.0.proj_in"


def _peft_lora(path, cfg=None, a_shape=(4, 320)):
    sd = {f"unet.{PROJ_IN}.lora_A.weight": torch.ones(a_shape) * 0.01,
          f"unet.{PROJ_IN}.lora_B.weight": torch.ones(320, 4) * 0.01}
    meta = None if cfg is None else {"lora_adapter_metadata": cfg if isinstance(cfg, str) else json.dumps(cfg)}
    save_file(sd, str(path), metadata=meta)


PEFT_CASES = {
    "alpha_abc": ({"unet.r": 4, "unet.lora_alpha": "abc"}, ["unet.lora_alpha is 'abc', not a number"]),
    "alpha_list": ({"unet.r": 4, "unet.lora_alpha": [1]}, ["unet.lora_alpha is a JSON array"]),
    "r_string_0": ({"unet.r": "0", "unet.lora_alpha": 4}, ["unet.r is '0'"]),
    "r_0": ({"r": 0, "lora_alpha": 4}, ["r is 0, not a whole number"]),
    "rank_pattern_list": ({"r": 4, "lora_alpha": 4, "rank_pattern": [1, 2]}, ["rank_pattern is a JSON array"]),
    "alpha_pattern_text": ({"r": 4, "alpha_pattern": {"proj_in": "x"}}, ["alpha_pattern['proj_in'] is 'x'"]),
    "alpha_nan": ('{"r": 4, "lora_alpha": NaN}', ["lora_alpha is nan, not a finite number"]),
    "alpha_1e308": ({"r": 4, "lora_alpha": 1e308}, ["lora_alpha is 1e+308, beyond the limit"]),
    "deep": ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    "nested_component": ({"unet": {"r": 4, "lora_alpha": {"x": 1}}}, ["unet: lora_alpha is a JSON object"]),
    "rslora_text": ({"r": 4, "lora_alpha": 4, "use_rslora": "yes"}, ["use_rslora is 'yes'"]),
    "not_json": ("{r: 4", ["not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_metadata_config_errors(tmp_path, capsys, case):
    cfg, frags = PEFT_CASES[case]
    lora = tmp_path / "peft.safetensors"
    _peft_lora(lora, cfg)
    run_cli(["inspect", lora], capsys, folder=tmp_path, expect=[f"{lora}: metadata lora_adapter_metadata: "] + frags)


@pytest.mark.parametrize("text,frag", [
    ("[1, 2]", "the config is a JSON array, not an object"),
    ('{"r": 4, "lora_alpha": "abc"}', "lora_alpha is 'abc'"),
    ('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("\udcff{", "not UTF-8 text"),
])
def test_peft_adapter_config_json_errors(tmp_path, capsys, text, frag):
    lora = tmp_path / "adapter_model.safetensors"
    _peft_lora(lora)
    side = tmp_path / "adapter_config.json"
    side.write_bytes(text.encode("utf-8", "surrogateescape"))
    run_cli(["inspect", lora], capsys, folder=tmp_path, expect=[f"{side}: ", frag])


def test_peft_zero_dim_lora_a_is_reported_not_a_traceback(tmp_path, capsys):
    lora = tmp_path / "peft.safetensors"
    _peft_lora(lora, {"r": 4, "lora_alpha": 4}, a_shape=())
    capsys.readouterr()
    assert main(["inspect", "--json", str(lora)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == 0 and len(info["unmatched"]) == 2


@pytest.mark.parametrize("alpha,frag", [
    (torch.ones(2), "holds 2 values"),
    (torch.tensor([0, 0, 64, 64], dtype=torch.uint8), "holds 4 values"),  # a float's bytes
    (torch.tensor(True), "has dtype bool"),
    (torch.tensor(1e38), "beyond the limit"),
    (torch.tensor(2 ** 62), "beyond the limit"),
])
def test_kohya_alpha_errors(tmp_path, capsys, alpha, frag):
    from test_merge import SD1_MODULES, _weights, write_single_file

    lora = tmp_path / "k.safetensors"
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{prefix}.lora_down.weight": torch.ones(4, 320), f"{prefix}.lora_up.weight": torch.ones(320, 4),
               f"{prefix}.alpha": alpha}, str(lora))
    base = tmp_path / "base.safetensors"
    write_single_file(base, "sd1", _weights("sd1", SD1_MODULES[:3], torch.float32))
    for argv in (["inspect", lora], ["merge", "--base", base, "--lora", lora, "--out", tmp_path / "o.safetensors"]):
        run_cli(argv, capsys, folder=tmp_path, expect=[f"{lora}: tensor '{prefix}.alpha' (alpha)", frag])


# ---------------------------------------------------------------------------------------------
# item 4 / 5 / 7: generate's arguments, refused before anything is loaded


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels (a decompression bomb needs no more to be refused)."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                 + chunk(b"IEND", b""))


GENERATE_CASES = [
    (["--width", "-16"], "--width: -16 is out of range"),
    (["--width", "0"], "--width: 0 is out of range"),
    (["--height", "1000000"], "--height: 1000000 is out of range"),
    (["--cfg", "nan"], "--cfg: nan is not a finite number"),
    (["--cfg", "inf"], "--cfg: inf is not a finite number"),
    (["--denoise", "2"], "--denoise: 2 is out of range"),
    (["--steps", "0"], "--steps: 0 is out of range"),
    (["--steps", "99999999"], "--steps: 99999999 is out of range"),
    (["--batch", "0"], "--batch: 0 is out of range"),
    (["--seed", "-1"], "--seed: -1 is out of range"),
    (["--eta", "nan"], "--eta: nan is not a finite number"),
    (["--device", "quantum"], "--device: 'quantum' is not a device"),
    (["--init-image", "{tmp}/missing.png"], "--init-image: {tmp}/missing.png: no such file"),
    (["--init-image", "{tmp}/text.png"], "not an image PIL can read"),
    (["--init-image", "{tmp}/bomb.png"], "too many pixels"),
    (["--init-image", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/nowhere/x.png"], "--out: {tmp}/nowhere/x.png: the folder"),
    (["--width", "x"], "argument --width: invalid int value: 'x'"),
    (["--sampler"], "argument --sampler: expected one argument"),
]


@pytest.mark.parametrize("extra,frag", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_argument_errors(tmp_path, capsys, extra, frag):
    (tmp_path / "text.png").write_bytes(b"hello, not a png")
    _png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    ckpt = tmp_path / "model.safetensors"  # never read: the arguments are refused first
    argv = ["generate", "--checkpoint", ckpt, "--prompt", "a cat", "--out", tmp_path / "out"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    run_cli(argv, capsys, folder=tmp_path, expect=[frag.format(tmp=tmp_path)], bound=20)
    assert not (tmp_path / "out").exists()


def test_generate_library_refuses_zero_size_and_nan_cfg():
    from lora_ext.sampler import generate

    with pytest.raises(ValueError, match="width must be positive"):
        generate("unused.safetensors", "x", width=0)
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        generate("unused.safetensors", "x", cfg=float("nan"))


# ---------------------------------------------------------------------------------------------
# item 4 / 5 / 7: merge outputs checked first, folder bases, empty LoRAs


@pytest.fixture
def sd1_files(tmp_path):
    from test_merge import SD1_MODULES, _weights, write_diffusers_folder, write_kohya_lora, write_single_file

    weights = _weights("sd1", SD1_MODULES[:3], torch.float32)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", weights)
    folder = tmp_path / "pipe"
    write_diffusers_folder(str(folder), "sd1", weights)
    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES[:2])
    return single, folder, lora


@pytest.mark.parametrize("which", ["single", "folder"])
@pytest.mark.parametrize("case", ["missing_folder", "name_too_long", "out_is_a_file_folder", "inside_base", "no_room"])
def test_merge_output_checked_before_any_work(tmp_path, capsys, monkeypatch, sd1_files, which, case):
    import lora_ext.merge as lmerge

    single, folder, lora = sd1_files
    base = single if which == "single" else folder
    name = "out.safetensors" if which == "single" else "out"
    out, frag = {
        "missing_folder": (tmp_path / "no" / "such" / name, "does not exist"),
        "name_too_long": (tmp_path / ("x" * 250 + name), "file name is too long"),
        "out_is_a_file_folder": (tmp_path / "model.safetensors" / name, "is not a folder"),
        "inside_base": (folder / "sub" / name, "inside the base folder"),
        "no_room": (tmp_path / name, "GB free"),
    }[case]
    if case == "inside_base" and which == "single":
        pytest.skip("only a folder base has an inside")
    if case == "no_room":
        if which == "folder":
            pytest.skip("a folder output's size is not estimated")
        monkeypatch.setattr("lora_ext.io.shutil_disk_free", lambda folder: 1000)

    def no_work(*a, **k):
        raise AssertionError("the base was opened before the output was checked")

    monkeypatch.setattr(lmerge, "open_checkpoint", no_work)
    run_cli(["merge", "--base", base, "--lora", lora, "--out", out], capsys, folder=tmp_path, expect=[frag], bound=10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_merge_output_folder_without_permission(tmp_path, capsys, sd1_files):
    single, folder, lora = sd1_files
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        run_cli(["merge", "--base", single, "--lora", lora, "--out", ro / "o.safetensors"], capsys,
                folder=tmp_path, expect=["no permission"])
    finally:
        ro.chmod(0o700)


def _write_config(folder, text):
    (folder / "unet" / "config.json").write_text(text)


@pytest.mark.parametrize("text,frag", [
    ("[1, 2, 3]", "config is an array, not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"block_out_channels": "abc", "in_channels": 4}', "cannot be used"),
    ('{"in_channels": "abc"}', "cannot be used"),
    ('{"layers_per_block": 1000000000}', "not a layer count"),
    ('{"block_out_channels": [' + ",".join(["320"] * 1000) + "]}", "lists 1000 items"),
    ("{nope", "cannot read config"),
])
def test_merge_folder_base_with_bad_config(tmp_path, capsys, sd1_files, text, frag):
    single, folder, lora = sd1_files
    _write_config(folder, text)
    run_cli(["merge", "--base", folder, "--lora", lora, "--out", tmp_path / "out"], capsys, folder=tmp_path,
            expect=[frag])


def test_folder_merge_copies_only_the_pipeline(tmp_path, capsys, sd1_files):
    """Unrelated files (a sparse 1 GB file) are not copied; a FIFO and a link loop are skipped
    with a note; the other weight variant of a rewritten component is left out."""
    single, folder, lora = sd1_files
    with open(folder / "huge.bin", "wb") as fh:
        fh.truncate(1 << 30)  # sparse
    os.mkfifo(folder / "unet" / "pipe.fifo")
    os.symlink("..", folder / "unet" / "loop")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(
        (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    out = tmp_path / "out"
    capsys.readouterr()
    c0 = time.process_time()
    assert main(["merge", "--base", str(folder), "--lora", str(lora), "--out", str(out)]) == 0
    assert time.process_time() - c0 < TIME_BOUND
    printed = capsys.readouterr().out
    assert "not copied (not part of the pipeline): huge.bin" in printed
    assert "unet/pipe.fifo (not a regular file)" in printed and "unet/loop (a link loop" in printed
    assert "fp16.safetensors (another variant of rewritten weights)" in printed
    assert not (out / "huge.bin").exists() and not (out / "unet" / "pipe.fifo").exists()
    assert not (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}"
    assert (out / "model_index.json").exists() and (out / "unet" / "config.json").exists()


def _empty_lora(path):
    write_st(path, {"__metadata__": {"ss_network_dim": "4"}})


def _rank0_lora(path):
    p = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{p}.lora_down.weight": torch.zeros(0, 320), f"{p}.lora_up.weight": torch.zeros(320, 0),
               f"{p}.alpha": torch.tensor(1.0)}, str(path))


def _zero_lora(path):
    p = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{p}.lora_down.weight": torch.ones(4, 320), f"{p}.lora_up.weight": torch.zeros(320, 4)}, str(path))


@pytest.mark.parametrize("make,strength,frag", [
    (_empty_lora, "", "holds no LoRA modules"),
    (_rank0_lora, "", "rank 0 or all-zero factors"),
    (_zero_lora, "", "rank 0 or all-zero factors"),
])
@pytest.mark.parametrize("which", ["single", "folder"])
def test_merge_of_a_lora_that_changes_nothing(tmp_path, capsys, sd1_files, make, strength, frag, which):
    single, folder, lora = sd1_files
    if make is not None:
        lora = tmp_path / "nothing.safetensors"
        make(lora)
    base = single if which == "single" else folder
    out = tmp_path / ("out.safetensors" if which == "single" else "out")
    run_cli(["merge", "--base", base, "--lora", f"{lora}{strength}", "--out", out], capsys, folder=tmp_path,
            expect=["changes nothing", frag, "--allow-empty"])
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--lora", f"{lora}{strength}", "--out", str(out), "--allow-empty"]) == 0
    assert out.exists()


# ---------------------------------------------------------------------------------------------
# item 6: report lines of the other tools escape text from files


def test_tool_reports_escape_control_characters(tmp_path, capsys):
    from test_merge import SD1_MODULES, write_kohya_lora
    from safetensors.torch import load_file

    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES[:2])
    sd = load_file(str(lora))
    sd["lora_unet_\x1b[2J\rFAKE: 0 keys not applied\n.lora_down.weight"] = torch.ones(2, 3)
    evil = tmp_path / "evil.safetensors"
    save_file(sd, str(evil))
    capsys.readouterr()
    code = main(["convert", str(evil), "--to", "peft", "--out", str(tmp_path / "out.safetensors")])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out and "\r" not in out
    assert "\\x1b[2J\\x0dFAKE: 0 keys not applied\\x0a" in out
    assert not any(line.startswith("FAKE") for line in out.splitlines())


def test_tool_report_json_path_checked_before_the_work(tmp_path, capsys, monkeypatch):
    from test_merge import SD1_MODULES, write_kohya_lora
    import lora_ext.tools as tools

    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES[:2])
    monkeypatch.setattr(tools, "convert", lambda *a, **k: pytest.fail("the work ran first"))
    run_cli(["convert", lora, "--to", "peft", "--out", tmp_path / "o.safetensors", "--report-json",
             tmp_path / "missing" / "r.json"], capsys, folder=tmp_path, expect=["does not exist"])


# ---------------------------------------------------------------------------------------------
# item 8: argument handling and --help load no heavy module


@pytest.mark.parametrize("argv", [
    ["--help"], ["merge", "--help"], ["generate", "--checkpoint", "c", "--prompt", "p", "--cfg", "nan"],
    ["generate", "--checkpoint", "c", "--prompt", "p", "--width", "0"], ["frobnicate"],
])
def test_cli_start_imports_no_torch(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom lora_ext.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL', 'numpy', 'safetensors') "
            "if m in sys.modules)\nprint('HEAVY', heavy)\n") % (argv,)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in res.stdout, (res.stdout, res.stderr)
    assert time.monotonic() - t0 < 20 * WALL_FACTOR


# ---------------------------------------------------------------------------------------------
# more of item 4: pickles, a full disk, a size that cannot be allocated


def test_pickle_bounds(tmp_path, capsys):
    p = tmp_path / "dims.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros([1] * 20)}, p)
    run_cli(["inspect", p], capsys, folder=tmp_path, expect=[str(p), "20 dimensions"])


def test_folder_merge_on_a_full_disk(tmp_path, capsys, monkeypatch, sd1_files):
    import errno
    import shutil as _shutil

    single, folder, lora = sd1_files
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_shutil, "copyfile", full)
    out = tmp_path / "out"
    run_cli(["merge", "--base", folder, "--lora", lora, "--out", out], capsys, folder=tmp_path,
            expect=[f"{out}: cannot save: No space left on device"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".lora-ext-")]


def test_generate_size_that_cannot_be_allocated(tmp_path, capsys, monkeypatch):
    import lora_ext.cli as cli

    def boom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes.\nmore")

    monkeypatch.setattr(cli, "_generate", boom)
    run_cli(["generate", "--checkpoint", tmp_path / "c.safetensors", "--prompt", "p", "--width", "16384",
             "--height", "16384", "--out", tmp_path / "o"], capsys, folder=tmp_path,
            expect=["not enough memory", "nothing was written"])


def test_unexpected_failure_is_one_line(tmp_path, capsys, monkeypatch):
    import lora_ext.cli as cli

    monkeypatch.setattr(cli, "_cmd_demo", lambda args: {}["missing"])
    monkeypatch.delenv("LORA_EXT_TRACEBACK", raising=False)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo-files"].set_defaults(func=cli._cmd_demo)
    line = run_cli(["demo-files", tmp_path / "d"], capsys, folder=tmp_path, code_ok=(3,))
    assert "internal error (KeyError" in line


@pytest.mark.parametrize("which", ["single", "folder"])
def test_merge_output_folder_not_writable_checked_first(tmp_path, capsys, monkeypatch, sd1_files, which):
    """As root a read-only folder is still writable, so the refusal is simulated: the check
    must come before the base is opened."""
    import lora_ext.merge as lmerge

    single, folder, lora = sd1_files
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) else real_access(p, mode))
    monkeypatch.setattr(lmerge, "open_checkpoint", lambda *a, **k: pytest.fail("the base was opened first"))
    out = ro / ("o.safetensors" if which == "single" else "o")
    run_cli(["merge", "--base", single if which == "single" else folder, "--lora", lora, "--out", out], capsys,
            folder=tmp_path, expect=[str(out), "no permission to write in"])

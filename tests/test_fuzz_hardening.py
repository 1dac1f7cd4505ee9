"""Issue 17: fuzzing in the default suite, a few seconds in all. Over the safetensors header
reader, the PEFT / kohya metadata readers, argument parsing and the prompt grammar, only the
project's own error types (LoraExtError and its subclasses; SystemExit(2) from argparse) come
out, and every call returns within a time bound."""
from __future__ import annotations

import json
import math
import os
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ext.errors import LoraExtError
from lora_ext.io import open_tensors

CALL_BOUND = 5.0  # seconds per call: generous; the attacks it guards against took minutes
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class _Timed:
    """CPU time (robust on a shared machine) under CALL_BOUND; wall time under 8x that."""

    def __enter__(self):
        self.t0, self.c0 = time.monotonic(), time.process_time()

    def __exit__(self, *exc):
        took, cpu = time.monotonic() - self.t0, time.process_time() - self.c0
        assert cpu < CALL_BOUND and took < 8 * CALL_BOUND, f"a call took {cpu:.1f} s CPU, {took:.1f} s"
        return False


# ---------------------------------------------------------------------------------------------
# the safetensors header reader

_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "C64", "F64", "F8_E4M3", "X9", ""]
_big_ints = st.one_of(st.integers(-3, 64), st.integers(0, 2 ** 70), st.sampled_from([2 ** 50, 2 ** 50 + 1, 2 ** 63,
                                                                                         2 ** 64 + 7]))
_shapes = st.one_of(st.lists(_big_ints, max_size=6), st.lists(st.just(1), min_size=15, max_size=70),
                    st.text(max_size=4), st.none(), st.just(1.5))
_offsets = st.one_of(st.lists(_big_ints, min_size=2, max_size=2), st.lists(_big_ints, max_size=3), st.none())
_names = st.one_of(st.text(max_size=12), st.sampled_from(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha",
                                                         "lora_unet_a.lora_up.weight", "__metadata__"]))
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(_DTYPES), "shape": _shapes, "data_offsets": _offsets})
_meta = st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=10), st.integers(), st.none()), max_size=3)


@st.composite
def _header_bytes(draw):
    pairs = draw(st.lists(st.tuples(_names, st.one_of(_entry, _meta, st.integers(), st.text(max_size=3))),
                          max_size=6))
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs)  # repeated names survive
    raw = ("{" + body + "}").encode()
    if draw(st.booleans()):
        raw = draw(st.sampled_from([b"[", b"{", b"\xff", b"{\"a\":" + b"[" * 5000, b" "])) + raw
    return raw


@FUZZ
@given(header=_header_bytes(), data=st.binary(max_size=64), length_delta=st.sampled_from([0, 0, 0, -1, 1, 2 ** 40]))
def test_fuzz_safetensors_header(tmp_path_factory, header, data, length_delta):
    p = tmp_path_factory.mktemp("st") / "f.safetensors"
    p.write_bytes(struct.pack("<Q", max(0, len(header) + length_delta)) + header + data)
    with _Timed():
        try:
            with open_tensors(p, kind="lora") as f:
                for k in f.keys():
                    f.shape(k)
                    f.get(k)
        except LoraExtError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_safetensors_raw_bytes(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("st") / "r.safetensors"
    p.write_bytes(raw)
    with _Timed():
        try:
            with open_tensors(p, kind="checkpoint") as f:
                for k in f.keys():
                    f.get(k)
        except LoraExtError:
            pass


# ---------------------------------------------------------------------------------------------
# PEFT / kohya metadata readers

_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True), st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "unet",
                         "unet.r", "unet.lora_alpha", "text_encoder", "x"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(value=_json_values, junk=st.sampled_from(["", "", "[" * 3000, "{", "\udcff", "NaN", "1e999"]))
def test_fuzz_peft_config_readers(value, junk):
    from lora_ext.metadata import check_peft_config, parse_peft_config

    text = junk + json.dumps(value) if junk != "\udcff" else json.dumps(value) + junk
    with _Timed():
        problem = check_peft_config(value)
        assert problem is None or isinstance(problem, str)
        try:
            cfg = parse_peft_config(text.encode("utf-8", "surrogateescape"), "cfg.json")
        except LoraExtError as exc:
            assert "\n" not in str(exc)
        else:
            assert check_peft_config(cfg) is None


@FUZZ
@given(md=st.dictionaries(st.sampled_from(["lora_adapter_metadata", "ss_network_args", "ss_tag_frequency",
                                           "ss_network_dim", "ss_network_alpha", "modelspec.trigger_phrase",
                                           "ss_dataset_dirs", "software"]) | st.text(max_size=5),
                          st.one_of(st.text(max_size=12), _json_values.map(json.dumps)), max_size=6))
def test_fuzz_metadata_summaries(md):
    from lora_ext.metadata import lora_adapter_components, training_info, trigger_words

    with _Timed():
        assert isinstance(trigger_words(md), list)
        assert isinstance(training_info(md, name="x"), dict)
        lora_adapter_components(md)


@FUZZ
@given(shape=st.lists(st.integers(0, 3), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]),
       value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2 ** 62, 2 ** 62))
def test_fuzz_kohya_alpha(shape, dtype, value):
    from lora_ext.metadata import MAX_ALPHA, checked_alpha

    try:
        t = torch.full(shape, value).to(dtype)
    except (RuntimeError, OverflowError, TypeError):
        return
    with _Timed():
        try:
            checked_alpha("a.safetensors", "x.alpha", t)
        except LoraExtError as exc:
            assert "\n" not in str(exc)
        else:
            v = float(t.reshape(()).double())
            assert t.numel() == 1 and math.isfinite(v) and abs(v) <= MAX_ALPHA and dtype != torch.bool


# ---------------------------------------------------------------------------------------------
# argument parsing

_OPTS = ["--width", "--height", "--steps", "--cfg", "--seed", "--batch", "--denoise", "--eta", "--clip-skip",
         "--device", "--init-image", "--sampler", "--out", "--dtype", "--lora-method", "--prediction"]
_values = st.one_of(st.sampled_from(["0", "-16", "nan", "inf", "-inf", "1e309", "8", "64", "7.5", "quantum", "cpu",
                                     "cuda:99", "", "x.png", "fp16", "auto", "eps", "9" * 5000, "\x1b[2J"]),
                    st.integers(-2 ** 70, 2 ** 70).map(str), st.text(max_size=6))


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(_OPTS), _values), max_size=5))
def test_fuzz_generate_arguments(tmp_path_factory, capsys, pairs):
    from lora_ext.cli import main

    folder = tmp_path_factory.mktemp("gen")
    argv = ["generate", "--checkpoint", str(folder / "missing.safetensors"), "--prompt", "a cat"]
    for opt, val in pairs:
        argv += [opt, str(folder / val) if opt in ("--init-image", "--out") and "\0" not in val else val]
    with _Timed():
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)  # the checkpoint is missing: never a success, never a crash
    assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert os.listdir(folder) == []


@FUZZ
@given(arg=st.text(max_size=20) | st.sampled_from(["a:nan", "a:1e309", "C:\\x.safetensors:0.5", "a:", ":1",
                                                   "a:" + "9" * 5000]))
def test_fuzz_lora_arguments(arg):
    from lora_ext.merge import parse_lora_arg
    from lora_ext.tools import parse_source_arg

    with _Timed():
        for parse in (parse_lora_arg, parse_source_arg):
            try:
                parse(arg)
            except LoraExtError as exc:
                assert "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------
# the prompt grammar

_tagish = st.lists(st.one_of(st.sampled_from(["<", ">", "lora", "lyco", ":", "=", ",", "@", "1", "0.5", "-", "nan",
                                               "inf", "lbw", "te", "unet", "dyn", "start", "stop", "hr", "x", " ",
                                               "9" * 400, "1e309", "\x00", "(", ")", "[", "]", "\\"]),
                             st.text(max_size=3)), max_size=25).map("".join)


@FUZZ
@given(text=_tagish)
def test_fuzz_prompt_grammar(text):
    from lora_ext.prompt import parse_prompt

    with _Timed():
        try:
            parsed = parse_prompt(text)
        except LoraExtError:
            return  # a PromptSyntaxError naming the tag and position; no other type escapes
    for spec in parsed.specs:
        for w in (spec.te, spec.unet, spec.start, spec.stop):
            if isinstance(w, float):
                assert math.isfinite(w), (text, spec)

"""lora_ext.metadata: trigger words, training summary and diffusers adapter config."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ext.io import open_tensors, save_safetensors
from lora_ext.metadata import (
    few_step_hint,
    lora_adapter_components,
    lora_adapter_config,
    training_info,
    trigger_words,
)

# What kohya-ss sd-scripts (train_network.py) writes, trimmed to the fields that matter here.
# JSON fields are JSON text inside the string values, as in real files.
KOHYA_SD15 = {
    "ss_session_id": "1234567890",
    "ss_training_started_at": "1700000000.0",
    "ss_output_name": "mychar_v2",
    "ss_learning_rate": "0.0001",
    "ss_text_encoder_lr": "5e-05",
    "ss_unet_lr": "0.0001",
    "ss_num_train_images": "300",
    "ss_num_epochs": "10",
    "ss_epoch": "10",
    "ss_steps": "3000",
    "ss_max_train_steps": "3000",
    "ss_lr_scheduler": "cosine_with_restarts",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "32",
    "ss_network_alpha": "16.0",
    "ss_network_args": "null",
    "ss_mixed_precision": "fp16",
    "ss_clip_skip": "2",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
    "ss_resolution": "(512, 512)",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_tag_frequency": json.dumps({
        "10_mychar": {"mychar": 30, " 1girl": 28, "solo": 25, " red hair": 20, "smile": 12,
                      "looking at viewer": 12, "blue eyes": 9, "outdoors": 3},
        "2_mychar casual": {"mychar": 10, "1girl": 10, "jacket": 8, "smile": 4, "indoors": 3,
                            "sitting": 3, "cup": 1},
    }),
    "ss_dataset_dirs": json.dumps({
        "10_mychar": {"n_repeats": 10, "img_count": 30},
        "2_mychar casual": {"n_repeats": 2, "img_count": 10},
    }),
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers",
    "modelspec.title": "mychar_v2",
    "modelspec.resolution": "512x512",
    "modelspec.trigger_phrase": "mychar, red hair",
    "modelspec.date": "2024-03-01T12:00:00",
}


# ----------------------------------------------------------------------------------------------
# trigger words


def test_trigger_words_kohya():
    words = trigger_words(KOHYA_SD15)
    # trigger_phrase first, then dataset folders (repeat prefix stripped), then the most
    # frequent tags summed over datasets (count desc, ties by name), without duplicates.
    assert words == [
        "mychar", "red hair",                      # modelspec.trigger_phrase
        "mychar casual",                           # folder names (mychar already present)
        "1girl", "solo", "smile", "looking at viewer", "blue eyes", "jacket",
        "indoors", "outdoors",                     # top 10 tags: "sitting" (3) is 11th
    ]


def test_trigger_words_top_n_and_ties():
    freq = {"1_x": {f"tag{i:02d}": 5 for i in range(15)} | {"top": 9, "b": 7, "a": 7}}
    md = {"ss_tag_frequency": json.dumps(freq)}
    words = trigger_words(md)
    assert words[0] == "x"
    assert words[1:] == ["top", "a", "b"] + [f"tag{i:02d}" for i in range(7)]
    assert len(words) == 1 + 10
    assert trigger_words(md, max_tags=2) == ["x", "top", "a"]
    assert trigger_words(md, max_tags=0) == ["x"]


def test_trigger_words_only_folders_with_repeat_prefix():
    md = {"ss_tag_frequency": json.dumps({"images": {"cat": 2}, "5_sks dog": {"dog": 1},
                                          "C:\\train\\3_zyx": {"zyx": 1}})}
    assert trigger_words(md) == ["sks dog", "zyx", "cat", "dog"]


def test_trigger_words_dedupe_ignores_case_and_spaces():
    md = {
        "modelspec.trigger_phrase": " MyChar ,  , mychar,red   hair",
        "ss_tag_frequency": json.dumps({"1_mychar": {"Red Hair": 5, "mychar ": 3, "  ": 9}}),
    }
    assert trigger_words(md) == ["MyChar", "red hair"]


def test_trigger_words_only_dataset_dirs():
    md = {"ss_dataset_dirs": json.dumps({"20_ohwx woman": {"n_repeats": 20, "img_count": 15}})}
    assert trigger_words(md) == ["ohwx woman"]


@pytest.mark.parametrize("md", [
    {},
    {"ss_tag_frequency": "{not json"},
    {"ss_tag_frequency": "[1, 2, 3]"},
    {"ss_tag_frequency": json.dumps({"1_a": "oops"})},
    {"ss_tag_frequency": json.dumps({"1_a": {"t": "many", "u": None, "v": [1], "w": True}})},
    {"ss_tag_frequency": "null", "ss_dataset_dirs": "3"},
    {"modelspec.trigger_phrase": 5},
    {"ss_tag_frequency": "[" * 100000},
])
def test_trigger_words_malformed_never_raises(md):
    words = trigger_words(md)
    assert isinstance(words, list) and all(isinstance(w, str) and w for w in words)


def test_trigger_words_malformed_field_ignored_others_kept():
    md = {"modelspec.trigger_phrase": "abc", "ss_tag_frequency": "{broken", "ss_dataset_dirs":
          json.dumps({"4_def": {}})}
    assert trigger_words(md) == ["abc", "def"]


def test_trigger_words_string_counts_accepted():
    md = {"ss_tag_frequency": json.dumps({"1_q": {"a": "3", "b": 7}})}
    assert trigger_words(md) == ["q", "b", "a"]


def test_trigger_words_through_a_file(tmp_path):
    p = tmp_path / "mychar_v2.safetensors"
    save_safetensors(p, {"lora_unet_x.alpha": torch.tensor(16.0)}, KOHYA_SD15)
    with open_tensors(p) as f:
        assert trigger_words(f.metadata) == trigger_words(KOHYA_SD15)
        assert training_info(f.metadata) == training_info(KOHYA_SD15)


# ----------------------------------------------------------------------------------------------
# training info


def test_training_info_kohya():
    info = training_info(KOHYA_SD15)
    assert info == {
        "trainer": "kohya-ss",
        "implementation": "diffusers",
        "network_module": "networks.lora",
        "dim": 32,
        "alpha": 16.0,
        "base_model": "sd_v1",
        "base_model_name": "v1-5-pruned-emaonly.safetensors",
        "architecture": "stable-diffusion-v1/lora",
        "v2": False,
        "resolution": "512x512",
        "epochs": 10,
        "epoch": 10,
        "steps": 3000,
        "images": 300,
        "learning_rate": 0.0001,
        "unet_lr": 0.0001,
        "text_encoder_lr": 5e-05,
        "optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "scheduler": "cosine_with_restarts",
        "clip_skip": 2,
        "output_name": "mychar_v2",
        "title": "mychar_v2",
        "date": "2024-03-01T12:00:00",
    }


def test_training_info_lycoris_args_and_sdxl():
    md = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": "16",
        "ss_network_alpha": "8",
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4", "algo": "loha",
                                       "dropout": "0", "dora_wd": "True"}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_resolution": "(1024, 1024)",
        "ss_v_parameterization": "False",
    }
    info = training_info(md)
    assert info["algo"] == "loha"
    assert (info["dim"], info["alpha"], info["conv_dim"], info["conv_alpha"]) == (16, 8, 8, 4)
    assert info["dora"] is True
    assert info["base_model"] == "sdxl_base_v1-0"
    assert info["resolution"] == "1024x1024"
    assert info["v_prediction"] is False
    assert "few_step" not in info


def test_training_info_only_present_keys():
    assert training_info({}) == {}
    assert training_info({"modelspec.title": "Thing"}) == {"title": "Thing"}
    # "None" alpha (old kohya) and an unparseable args field are left out, not guessed
    info = training_info({"ss_network_alpha": "None", "ss_network_args": "{oops", "ss_network_dim": "4"})
    assert info == {"trainer": "kohya-ss", "dim": 4}
    assert training_info({"modelspec.implementation": "https://github.com/Stability-AI/generative-models"}) == {
        "trainer": "https://github.com/Stability-AI/generative-models",
        "implementation": "https://github.com/Stability-AI/generative-models",
    }


@pytest.mark.parametrize("md,name,expected", [
    ({"ss_output_name": "sdxl_lightning_4step_lora"}, None, "Lightning"),
    ({"modelspec.title": "LCM-LoRA SD1.5"}, None, "LCM"),
    ({"ss_output_name": "Hyper-SD15-8steps-lora"}, None, "Hyper-SD"),
    ({}, "Hyper-SDXL-1step-lora.safetensors", "Hyper-SD"),
    ({"modelspec.tags": "TCD, sdxl"}, None, "TCD"),
    ({"ss_output_name": "dmd2_sdxl_4step_lora"}, None, "DMD"),
    ({"ss_sd_model_name": "sd_xl_turbo_1.0_fp16.safetensors"}, None, "Turbo"),
    ({"ss_output_name": "my_hypernetwork_style"}, None, None),
    ({"ss_output_name": "turbocharged", "modelspec.title": "glcmx"}, None, None),
])
def test_few_step(md, name, expected):
    assert few_step_hint(*md.values(), name) == expected
    assert training_info(md, name=name).get("few_step") == expected


def test_few_step_hint_ignores_non_text():
    assert few_step_hint(None, 5, b"lcm", "") is None


# ----------------------------------------------------------------------------------------------
# diffusers lora_adapter_metadata


def _diffusers_metadata(lora_adapter_metadata: dict) -> dict:
    """As diffusers' LoraBaseMixin.write_lora_layers builds it (diffusers >= 0.35)."""
    return {"format": "pt",
            "lora_adapter_metadata": json.dumps(lora_adapter_metadata, indent=2, sort_keys=True)}


UNET_CFG = {"r": 4, "lora_alpha": 8, "alpha_pattern": {}, "rank_pattern": {"up_blocks.0": 8},
            "use_dora": False, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
            "peft_type": "LORA", "lora_dropout": 0.0}
TE_CFG = {"r": 2, "lora_alpha": 2, "alpha_pattern": {}, "rank_pattern": {}, "use_dora": True,
          "target_modules": ["q_proj", "k_proj"], "peft_type": "LORA"}


def test_lora_adapter_config_pipeline_level():
    # _save_lora_weights packs each component's config with a "<component>." prefix
    packed = {f"unet.{k}": v for k, v in UNET_CFG.items()} | {f"text_encoder.{k}": v for k, v in TE_CFG.items()}
    md = _diffusers_metadata(packed)
    assert lora_adapter_config(md) == packed
    comps = lora_adapter_components(md)
    assert comps == {"unet": UNET_CFG, "text_encoder": TE_CFG}
    info = training_info(md)
    assert info["trainer"] == "diffusers"
    assert (info["dim"], info["alpha"], info["dora"]) == (4, 8, True)


def test_lora_adapter_config_model_level():
    md = _diffusers_metadata(UNET_CFG)  # save_lora_adapter: one LoraConfig.to_dict()
    assert lora_adapter_config(md) == UNET_CFG
    assert lora_adapter_components(md) == {"": UNET_CFG}
    assert training_info(md)["dim"] == 4 and "dora" not in training_info(md)


@pytest.mark.parametrize("md", [{}, {"format": "pt"}, {"lora_adapter_metadata": "{bad"},
                                {"lora_adapter_metadata": "[1]"}, {"lora_adapter_metadata": ""}])
def test_lora_adapter_config_absent_or_malformed(md):
    assert lora_adapter_config(md) is None
    assert lora_adapter_components(md) is None


@pytest.mark.slow
def test_lora_adapter_config_from_diffusers_writer(tmp_path):
    """Oracle: a file written by diffusers itself (slow: importing diffusers takes seconds)."""
    lora_base = pytest.importorskip("diffusers.loaders.lora_base")
    sd = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 320)}
    packed = lora_base._pack_dict_with_prefix(dict(UNET_CFG), "unet")
    lora_base.LoraBaseMixin.write_lora_layers(
        state_dict=sd, save_directory=str(tmp_path), is_main_process=True,
        weight_name="pytorch_lora_weights.safetensors", save_function=None,
        safe_serialization=True, lora_adapter_metadata=packed,
    )
    with open_tensors(tmp_path / "pytorch_lora_weights.safetensors") as f:
        assert lora_adapter_config(f.metadata) == packed
        assert lora_adapter_components(f.metadata) == {"unet": UNET_CFG}
        assert training_info(f.metadata)["trainer"] == "diffusers"


# ----------------------------------------------------------------------------------------------
# properties


text_or_json = st.text(max_size=30) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
).map(json.dumps)
KEYS = ["ss_tag_frequency", "ss_dataset_dirs", "ss_network_args", "lora_adapter_metadata",
        "modelspec.trigger_phrase", "ss_network_dim", "ss_network_alpha", "ss_resolution",
        "ss_output_name", "modelspec.title", "software", "ss_v2", "modelspec.tags"]


@settings(max_examples=200, deadline=None)
@given(md=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), text_or_json, max_size=8))
def test_metadata_functions_never_raise(md):
    words = trigger_words(md)
    assert all(isinstance(w, str) and w.strip() == w and w for w in words)
    assert len({w.lower() for w in words}) == len(words)
    info = training_info(md)
    assert isinstance(info, dict) and all(v is not None and v != "" for v in info.values())
    cfg = lora_adapter_config(md)
    assert cfg is None or isinstance(cfg, dict)
    lora_adapter_components(md)


def test_text_output_escapes_control_characters_from_files(tmp_path, capsys):
    """Key names, trigger words and metadata come from files: in text output their ANSI
    escapes, NUL and CR/LF are escaped, so they cannot clear the terminal or forge a line;
    JSON keeps them exact."""
    import json as _json

    import torch
    from safetensors.torch import save_file

    from lora_ext.cli import main

    forged = "lora_unet_nowhere\x1b[2J\nFAKE: 0 keys not applied\r"
    path = tmp_path / "evil.safetensors"
    save_file({f"{forged}.lora_down.weight": torch.zeros(2, 4), f"{forged}.lora_up.weight": torch.zeros(4, 2)},
              str(path), metadata={"modelspec.trigger_phrase": "nice\x1b]0;pwned\x07 style\u202e"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\r\x07\x00\u202e")
    assert "\nFAKE:" not in out and "\\x1b[2J\\x0aFAKE" in out
    assert main(["inspect", "--json", str(path)]) == 0
    info = _json.loads(capsys.readouterr().out)
    assert any(u["key"].startswith(forged) for u in info["unmatched"])

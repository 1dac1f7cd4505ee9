"""The project's own promises: README commands, CI script, console script, layout."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```bash\n(pip install torch==2\.13\.0 .*)\n```", text)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2
    main_cmd, test_cmd = cmds
    assert "lora-ext inspect" in main_cmd and "pytest" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert test_cmd in ci


def test_adapters_package_is_namespaced():
    import lora_ext.adapters

    assert "adapters" not in sys.modules  # a host's own `adapters` cannot shadow ours
    assert os.path.samefile(os.path.dirname(lora_ext.adapters.__file__), os.path.join(ROOT, "adapters"))


def test_demo_files_then_inspect_json(tmp_path):
    from lora_ext.cli import main

    assert main(["demo-files", str(tmp_path)]) == 0
    files = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 5
    out = subprocess.run([sys.executable, "-m", "lora_ext.cli", "inspect", "--json", *files],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    infos = [json.loads(line) for line in out.splitlines()]
    assert [i["path"] for i in infos] == files
    for info in infos:
        for field in ("path", "format", "base_model", "types", "modules", "unmatched", "trigger_words", "metadata"):
            assert field in info
    by_name = {os.path.basename(i["path"]): i for i in infos}
    sdxl = by_name["watercolor_sdxl_loha.safetensors"]
    assert sdxl["base_model"] == "sdxl" and sdxl["types"] == {"loha": 3} and sdxl["unmatched"] == []
    castle = by_name["castle_sd15_locon_ldm_names.safetensors"]
    assert castle["base_model"] == "sd1" and castle["trigger_words"][0] == "old castle"
    dora = by_name["pixel_sd15_peft_dora.safetensors"]
    assert dora["types"] == {"lora+dora": 2} and dora["alphas"] == {"16": 2}
    odd = by_name["odd_keys_sd15.safetensors"]
    # types come from the file (issue 13): the LoRA on a module SD1.5 lacks is still a LoRA
    assert odd["types"] == {"lora": 1, "lora (auto-detected)": 1} and odd["typed_modules"] == 2
    assert odd["modules"] == 1 and odd["not_applied"][0]["modules"] == 1 and odd["not_applied"][0]["keys"] == 2
    assert {u["key"] for u in odd["unmatched"]} == {
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight",
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"}
    assert all("no such module in SD1.x" in u["reason"] for u in odd["unmatched"])
    ink = by_name["inkwash_sd15_lora.safetensors"]
    assert ink["trigger_words"][:2] == ["inkwash style", "monochrome"]
    assert ink["modules"] == 12 and ink["components"] == {"te1": 4, "unet": 8}


def test_every_package_folder_is_in_the_wheel():
    import tomllib

    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = {"adapters": "lora_ext.adapters", "hosts": "lora_ext.hosts", "lora_ext": "lora_ext"}
    found = set()
    for top, name in mapping.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert found <= listed, found - listed
    assert "lora_ext.configs" in listed  # data-only package (json configs)


def test_host_runtime_dependencies_only():
    """A host needs torch (its own, any version from 2.1), safetensors, numpy and pluggy; diffusers
    and transformers are an extra (tools, standalone sampler) that the tests include as oracles."""
    import tomllib

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    names = {re.split(r"[<>=!~\[ ]", d, 1)[0].lower(): d for d in project["dependencies"]}
    assert set(names) == {"torch", "safetensors", "numpy", "pluggy"}
    assert names["torch"] == "torch>=2.1"  # no upper bound: the host's torch is the one used
    extras = project["optional-dependencies"]
    for extra in ("full", "test"):
        assert {"diffusers>=0.30", "transformers>=4.40"} <= set(extras[extra]), extra
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    assert "*.json.gz" in cfg["package-data"]["lora_ext.tables"]
    assert os.path.isfile(os.path.join(ROOT, "lora_ext", "tables", "sd_modules.json.gz"))


def test_install_py_installs_only_the_host_runtime():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_ext_install_py", os.path.join(ROOT, "install.py"))
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)  # defines only; main() runs under __main__
    assert set(install.REQUIREMENTS) == {"safetensors", "numpy", "pluggy"}
    assert install.installed("pytest") and not install.installed("no-such-distribution-lora-ext")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "LORA_EXT_A1111_DEPS=1 python -m pytest -q tests/test_a1111_deps.py" in ci

"""The inspect report in the A1111-family webuis (hosts/a1111/inspect_view.py), through the webui
fake: the API route and the "lora-ext" tab give what ``lora-ext inspect`` prints for the same
file, against the detected base or against the checkpoint loaded now. (The tab's gradio build
in a real webui is checked by the real-host run: tests/test_realhost.py, ``-m realhost``.)"""
from __future__ import annotations

import types

import pytest

from lora_ext.cli import main
from test_host_a1111 import HOST_MODULES, one_thread, tiny, webui  # noqa: F401  (fixtures)
from tiny_models import save_pipeline


def _routes(ns) -> dict:
    routes = {}
    app = types.SimpleNamespace(add_api_route=lambda path, fn, methods: routes.setdefault(path, fn))
    ns.cb.app_started_callback(None, app)
    return routes


def test_inspect_route_matches_the_cli(webui, capsys):
    ns = webui
    inspect = _routes(ns)["/lora-ext/v1/inspect"]
    got = inspect(name="alpha")
    assert got["path"] == ns.loras["alpha"] and got["against"] == "detected"
    assert main(["inspect", ns.loras["alpha"]]) == 0
    assert got["text"].strip() == capsys.readouterr().out.strip()
    assert got["report"]["types"] and "lora" in got["report"]["types"]
    # one line for every user error, never a traceback
    assert "not found" in inspect(name="no_such_lora")["error"].lower()
    assert "against must be" in inspect(name="alpha", against="moon")["error"]
    assert "no checkpoint file is known" in inspect(name="alpha", against="loaded")["error"]


def test_inspect_against_the_loaded_checkpoint(webui, tmp_path, capsys):
    """Against the checkpoint the webui has loaded (a tiny diffusers folder here): what applies
    to that model, as ``lora-ext inspect --base`` reports it."""
    ns = webui
    save_pipeline(tmp_path / "ckpt", ns.unet, ns.te)
    ns.model.sd_checkpoint_info = types.SimpleNamespace(filename=str(tmp_path / "ckpt"), name_for_extra="ckpt")
    from lora_ext.hosts.a1111.shim import SHIM

    SHIM._model = ns.model  # what the first generation records
    got = _routes(ns)["/lora-ext/v1/inspect"](name="beta", against="loaded")
    assert got.get("error") is None, got
    assert got["base"] == str(tmp_path / "ckpt")
    assert main(["inspect", "--base", str(tmp_path / "ckpt"), ns.loras["beta"]]) == 0
    assert got["text"].strip() == capsys.readouterr().out.strip()
    assert got["report"]["unmatched"] == [] and got["report"]["bound_to_path"] == str(tmp_path / "ckpt")


class _Recorder:
    """Just enough of gradio's component API to build the tab and click its button here."""

    def __init__(self):
        self.made, self.clicks = [], []
        rec = self

        class Comp:
            def __init__(self, *a, **kw):
                self.kw = kw
                rec.made.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def click(self, fn, inputs, outputs):
                rec.clicks.append((self, fn, inputs, outputs))

        for n in ("Blocks", "Row", "Dropdown", "Button", "Radio", "Checkbox", "Textbox"):
            setattr(self, n, type(n, (Comp,), {}))
        self.update = lambda **kw: kw


def test_ui_tab_lists_the_library_and_shows_the_report(webui, capsys):
    ns = webui
    gr = _Recorder()
    from lora_ext.hosts.a1111 import inspect_view
    from lora_ext.hosts.a1111.shim import SHIM

    (tab, title, elem_id), = inspect_view.ui_tabs(SHIM, gr)
    assert title == "lora-ext" and elem_id == "lora_ext_inspect"
    dropdown = next(c for c in gr.made if type(c).__name__ == "Dropdown")
    assert set(dropdown.kw["choices"]) == {"alpha", "beta", "gamma"}
    run = next(fn for btn, fn, _, _ in gr.clicks if btn.kw.get("elem_id") == "lora_ext_inspect_run")
    text = run("gamma", "the base model it was made for", False)
    assert main(["inspect", ns.loras["gamma"]]) == 0
    assert text.strip() == capsys.readouterr().out.strip()
    assert run("", "the base model it was made for", False) == "Choose a LoRA."
    assert run("nope", "the base model it was made for", False).startswith("lora-ext: ")
    refresh = next(fn for btn, fn, _, _ in gr.clicks if btn.kw.get("elem_id") == "lora_ext_inspect_refresh")
    assert set(refresh()["choices"]) == {"alpha", "beta", "gamma"}
    assert ns.cb.ui_tabs_callback() == []  # no gradio in this environment: the webui gets no tab, no error

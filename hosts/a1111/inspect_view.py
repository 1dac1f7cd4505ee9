"""The inspect report in the A1111-family webuis (A1111, Forge, reForge, SD.Next): a "lora-ext"
tab that shows, for one LoRA of the library, what ``lora-ext inspect`` prints (against the base
model the file was made for, or against the checkpoint loaded now), and the same report as JSON
at ``GET /lora-ext/v1/inspect?name=...`` for scripts and the API-only mode.

Only translation lives here: the report is :func:`lora_ext.inspect.inspect_lora` /
:func:`lora_ext.inspect.render_text`, as in the CLI and ComfyUI's inspector node."""
from __future__ import annotations

import os
from typing import Optional

INSPECT_ROUTE = "/lora-ext/v1/inspect"
AGAINST = ("detected", "loaded")  # the base the file names / the checkpoint loaded now
_LABELS = {"detected": "the base model it was made for", "loaded": "the checkpoint loaded now"}


def loaded_checkpoint(shim) -> Optional[str]:
    """The file (or diffusers folder) of the model the shim is bound to, if it knows one.

    Read from the model lora-ext last bound, never from ``shared.sd_model``: reading that from
    a request thread may wait for the main thread's model load (see ``A1111Shim.status``)."""
    info = getattr(getattr(shim, "_model", None), "sd_checkpoint_info", None)
    path = getattr(info, "filename", None)
    return path if isinstance(path, str) and os.path.exists(path) else None


def lora_names(shim) -> list:
    """Every LoRA of the library by the name a prompt uses (relative path, no extension)."""
    try:
        return sorted((f.key for f in shim.library().files()), key=str.lower)
    except Exception:  # an unreadable folder: the tab still opens, the report names the problem
        return []


def report(shim, name: str, against: str = "detected", *, keys: bool = False) -> dict:
    """``{"name", "path", "against", "base", "text", "report"}`` for the LoRA ``name``.

    Raises :class:`lora_ext.errors.LoraExtError` (a LoRA that is not found, an unreadable file,
    ``against="loaded"`` with no checkpoint loaded) with one line that says why."""
    from lora_ext.errors import LoraExtError
    from lora_ext.inspect import inspect_lora, render_text

    if against not in AGAINST:
        raise LoraExtError(f"against must be one of {', '.join(AGAINST)}, not {against!r}")
    path = os.path.abspath(shim.library().resolve(str(name)))  # SD.Next's folders are relative to its cwd
    base = None
    if against == "loaded":
        base = loaded_checkpoint(shim)
        if base is None:
            raise LoraExtError("no checkpoint file is known yet: lora-ext learns the loaded checkpoint at the "
                               "first generation (or inspect against the detected base model)")
    info = inspect_lora(path, base=base)
    return {"name": str(name), "path": path, "against": against, "base": base,
            "text": render_text(info, keys=keys), "report": info}


def api_inspect(shim):
    """The route function (FastAPI reads its query parameters from the signature)."""

    def inspect_route(name: str, against: str = "detected", keys: bool = False):
        from lora_ext.errors import LoraExtError

        try:
            return report(shim, name, against, keys=keys)
        except (LoraExtError, OSError) as exc:
            try:
                from fastapi import HTTPException
            except ImportError:  # no web server (tests): the error as data
                return {"error": str(exc)}
            raise HTTPException(status_code=404 if "not found" in str(exc).lower() else 400, detail=str(exc))

    return inspect_route


def ui_tabs(shim, gr) -> list:
    """``[(blocks, title, elem_id)]`` for ``script_callbacks.on_ui_tabs`` (gradio 3.x and 4.x)."""
    if gr is None:
        return []

    def run(name, against_label, keys):
        against = next((k for k, v in _LABELS.items() if v == against_label), "detected")
        if not name:
            return "Choose a LoRA."
        try:
            return report(shim, name, against, keys=bool(keys))["text"]
        except Exception as exc:  # shown in the box, never a traceback in the UI
            return f"lora-ext: {exc}"

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            name = gr.Dropdown(label="LoRA", choices=lora_names(shim), elem_id="lora_ext_inspect_name")
            refresh = gr.Button("Refresh list", elem_id="lora_ext_inspect_refresh")
        with gr.Row():
            against = gr.Radio(label="Inspect against", choices=list(_LABELS.values()), value=_LABELS["detected"],
                               elem_id="lora_ext_inspect_against")
            keys = gr.Checkbox(label="List every key not applied", value=False, elem_id="lora_ext_inspect_keys")
            go = gr.Button("Inspect", variant="primary", elem_id="lora_ext_inspect_run")
        out = gr.Textbox(label="Report", lines=24, max_lines=80, interactive=False, elem_id="lora_ext_inspect_report")
        go.click(fn=run, inputs=[name, against, keys], outputs=[out])
        refresh.click(fn=lambda: gr.update(choices=lora_names(shim)), inputs=[], outputs=[name])
    return [(tab, "lora-ext", "lora_ext_inspect")]

"""A1111 "infotext": the generation parameters other tools read from a PNG.

Written as a PNG text chunk named ``parameters`` (tEXt, or iTXt when the text is not
Latin-1), in A1111's layout::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "ink: 35c891345545",
    Version: lora-ext 0.1.0

(the last line is one line). Values holding ``,``, ``:`` or a newline are JSON-quoted, as
A1111 does. :func:`parse_infotext` reads such text back (A1111's own reader accepts it).
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional

__all__ = ["format_infotext", "parse_infotext", "save_png", "read_parameters"]

_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def format_infotext(prompt: str, negative: str, params: Mapping[str, object]) -> str:
    """``params`` in order (``None`` values left out) -> the infotext."""
    fields = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(fields)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """Infotext -> ``{"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}`` (values as
    strings, unquoted), as A1111's ``parse_generation_parameters`` reads it."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    found = _PARAM_RE.findall(last)
    params: dict = {}
    if len(found) >= 3:
        lines = lines[:-1]
        for k, v in found:
            params[k.strip()] = _unquote(v.strip())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def save_png(image, path, infotext: Optional[str]) -> str:
    """Save a PIL image as PNG with ``infotext`` in its ``parameters`` chunk."""
    from PIL import PngImagePlugin

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    tmp = path + ".part"
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_parameters(path) -> Optional[str]:
    """The ``parameters`` text of a PNG, or None."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}) or {}
        return text.get("parameters") or im.info.get("parameters")

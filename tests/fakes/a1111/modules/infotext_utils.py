"""Mirrors the infotext round trip of AUTOMATIC1111/stable-diffusion-webui v1.10.1
(modules/infotext_utils.py: ``quote``/``unquote``, ``parse_generation_parameters`` for the
``key: value, ...`` last line, then ``script_callbacks.infotext_pasted_callback``) and the
line that modules/processing.py ``create_infotext`` writes from ``p.extra_generation_params``."""
import json
import re

from modules import script_callbacks

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def create_infotext_line(p):
    params = {"Steps": p.steps, "Seed": p.seed, **p.extra_generation_params}
    return ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in params.items() if v is not None])


def parse_generation_parameters(x: str):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    script_callbacks.infotext_pasted_callback(x, res)
    return res

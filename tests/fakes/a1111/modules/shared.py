"""Mirrors the parts of modules/shared.py, modules/options.py and modules/shared_state.py of
AUTOMATIC1111/stable-diffusion-webui v1.10.1 that extensions use: ``opts`` (settings with
``add_option``, ``onchange``, attribute access falling back to defaults), ``OptionInfo``
(default, label, component, component_args, onchange, section, ...; ``.info()`` chains),
``options_section``, ``state`` (sampling_step / sampling_steps), ``cmd_opts`` (lora_dir),
``sd_model``."""
import os
import types


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        return self


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


class Options:
    typemap = {int: float}

    def __init__(self, data_labels):
        super().__setattr__("data_labels", data_labels)
        super().__setattr__("data", {k: v.default for k, v in data_labels.items()})

    def __setattr__(self, key, value):
        if key in ("data", "data_labels"):
            return super().__setattr__(key, value)
        if key in self.data or key in self.data_labels:
            old = self.data.get(key)
            self.data[key] = value
            info = self.data_labels.get(key)
            if info is not None and info.onchange is not None and old != value:
                info.onchange()
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in ("data", "data_labels"):
            return super().__getattribute__(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        setattr(self, key, value)
        return True

    def get_default(self, key):
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def onchange(self, key, func, call=True):
        item = self.data_labels.get(key)
        item.onchange = func
        if call:
            func()


options_templates = {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    "sd_lora": OptionInfo("None", "Add network to prompt"),
    "lora_add_hashes_to_infotext": OptionInfo(True, "Add Lora hashes to infotext"),
}
opts = Options(options_templates)

models_path = os.environ.get("FAKE_A1111_MODELS", os.path.join(os.path.dirname(__file__), "models"))
cmd_opts = types.SimpleNamespace(lora_dir=os.path.join(models_path, "Lora"),
                                 lyco_dir_backcompat=os.path.join(models_path, "LyCORIS"))


class State:
    sampling_step = 0
    sampling_steps = 0
    job = ""
    interrupted = False
    skipped = False


state = State()
sd_model = None

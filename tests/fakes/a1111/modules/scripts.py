"""Mirrors modules/scripts.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 as far as
always-on extension scripts go: ``Script`` (title/show/ui, process, before_process_batch,
process_batch, postprocess, before_hr; ``infotext_fields``), ``AlwaysVisible``, loading a
script file the way ``load_scripts`` does (the extension's folder on ``sys.path`` while its
module runs, every ``Script`` subclass found in the module's namespace registered) and a
``ScriptRunner`` that calls each always-on script with its (empty) UI args."""
import importlib.util
import inspect
import os
import sys

from modules import errors

AlwaysVisible = object()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass


scripts_data = []


def load_script_file(path, basedir):
    """As load_scripts: run the module with its extension folder first on sys.path."""
    syspath = sys.path
    try:
        sys.path = [basedir] + sys.path
        name = os.path.basename(path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for script_class in module.__dict__.values():
            if not inspect.isclass(script_class):
                continue
            if issubclass(script_class, Script):
                scripts_data.append((script_class, path, basedir, module))
        return module
    finally:
        sys.path = syspath


class ScriptRunner:
    def __init__(self):
        self.alwayson_scripts = []
        for script_class, path, basedir, _ in scripts_data:
            script = script_class()
            script.filename = path
            visibility = script.show(False)
            if visibility is AlwaysVisible:
                script.alwayson = True
                script.args_from = script.args_to = 0
                self.alwayson_scripts.append(script)

    def _each(self, method, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, method)(p, *args, **kwargs)
            except Exception as e:
                errors.display(e, f"running {method}: {script.filename}")

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def before_hr(self, p):
        self._each("before_hr", p)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            try:
                script.postprocess(p, processed)
            except Exception as e:
                errors.display(e, f"running postprocess: {script.filename}")

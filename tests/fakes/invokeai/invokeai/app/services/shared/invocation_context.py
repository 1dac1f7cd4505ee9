"""Mirrors the parts of invokeai/app/services/shared/invocation_context.py and
invokeai/backend/model_manager/load/load_base.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts) nodes use:
``context.models.load(identifier)`` returns a LoadedModel whose ``.model`` is the cached
module (not locked), ``model_on_device()`` locks it and yields ``(cpu state dict, model)``,
and using the LoadedModel as a context manager locks it too; ``context.models.get_config``;
``context.conditioning`` / ``context.tensors`` save and load; ``context.util.is_canceled``,
``sd_step_callback``, ``signal_progress``; ``context.config.get()`` (``models_path``,
``log_tokenization``); ``context.logger``."""
import contextlib
import logging
import types
import uuid


class LoadedModel:
    def __init__(self, record):
        self._record = record

    @property
    def model(self):
        return self._record["model"]

    @property
    def config(self):
        return self._record["config"]

    def __enter__(self):
        self._record["locks"] += 1
        return self.model

    def __exit__(self, *args):
        self._record["locks"] -= 1

    @contextlib.contextmanager
    def model_on_device(self, working_mem_bytes=None):
        self._record["locks"] += 1
        try:
            yield (self._record.get("cpu_state_dict"), self.model)
        finally:
            self._record["locks"] -= 1

    @contextlib.contextmanager
    def model_in_ram(self):
        yield self.model


class ModelsInterface:
    def __init__(self):
        self.records = {}

    def add(self, key, model, base="sd-1", kind="main"):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()} if hasattr(model, "state_dict") else None
        self.records[key] = {"model": model, "config": types.SimpleNamespace(key=key, base=base, type=kind),
                             "locks": 0, "cpu_state_dict": sd}

    def load(self, identifier, submodel_type=None):
        key = identifier if isinstance(identifier, str) else identifier.key
        return LoadedModel(self.records[key])

    def get_config(self, identifier):
        key = identifier if isinstance(identifier, str) else identifier.key
        return self.records[key]["config"]


class _Store:
    def __init__(self):
        self.items = {}

    def save(self, data):
        name = uuid.uuid4().hex
        self.items[name] = data
        return name

    def load(self, name):
        return self.items[name]


class UtilInterface:
    def __init__(self):
        self.steps = []

    def is_canceled(self):
        return False

    def sd_step_callback(self, intermediate_state, base_model):
        self.steps.append(intermediate_state)

    def signal_progress(self, message, percentage=None, image=None, image_size=None):
        pass


class InvocationContext:
    def __init__(self, models_path="."):
        self.models = ModelsInterface()
        self.conditioning = _Store()
        self.tensors = _Store()
        self.util = UtilInterface()
        cfg = types.SimpleNamespace(models_path=models_path, log_tokenization=False)
        self.config = types.SimpleNamespace(get=lambda: cfg)
        self.logger = logging.getLogger("invokeai")

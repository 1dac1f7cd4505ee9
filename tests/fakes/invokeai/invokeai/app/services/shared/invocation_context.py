"""Mirrors the parts of invokeai/app/services/shared/invocation_context.py,
invokeai/backend/model_manager/load/load_base.py and .../load/model_cache/model_cache.py
(InvokeAI 6.14.2 from PyPI, whose line numbers L... cite; read at invoke-ai/InvokeAI 8e71a8a5, which agrees
for these parts)
that nodes use.

Models (load_base.py ``LoadedModelWithoutConfig``):
* ``context.models.load(identifier)`` returns a LoadedModel for the cache record of that key;
  ``.model`` is the cached module, **not locked** (L177-180 "Return the model without locking it").
* ``model_on_device()`` locks the record (``ModelCache.lock``, L159-175) and yields
  ``(cpu state dict, model)``; using the LoadedModel as a context manager locks too (L140-156).
* ``model_in_ram()`` pins the record (``ModelCache.lock_in_ram``, model_cache.py L1830-1844:
  ``cache_entry.lock()`` without a VRAM load) and yields the model (L182-190).
* Eviction (model_cache.py ``_make_room_internal``, L2467ff; ``put``, L875ff): loading a
  model may drop every **unlocked** record of the other models; the next ``load`` of a dropped
  key builds a new record with a freshly loaded module (a different object). ``memory_pressure``
  switches that on (a full RAM cache); off, records stay (a cache with room).

``context.models.get_config``; ``context.conditioning`` / ``context.tensors`` save and load;
``context.util.is_canceled``, ``sd_step_callback``, ``flux_step_callback`` (L820), ``signal_progress``; ``context.config.get()``
(``models_path``, ``log_tokenization``, ``log_level``, InvokeAIAppConfig's default "info");
``context.logger`` is a ``LoggerInterface`` (invocation_context.py L134-165: ``debug``, ``info``,
``warning``, ``error`` only, each one message string, onto InvokeAI's logger); the fake also
keeps ``(level, message)`` in ``records``."""
import contextlib
import copy
import logging
import types
import uuid


class LoadedModel:
    def __init__(self, record, config=None):
        self._record = record
        self.config = config if config is not None else record["config"]

    @property
    def model(self):
        return self._record["model"]

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
        self._record["locks"] += 1
        try:
            yield self.model
        finally:
            self._record["locks"] -= 1


class ModelsInterface:
    def __init__(self):
        self.records = {}  # key -> the cache record now (a dropped one is replaced on the next load)
        self.sources = {}  # key -> (pristine module or value, base, kind): what a (re)load builds from
        self.memory_pressure = False
        self.built = {}  # key -> every module built for it (the first is the one passed to add)

    def add(self, key, model, base="sd-1", kind="main"):
        self.sources[key] = (copy.deepcopy(model) if hasattr(model, "state_dict") else model, base, kind)
        self.built[key] = [model]
        self.records[key] = self._record(key, model)

    def _record(self, key, model):
        _, base, kind = self.sources[key]
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()} if hasattr(model, "state_dict") else None
        return {"model": model, "config": types.SimpleNamespace(key=key, base=base, type=kind), "locks": 0,
                "cpu_state_dict": sd}

    def _key(self, identifier):
        return identifier if isinstance(identifier, str) else identifier.key

    def load(self, identifier, submodel_type=None):
        key = self._key(identifier)
        if self.memory_pressure:  # making room for this load drops the unlocked records of the others
            for other, rec in list(self.records.items()):
                if other != key and rec["locks"] == 0:
                    del self.records[other]
        if key not in self.records:  # a dropped model is loaded again: a new module
            src = self.sources[key][0]
            model = copy.deepcopy(src) if hasattr(src, "state_dict") else src
            self.built[key].append(model)
            self.records[key] = self._record(key, model)
        return LoadedModel(self.records[key])

    def get_config(self, identifier):
        key = self._key(identifier)
        _, base, kind = self.sources[key]
        return types.SimpleNamespace(key=key, base=base, type=kind)


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

    def flux_step_callback(self, intermediate_state):
        self.steps.append(intermediate_state)

    def signal_progress(self, message, percentage=None, image=None, image_size=None):
        pass


class LoggerInterface:
    def __init__(self):
        self._logger = logging.getLogger("InvokeAI")
        self.records = []

    def debug(self, message: str) -> None:
        self.records.append(("debug", message))
        self._logger.debug(message)

    def info(self, message: str) -> None:
        self.records.append(("info", message))
        self._logger.info(message)

    def warning(self, message: str) -> None:
        self.records.append(("warning", message))
        self._logger.warning(message)

    def error(self, message: str) -> None:
        self.records.append(("error", message))
        self._logger.error(message)


class InvocationContext:
    def __init__(self, models_path=".", log_level="info"):
        self.models = ModelsInterface()
        self.conditioning = _Store()
        self.tensors = _Store()
        self.util = UtilInterface()
        cfg = types.SimpleNamespace(models_path=models_path, log_tokenization=False, log_level=log_level)
        self.config = types.SimpleNamespace(get=lambda: cfg)
        self.logger = LoggerInterface()

"""Mirrors invokeai/app/invocations/baseinvocation.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts) without
pydantic: ``BaseInvocation`` (fields declared as annotated class attributes with
``InputField`` defaults, set from keyword arguments; ``invoke(context)`` returns a
``BaseInvocationOutput``; ``model_copy(update=...)``), ``@invocation(type, title, tags,
category, version, ...)`` (registers the class, validates that invoke is implemented, adds
the ``type`` field, ``UIConfig``), ``@invocation_output(type)``. Subclassing a registered
invocation and registering the subclass under another type works as in InvokeAI."""
import copy
import re
from abc import ABC, abstractmethod

from invokeai.app.invocations.fields import FieldInfo

INVOCATIONS = {}
OUTPUTS = {}


def _fields(cls):
    out = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            if name.startswith("_") or name in ("UIConfig",):
                continue
            out[name] = klass.__dict__.get(name, out.get(name))
    return out


class _Model:
    def __init__(self, **data):
        for name, info in _fields(type(self)).items():
            if name in data:
                value = data.pop(name)
            elif isinstance(info, FieldInfo):
                value = info.make_default()
            else:
                value = info
            object.__setattr__(self, name, value)
        if data:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(data)}")

    def model_copy(self, update=None, deep=False):
        new = copy.deepcopy(self) if deep else copy.copy(self)
        for k, v in (update or {}).items():
            object.__setattr__(new, k, v)
        return new

    def model_dump(self):
        return {k: getattr(self, k) for k in _fields(type(self))}


class BaseInvocationOutput(_Model):
    pass


class BaseInvocation(ABC, _Model):
    id: str = "node"
    is_intermediate: bool = False
    use_cache: bool = True

    @abstractmethod
    def invoke(self, context) -> BaseInvocationOutput:
        pass


class UIConfigBase:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def invocation(invocation_type, title=None, tags=None, category=None, version=None, use_cache=True,
               classification=None, bottleneck=None, idle_gpu_offloadable=False):
    def wrapper(cls):
        if re.compile(r"^\S+$").match(invocation_type) is None:
            raise ValueError(f'"invocation_type" must consist of non-whitespace characters, got "{invocation_type}"')
        if "invoke" in getattr(cls, "__abstractmethods__", ()):
            raise ValueError(f'Invocation "{invocation_type}" must implement the "invoke" method')
        if invocation_type in INVOCATIONS and INVOCATIONS[invocation_type].__qualname__ != cls.__qualname__:
            raise ValueError(f'Invocation type "{invocation_type}" is already registered')
        cls.UIConfig = UIConfigBase(title=title, tags=tags, category=category, version=version or "1.0.0")
        cls.type = invocation_type
        INVOCATIONS[invocation_type] = cls
        return cls

    return wrapper


def invocation_output(output_type):
    def wrapper(cls):
        if re.compile(r"^\S+$").match(output_type) is None:
            raise ValueError(f'"output_type" must consist of non-whitespace characters, got "{output_type}"')
        cls.type = output_type
        OUTPUTS[output_type] = cls
        return cls

    return wrapper

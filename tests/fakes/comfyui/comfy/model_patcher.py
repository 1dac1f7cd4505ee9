"""Mirrors comfy/model_patcher.py ModelPatcher (ComfyUI 0.3.64) as far as weight patches,
wrappers, callbacks and attachments go:

* ``clone()`` shares the model, copies the patch lists, model_options (deep), wrappers and
  callbacks (per key lists copied), attachments (``on_model_patcher_clone()`` when the
  attachment has it);
* ``add_patches(patches, strength_patch, strength_model)`` appends ``(strength_patch, value,
  strength_model, offset, function)`` per state-dict key the model has, returns those keys;
* ``patch_model()`` / ``load`` back every patched key up once and writes
  ``comfy.lora.calculate_weight(patches, fp32 copy, key)`` rounded to the weight's dtype,
  replacing the Parameter (``weight_inplace_update`` False); ``unpatch_model()`` puts the
  backups back;
* **partial loads** (``patch_model(lowvram_model_memory=N)``, what ``load_models_gpu`` asks for
  when the model does not fit; model_patcher.py L636-L742): modules are taken largest first
  (``_load_list``, L621-L634); those within the budget are patched as above, every other one
  keeps its pristine weight and gets ``weight_function`` / ``bias_function`` =
  ``[LowVramPatch(key, patches)]`` (L660-L682), which the cast layer runs on a copy of the
  weight at every forward (comfy/ops.py ``cast_bias_weight`` L61-L95); ``LowVramPatch.__call__``
  (L125-L147) computes ``comfy.lora.calculate_weight(patches, weight, key,
  intermediate_dtype=weight.dtype)``. ``unpatch_model`` wipes the weight functions
  (``wipe_lowvram_weight``, L98-L107). The fake's modules are torch's own Linear/Conv2d, so the
  cast layer is mirrored by a forward that reads the weight through those functions.
* ``get_model_object(name)`` (L466-L486: object patches first, then the model's attribute;
  KSampler reads ``model_sampling`` through it);
* ``add_wrapper_with_key`` / ``get_wrappers`` / ``remove_wrappers_with_key``,
  ``add_callback_with_key`` / ``get_all_callbacks``; ``pre_run`` (sets
  ``model.current_patcher``), ``prepare_state(timestep)`` (ON_PREPARE_STATE callbacks),
  ``cleanup``.
"""
import collections
import copy
import uuid

import torch

import comfy.float
import comfy.lora
import comfy.utils
from comfy.patcher_extension import CallbacksMP, WrappersMP


class LowVramPatch:
    def __init__(self, key, patches):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


def _cast_forward(m):
    """comfy.ops' cast layer forward for a torch Linear/Conv: weight and bias through their
    functions, on copies (cast_to(copy=has_function))."""

    def forward(x):
        w, b = m.weight, m.bias
        if b is not None and m.bias_function:
            b = b.clone()
            for f in m.bias_function:
                b = f(b)
        if m.weight_function:
            w = w.clone()
            for f in m.weight_function:
                w = f(w)
        if isinstance(m, torch.nn.Linear):
            return torch.nn.functional.linear(x, w, b)
        return m._conv_forward(x, w, b)

    return forward


def _wipe_lowvram(m):
    for name in ("weight_function", "bias_function", "forward"):
        if name in m.__dict__:
            delattr(m, name)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.attachments = {}
        self.additional_models = {}
        self.callbacks = CallbacksMP.init_callbacks()
        self.wrappers = WrappersMP.init_wrappers()
        if not hasattr(self.model, 'current_weight_patches_uuid'):
            self.model.current_weight_patches_uuid = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.attachments = {}
        for k in self.attachments:
            if hasattr(self.attachments[k], "on_model_patcher_clone"):
                n.attachments[k] = self.attachments[k].on_model_patcher_clone()
            else:
                n.attachments[k] = self.attachments[k]
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLONE):
            callback(self, n)
        return n

    def is_clone(self, other):
        return hasattr(other, 'model') and self.model is other.model

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return comfy.utils.get_attr(self.model, name)

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = None
            function = None
            if isinstance(k, str):
                key = k
            else:
                offset = k[1]
                key = k[0]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                p.add(k)
                current_patches = self.patches.get(key, [])
                current_patches.append((strength_patch, patches[k], strength_model, offset, function))
                self.patches[key] = current_patches
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = collections.namedtuple('Dimension', ['weight', 'inplace_update'])(
                weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp_weight = weight.to(torch.float32, copy=True)
        out_weight = comfy.lora.calculate_weight(self.patches[key], temp_weight, key)
        out_weight = comfy.float.stochastic_rounding(out_weight, weight.dtype)
        if inplace_update:
            comfy.utils.copy_to_param(self.model, key, out_weight)
        else:
            comfy.utils.set_attr_param(self.model, key, out_weight)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k in self.object_patches:
            old = comfy.utils.set_attr(self.model, k, self.object_patches[k])
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        if load_weights:
            with torch.no_grad():
                if lowvram_model_memory:
                    self._load_partially(lowvram_model_memory)
                else:
                    for key in self.patches:
                        self.patch_weight_to_device(key, device_to)
            self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def _load_partially(self, budget):
        loading = []
        for n, m in self.model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                size = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                loading.append((size, n, m))
        loading.sort(key=lambda x: (x[0], x[1]), reverse=True)
        used = 0
        self.lowvram_modules = []
        for size, n, m in loading:
            wkey, bkey = f"{n}.weight", f"{n}.bias"
            if used + size >= budget:
                m.weight_function = [LowVramPatch(wkey, self.patches)] if wkey in self.patches else []
                m.bias_function = [LowVramPatch(bkey, self.patches)] if bkey in self.patches else []
                m.forward = _cast_forward(m)
                self.lowvram_modules.append(n)
            else:
                used += size
                for key in (wkey, bkey):
                    self.patch_weight_to_device(key)
        self.model.model_lowvram = bool(self.lowvram_modules)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            if getattr(self.model, "model_lowvram", False):
                for m in self.model.modules():
                    _wipe_lowvram(m)
                self.model.model_lowvram = False
            for k in list(self.backup.keys()):
                bk = self.backup[k]
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, k, bk.weight)
                else:
                    comfy.utils.set_attr_param(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
        for k in list(self.object_patches_backup.keys()):
            comfy.utils.set_attr(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()

    # --- callbacks, wrappers, attachments -------------------------------------------------
    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type, key):
        c = self.callbacks.get(call_type, {})
        if key in c:
            c.pop(key)

    def get_callbacks(self, call_type, key):
        return self.callbacks.get(call_type, {}).get(key, [])

    def get_all_callbacks(self, call_type):
        c_list = []
        for c in self.callbacks.get(call_type, {}).values():
            c_list.extend(c)
        return c_list

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        w = self.wrappers.get(wrapper_type, {})
        if key in w:
            w.pop(key)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type):
        w_list = []
        for w in self.wrappers.get(wrapper_type, {}).values():
            w_list.extend(w)
        return w_list

    def set_attachments(self, key, attachment):
        self.attachments[key] = attachment

    def remove_attachments(self, key):
        if key in self.attachments:
            self.attachments.pop(key)

    def get_attachment(self, key):
        return self.attachments.get(key, None)

    def pre_run(self):
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = self
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)

    def prepare_state(self, timestep):
        for callback in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            callback(self, timestep)

    def cleanup(self):
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = None
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            callback(self)

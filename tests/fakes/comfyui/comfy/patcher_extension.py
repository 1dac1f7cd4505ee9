"""Mirrors comfy/patcher_extension.py (ComfyUI 0.3.64): CallbacksMP / WrappersMP names,
keyed callbacks and wrappers stored as {type: {key: [fn, ...]}} in a dict (a ModelPatcher's
own, or ``transformer_options``), WrapperExecutor (each wrapper gets the executor, calls it
to run the next wrapper or, last, the original; ``class_obj`` is the instance a wrapped
method belongs to), copy_nested_dicts and merge_nested_dicts."""


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_APPLY_HOOKS = "on_apply_hooks"
    ON_REGISTER_ALL_HOOK_PATCHES = "on_register_all_hook_patches"
    ON_INJECT_MODEL = "on_inject_model"
    ON_EJECT_MODEL = "on_eject_model"

    @classmethod
    def init_callbacks(cls):
        return {}


def add_callback_with_key(call_type, key, callback, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    callbacks = transformer_options.setdefault("callbacks", {})
    callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)


def get_all_callbacks(call_type, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    c_list = []
    for c in transformer_options.get("callbacks", {}).get(call_type, {}).values():
        c_list.extend(c)
    return c_list


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"

    @classmethod
    def init_wrappers(cls):
        return {}


def add_wrapper_with_key(wrapper_type, key, wrapper, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    wrappers = transformer_options.setdefault("wrappers", {})
    wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


def get_wrappers_with_key(wrapper_type, key, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    return list(transformer_options.get("wrappers", {}).get(wrapper_type, {}).get(key, []))


def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    w_list = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        w_list.extend(w)
    return w_list


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx):
        self.original = original
        self.class_obj = class_obj
        self.wrappers = wrappers.copy()
        self.idx = idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return self._create_next_executor().execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        args = list(args)
        kwargs = dict(kwargs)
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    def _create_next_executor(self):
        new_idx = self.idx + 1
        if new_idx > len(self.wrappers):
            raise Exception("Wrapper idx exceeded available wrappers; something went very wrong.")
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, new_idx)

    @classmethod
    def new_executor(cls, original, wrappers, idx=0):
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(cls, original, class_obj, wrappers, idx=0):
        return cls(original, class_obj, wrappers, idx)


def copy_nested_dicts(input_dict):
    new_dict = input_dict.copy()
    for key, value in input_dict.items():
        if isinstance(value, dict):
            new_dict[key] = copy_nested_dicts(value)
        elif isinstance(value, list):
            new_dict[key] = value.copy()
    return new_dict


def merge_nested_dicts(dict1, dict2, copy_dict1=True):
    merged_dict = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for key, value in dict2.items():
        if isinstance(value, dict):
            curr_value = merged_dict.setdefault(key, {})
            merged_dict[key] = merge_nested_dicts(value, curr_value)
        elif isinstance(value, list):
            merged_dict.setdefault(key, []).extend(value)
        else:
            merged_dict[key] = value
    return merged_dict

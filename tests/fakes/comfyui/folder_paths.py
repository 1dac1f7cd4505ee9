"""Mirrors folder_paths.py of ComfyUI 0.3.64 (Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832):
``folder_names_and_paths`` (name -> ([folders], {extensions})), ``get_folder_paths``,
``get_filename_list`` (relative paths, recursive, sorted), ``get_full_path`` and
``get_full_path_or_raise``."""
import os

supported_pt_extensions = {'.ckpt', '.pt', '.pt2', '.bin', '.pth', '.safetensors', '.pkl', '.sft'}
folder_names_and_paths = {"loras": ([], supported_pt_extensions)}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    out = set()
    folders, exts = folder_names_and_paths[folder_name]
    for x in folders:
        for dirpath, _, files in os.walk(x, followlinks=True):
            for f in files:
                if os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(dirpath, f), x))
    return sorted(out)


def get_full_path(folder_name, filename):
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_full_path_or_raise(folder_name, filename):
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path

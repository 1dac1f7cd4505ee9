"""Mirrors the state of extensions-builtin/Lora/networks.py (AUTOMATIC1111/stable-diffusion-webui
v1.10.1) that lora-ext has to cooperate with: ``loaded_networks``, ``load_networks(names,
te_multipliers, unet_multipliers, dyn_dims)``, and the lazy per-module application done from
the patched forwards: ``network_apply_weights(module)`` backs the weight up the first time a
network is wanted, and whenever the wanted list differs from ``network_current_names`` it
restores the backup and applies the wanted networks (here a fixed, visible change of +0.25
per network instead of real LoRA maths)."""
import torch

loaded_networks = []
extra_network_lora = None
originals = None


class LoadedNetwork:
    def __init__(self, name, te_multiplier, unet_multiplier, dyn_dim):
        self.name = name
        self.mentioned_name = name
        self.te_multiplier = te_multiplier
        self.unet_multiplier = unet_multiplier
        self.dyn_dim = dyn_dim


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    for i, name in enumerate(names):
        loaded_networks.append(LoadedNetwork(name, te_multipliers[i] if te_multipliers else 1.0,
                                             unet_multipliers[i] if unet_multipliers else 1.0,
                                             dyn_dims[i] if dyn_dims else None))


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is not None:
        with torch.no_grad():
            self.weight.copy_(weights_backup)


def network_apply_weights(self):
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        self.network_weights_backup = self.weight.detach().clone()
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        with torch.no_grad():
            for _ in loaded_networks:
                self.weight.add_(0.25)
        self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    """networks.py v1.10: called on a model reload (``_load_from_state_dict``); forgets the backup."""
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None

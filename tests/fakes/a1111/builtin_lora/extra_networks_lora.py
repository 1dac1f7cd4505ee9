"""Mirrors extensions-builtin/Lora/extra_networks_lora.py of A1111 v1.10.1: the built-in
``lora`` handler reading te / unet / dyn from positional and named args and loading them with
``networks.load_networks`` (its ``Lora hashes`` infotext is left out)."""
import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')
        self.errors = {}
        self.calls = []  # the fake keeps what it was asked to do

    def activate(self, p, params_list):
        self.calls.append([list(x.items) for x in params_list])
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            unet_multiplier = float(params.named.get("unet", unet_multiplier))
            dyn_dim = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn_dim = int(params.named["dyn"]) if "dyn" in params.named else dyn_dim
            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)
            dyn_dims.append(dyn_dim)
        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)

    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()

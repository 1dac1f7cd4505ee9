"""Mirrors extensions-builtin/Lora/scripts/lora_script.py of A1111 v1.10.1 (the registration
part): patches the forwards at import, registers the ``lora`` handler and its ``lyco`` alias
in ``before_ui``, undoes the patches when scripts unload."""
import extra_networks_lora
import lora_patches
import networks
from modules import extra_networks, script_callbacks


def unload():
    networks.originals.undo()


def before_ui():
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)

"""Mirrors extensions-builtin/Lora/lora_patches.py (A1111 v1.10.1): the built-in Lora
extension replaces ``torch.nn.Linear.forward`` and ``torch.nn.Conv2d.forward`` with versions
that call ``networks.network_apply_weights(self)`` first; ``undo()`` puts them back."""
import torch

import networks


class LoraPatches:
    def __init__(self):
        self.linear = torch.nn.Linear.forward
        self.conv = torch.nn.Conv2d.forward
        lin, conv = self.linear, self.conv

        def network_Linear_forward(self, input):
            networks.network_apply_weights(self)
            return lin(self, input)

        def network_Conv2d_forward(self, input):
            networks.network_apply_weights(self)
            return conv(self, input)

        torch.nn.Linear.forward = network_Linear_forward
        torch.nn.Conv2d.forward = network_Conv2d_forward

    def undo(self):
        torch.nn.Linear.forward = self.linear
        torch.nn.Conv2d.forward = self.conv

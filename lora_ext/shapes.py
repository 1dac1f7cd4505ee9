"""Shape rules shared by the adapter types and the torch-free inspect path (no torch here, so
``lora_ext.fastpath`` reads them without importing it)."""
from __future__ import annotations

import math


def prod(shape) -> int:
    return int(math.prod(shape))


def shapes_compatible(adapter_shape, target_shape) -> bool:
    """Whether a delta of ``adapter_shape`` is the weight ``target_shape`` (exactly or reshaped).

    Allowed besides equality: trailing 1x1 kernel dims on either side ((out, in) on a 1x1 conv
    and back), and a 2-D ``(out, in*k*k)`` delta, which is how LyCORIS stores LoHa/LoKr/LoCon
    factors of a k x k conv without a Tucker core (the kernel is folded into the in axis).
    """
    a, t = tuple(adapter_shape), tuple(target_shape)
    if a == t:
        return True
    if len(a) < 2 or len(t) < 2 or a[0] != t[0]:
        return False

    def squeeze(s):
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if squeeze(a) == squeeze(t):
        return True
    return len(squeeze(a)) == 2 and a[1] == prod(t[1:])

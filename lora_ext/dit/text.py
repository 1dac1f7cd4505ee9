"""T5 encoder module tables (component ``te3``): Flux.1 and SD3's T5-XXL, for kohya's
``lora_te3_`` (and OneTrainer's ``lora_te2_`` on Flux) text-encoder LoRAs.

Generated from the T5 config's numbers, in transformers' ``T5EncoderModel`` naming, which is
also how the T5 single files (``t5xxl_fp16.safetensors``) name their weights.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from ..arch import ModuleInfo

T5_XXL = dict(d_model=4096, d_kv=64, heads=64, d_ff=10240, layers=24, vocab=32128, buckets=32, gated=1)


def t5_table(dims: Mapping = T5_XXL, root: str = "") -> dict:
    d, inner, ff = int(dims["d_model"]), int(dims["d_kv"]) * int(dims["heads"]), int(dims["d_ff"])
    rows = [("shared", "embedding", (int(dims["vocab"]), d))]
    for i in range(int(dims["layers"])):
        b = f"encoder.block.{i}.layer."
        rows += [(b + "0.SelfAttention.q", "linear", (inner, d)), (b + "0.SelfAttention.k", "linear", (inner, d)),
                 (b + "0.SelfAttention.v", "linear", (inner, d)), (b + "0.SelfAttention.o", "linear", (d, inner))]
        if i == 0:
            rows.append((b + "0.SelfAttention.relative_attention_bias", "embedding",
                         (int(dims["buckets"]), int(dims["heads"]))))
        rows.append((b + "0.layer_norm", "norm", (d,)))
        if int(dims.get("gated", 1)):
            rows += [(b + "1.DenseReluDense.wi_0", "linear", (ff, d)), (b + "1.DenseReluDense.wi_1", "linear", (ff, d))]
        else:
            rows.append((b + "1.DenseReluDense.wi", "linear", (ff, d)))
        rows += [(b + "1.DenseReluDense.wo", "linear", (d, ff)), (b + "1.layer_norm", "norm", (d,))]
    rows.append(("encoder.final_layer_norm", "norm", (d,)))
    return {p: ModuleInfo("te3", p, kind, shape, None, "BASE", p, root + p + ".weight", None)
            for p, kind, shape in rows}


def t5_dims(shapes: Mapping[str, tuple]) -> Optional[dict]:
    """T5 encoder dimensions from ``{parameter name: shape}``, or None when it is no T5."""
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    rel = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if q is None or rel is None:
        return None
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes.get("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", (0,))
    rx = re.compile(r"encoder\.block\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for k in shapes for m in [rx.match(k)] if m)
    heads = int(rel[1])
    emb = shapes.get("shared.weight", (T5_XXL["vocab"], int(q[1])))
    return dict(d_model=int(q[1]), d_kv=int(q[0]) // heads, heads=heads, d_ff=int(ff[0]), layers=layers,
                vocab=int(emb[0]), buckets=int(rel[0]), gated=int(gated))

"""Prompts -> UNet conditioning, as A1111 computes it.

* SD1.x / SD2.x: the text encoder's last hidden state (after its final layer norm); with
  ``clip_skip = N > 1`` the output of the N-th layer from the end, through the final norm.
* SDXL: both encoders' penultimate hidden states (``clip_skip`` counts from there), no final
  norm, concatenated along the features; plus encoder 2's projected pooled output of the
  first chunk (``text_embeds``).
* Prompts longer than the encoder's window (75 tokens for SD) are split into chunks of that
  size, each encoded on its own and concatenated along the sequence (A1111's long prompts);
  the shorter of prompt and negative prompt is padded with empty chunks to the same length.
  Prompts that fit one window encode exactly as diffusers does.
"""
from __future__ import annotations

import torch

from .denoiser import Conditioning
from .tokenizer import tokenize_chunks

__all__ = ["count_chunks", "encode_prompt"]


def _window(te) -> int:
    return int(te.config.max_position_embeddings)


def count_chunks(model, text: str) -> int:
    tok, te = model.tokenizers[0], model.text_encoders[0]
    return len(tokenize_chunks(tok, text, _window(te)))


def _ids(tok, te, text: str, chunks: int) -> torch.Tensor:
    window = _window(te)
    rows = tokenize_chunks(tok, text, window)
    empty = [tok.bos, tok.eos] + [tok.pad] * (window - 2)
    rows += [empty] * (chunks - len(rows))
    return torch.tensor(rows, dtype=torch.long, device=next(te.parameters()).device)


def _final_norm(te):
    return getattr(te, "text_model", te).final_layer_norm


@torch.no_grad()
def encode_prompt(model, text: str, *, chunks: int = 1, clip_skip: int = 1) -> Conditioning:
    """One prompt -> a :class:`Conditioning` of batch 1 (SDXL: ``text_embeds`` only; the
    pipeline adds ``time_ids``)."""
    clip_skip = max(1, int(clip_skip))
    chunks = max(chunks, count_chunks(model, text))
    if not model.sdxl:
        tok, te = model.tokenizers[0], model.text_encoders[0]
        ids = _ids(tok, te, text, chunks)
        if clip_skip == 1:
            h = te(ids).last_hidden_state
        else:
            h = _final_norm(te)(te(ids, output_hidden_states=True).hidden_states[-clip_skip])
        return Conditioning(h.reshape(1, -1, h.shape[-1]).float())
    states, pooled = [], None
    for tok, te in zip(model.tokenizers, model.text_encoders):
        out = te(_ids(tok, te, text, chunks), output_hidden_states=True)
        states.append(out.hidden_states[-(clip_skip + 1)])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[:1]
    h = torch.cat(states, dim=-1)
    added = {} if pooled is None else {"text_embeds": pooled.float()}
    return Conditioning(h.reshape(1, -1, h.shape[-1]).float(), added)

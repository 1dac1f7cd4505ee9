"""The CLIP tokenizer, found on this machine (lora-ext ships no copy of CLIP's vocabulary and
never downloads one).

Every Stable Diffusion text encoder (CLIP ViT-L for SD1.x and SDXL, OpenCLIP ViT-H for SD2.x,
OpenCLIP ViT-bigG for SDXL) uses the same 49408-token byte-level BPE vocabulary. What differs
is the padding token: SD1.x and SDXL's first encoder pad with ``<|endoftext|>``, SD2.x and
SDXL's second with ``!`` (id 0), as their diffusers ``tokenizer`` folders say and as A1111 and
ComfyUI do.

Where it is looked for, first hit wins (:func:`find_vocabulary`):

1. an explicit ``tokenizer=`` / ``--tokenizer PATH``: a folder with ``vocab.json`` and
   ``merges.txt`` (e.g. any SD pipeline's ``tokenizer/`` folder or a CLIP model folder), a
   folder holding such a ``tokenizer/`` folder, or the file ``bpe_simple_vocab_16e6.txt.gz``;
2. beside the checkpoint: a diffusers pipeline's own ``tokenizer/`` (``tokenizer_2/``) folder,
   or a ``tokenizer/`` folder next to a single-file checkpoint;
3. the Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``):
   any downloaded CLIP model or SD pipeline that has ``vocab.json`` and ``merges.txt``;
4. a ComfyUI install the checkpoint sits in (``comfy/sd1_tokenizer``);
5. an installed Python package that carries the vocabulary: ``instant-clip-tokenizer``
   (``pip install instant-clip-tokenizer``, needs only numpy), or the
   ``bpe_simple_vocab_16e6.txt.gz`` inside an installed ``open_clip`` or OpenAI ``clip``
   package (found by file, never imported).

When none is found, :class:`TokenizerNotFound` says exactly what to provide.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import LoraExtError

__all__ = ["ClipTokenizer", "TokenizerNotFound", "find_vocabulary", "load_tokenizer", "bpe_vocabulary"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408


class TokenizerNotFound(LoraExtError):
    """No CLIP vocabulary on this machine; the message lists what to provide."""


def _bytes_to_unicode() -> dict:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def bpe_vocabulary(path: str) -> tuple[dict, list]:
    """(vocab, merges) from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, built the way CLIP's own
    tokenizer builds them: byte characters, the same with ``</w>``, one token per merge, then
    the two special tokens."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_VOCAB_SIZE - 256 - 256 - 2 + 1] if line.strip()]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@dataclass
class ClipTokenizer:
    """Text -> CLIP token ids. ``encode`` gives the ids without BOS/EOS; ``bos``, ``eos``,
    ``pad`` are ids; ``source`` says where the vocabulary came from."""

    backend: object
    bos: int
    eos: int
    pad: int
    source: str
    kind: str = "hf"  # "hf" (transformers CLIPTokenizer) | "instant" (instant_clip_tokenizer)

    def __post_init__(self):
        self._fast = None
        if self.kind == "hf":
            # a copy of the Rust tokenizer without the padding/truncation the transformers
            # object may have switched on (we chunk and pad ourselves)
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(self.backend.backend_tokenizer.to_str())
            self._fast.no_padding()
            self._fast.no_truncation()

    def encode(self, text: str) -> list[int]:
        if self.kind == "instant":
            return list(self.backend.encode(text))
        return self._fast.encode(text, add_special_tokens=False).ids

    def with_pad(self, pad: Optional[int]) -> "ClipTokenizer":
        return self if pad is None else ClipTokenizer(self.backend, self.bos, self.eos, pad, self.source, self.kind)


# ---------------------------------------------------------------------------------------------
# where a vocabulary may be


def _is_vocab_dir(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt"))


def _hf_hub_dirs() -> list[str]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        out.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        out.append(os.path.join(os.environ["HF_HOME"], "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    out.append(os.path.join(xdg, "huggingface", "hub"))
    seen, unique = set(), []
    for d in out:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


# Repositories whose vocabulary is CLIP's, most common first; any other cached repo with a
# 49408-token vocab.json is also accepted.
_PREFERRED_REPOS = (
    "models--openai--clip-vit-large-patch14", "models--openai--clip-vit-base-patch32",
    "models--stable-diffusion-v1-5--stable-diffusion-v1-5", "models--runwayml--stable-diffusion-v1-5",
    "models--stabilityai--stable-diffusion-xl-base-1.0", "models--stabilityai--stable-diffusion-2-1",
    "models--laion--CLIP-ViT-bigG-14-laion2B-39B-b160k", "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K",
)


def _looks_like_clip_vocab(folder: str) -> bool:
    try:
        if os.path.getsize(os.path.join(folder, "vocab.json")) < 100_000:
            return False
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
            vocab = json.load(fh)
        return isinstance(vocab, dict) and len(vocab) == CLIP_VOCAB_SIZE and BOS in vocab
    except (OSError, ValueError):
        return False


def _hf_cache_candidates() -> list[str]:
    found = []
    for hub in _hf_hub_dirs():
        if not os.path.isdir(hub):
            continue
        try:
            repos = sorted(r for r in os.listdir(hub) if r.startswith("models--"))
        except OSError:
            continue
        repos.sort(key=lambda r: (_PREFERRED_REPOS.index(r) if r in _PREFERRED_REPOS else len(_PREFERRED_REPOS)))
        for repo in repos:
            snaps = os.path.join(hub, repo, "snapshots")
            if not os.path.isdir(snaps):
                continue
            for snap in sorted(os.listdir(snaps)):
                for sub in ("", "tokenizer", "tokenizer_2"):
                    folder = os.path.join(snaps, snap, sub)
                    if _is_vocab_dir(folder) and _looks_like_clip_vocab(folder):
                        found.append(folder)
    return found


def _comfyui_candidates(checkpoint: Optional[str]) -> list[str]:
    if not checkpoint:
        return []
    out = []
    d = os.path.dirname(os.path.abspath(checkpoint))
    for _ in range(5):
        folder = os.path.join(d, "comfy", "sd1_tokenizer")
        if _is_vocab_dir(folder):
            out.append(folder)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _package_file(package: str, name: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _installed_vocabularies() -> list:
    out = []
    try:
        if importlib.util.find_spec("instant_clip_tokenizer") is not None:
            out.append(Vocabulary("instant", "instant_clip_tokenizer"))
    except (ImportError, ValueError):
        pass
    for package in ("open_clip", "clip"):
        gz = _package_file(package, "bpe_simple_vocab_16e6.txt.gz")
        if gz:
            out.append(Vocabulary("bpe_gz", gz))
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Where a CLIP vocabulary is: ``kind`` "folder" (vocab.json + merges.txt), "bpe_gz" or
    "instant"; ``path``; ``pad`` token string when the folder says which."""

    kind: str
    path: str
    pad: Optional[str] = None


def _folder_pad(folder: str) -> Optional[str]:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        pad = data.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None


def _own_pad(folder: str, name: str, which: int) -> Optional[str]:
    """The folder's pad token when it is this encoder's own tokenizer folder (``tokenizer``
    for the first encoder, ``tokenizer_2`` for the second); otherwise the family's default
    applies (a CLIP-L folder says ``<|endoftext|>``, which is wrong for SD2.x)."""
    own = "tokenizer_2" if which == 1 else "tokenizer"
    return _folder_pad(folder) if name == own else None


def _explicit(path: str, which: int) -> Optional[Vocabulary]:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(path) and path.endswith(".gz"):
        return Vocabulary("bpe_gz", path)
    subs = ("tokenizer_2", "tokenizer") if which == 1 else ("tokenizer",)
    for sub in ("",) + subs:
        folder = os.path.join(path, sub) if sub else path
        if _is_vocab_dir(folder):
            return Vocabulary("folder", folder, _own_pad(folder, sub, which))
    gz = os.path.join(path, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.isfile(gz):
        return Vocabulary("bpe_gz", gz)
    return None


def find_vocabulary(*, which: int = 0, tokenizer: Optional[str] = None, checkpoint: Optional[str] = None,
                    looked: Optional[list] = None) -> Vocabulary:
    """Where the vocabulary for text encoder ``which`` (0 or 1) is; see the module doc for the
    order. ``looked`` collects the places tried (for the error message)."""
    looked = [] if looked is None else looked
    if tokenizer:
        v = _explicit(tokenizer, which)
        if v is None:
            raise TokenizerNotFound(
                f"{tokenizer}: no CLIP tokenizer there; give a folder with vocab.json and merges.txt "
                "(such as a Stable Diffusion pipeline's tokenizer/ folder) or the file bpe_simple_vocab_16e6.txt.gz")
        return v
    if checkpoint:
        ckpt = os.path.abspath(os.fspath(checkpoint))
        base = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)
        names = ("tokenizer_2", "tokenizer") if which == 1 else ("tokenizer",)
        for name in names:
            folder = os.path.join(base, name)
            looked.append(folder)
            if _is_vocab_dir(folder):
                return Vocabulary("folder", folder, _own_pad(folder, name, which))
    looked.append("the Hugging Face cache (" + ", ".join(_hf_hub_dirs()) + ")")
    for folder in _hf_cache_candidates():
        return Vocabulary("folder", folder, None)
    for folder in _comfyui_candidates(checkpoint):
        return Vocabulary("folder", folder, None)
    looked.append("installed packages instant_clip_tokenizer, open_clip, clip")
    for v in _installed_vocabularies():
        return v
    raise TokenizerNotFound(
        "no CLIP tokenizer vocabulary on this machine (lora-ext ships none and downloads nothing). "
        "Provide one of: --tokenizer DIR, a folder with vocab.json and merges.txt (the tokenizer/ folder of "
        "any Stable Diffusion diffusers pipeline, or of openai/clip-vit-large-patch14), or the file "
        "bpe_simple_vocab_16e6.txt.gz; or put such a tokenizer/ folder next to the checkpoint; or have "
        "openai/clip-vit-large-patch14 in the Hugging Face cache; or `pip install instant-clip-tokenizer` "
        "(a small package carrying CLIP's vocabulary, numpy only). Looked in: " + "; ".join(looked))


@functools.lru_cache(maxsize=16)
def _hf_backend(kind: str, path: str):
    from transformers import CLIPTokenizer

    if kind == "folder":
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as fh:
            vocab = json.load(fh)
        with open(os.path.join(path, "merges.txt"), encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    else:
        vocab, merges = bpe_vocabulary(path)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def load_tokenizer(vocab: Vocabulary, default_pad: str = EOS) -> ClipTokenizer:
    """A :class:`ClipTokenizer` over ``vocab``; the pad token is the folder's own if it names
    one, else ``default_pad``."""
    if vocab.kind == "instant":
        import instant_clip_tokenizer

        ids = {BOS: 49406, EOS: 49407, "!": 0}
        return ClipTokenizer(instant_clip_tokenizer.Tokenizer(), 49406, 49407, ids.get(default_pad, 49407),
                             "instant-clip-tokenizer (installed package)", kind="instant")
    backend = _hf_backend(vocab.kind, vocab.path)
    conv = backend.convert_tokens_to_ids
    pad = vocab.pad or default_pad
    pad_id = conv(pad)
    if pad_id is None or pad_id == backend.unk_token_id and pad != backend.unk_token:
        pad_id = conv(EOS)
    return ClipTokenizer(backend, conv(BOS), conv(EOS), pad_id, vocab.path)


def tokenize_chunks(tok: ClipTokenizer, text: str, length: int) -> list[list[int]]:
    """A1111's long prompts: the ids in chunks of ``length - 2``, each wrapped in BOS ... EOS
    and padded to ``length``. An empty prompt is one chunk."""
    ids = tok.encode(text)
    size = length - 2
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]
    return [[tok.bos] + c + [tok.eos] + [tok.pad] * (size - len(c)) for c in chunks]


def find_tokenizers(count: int, *, tokenizer: Optional[str] = None, checkpoint: Optional[str] = None,
                    default_pads: Sequence[str] = (EOS, "!")) -> list[ClipTokenizer]:
    """One tokenizer per text encoder (``count`` of them)."""
    out = []
    for which in range(count):
        vocab = find_vocabulary(which=which, tokenizer=tokenizer, checkpoint=checkpoint)
        out.append(load_tokenizer(vocab, default_pads[which]))
    return out

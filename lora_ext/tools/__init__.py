"""LoRA tools: extract / unmerge, combine, resize, convert, transfer (Python API of the CLI).

Every function writes one output file (or checkpoint, for ``unmerge(loras=...)``), returns a
:class:`~lora_ext.tools.common.Report` (summary lines, one row per module, input keys not
used) and, given ``log=print``, prints it. ``progress=True`` shows a bar on stderr (``None``:
only when stderr is a terminal).
"""
from .combine import combine, resize
from .common import Report, Row, parse_source_arg
from .convert import convert
from .extract import extract, restore_base, unmerge
from .svd import factorize, factorize_product, randomized_svd
from .transfer import transfer
from .writer import FormatError

__all__ = ["extract", "unmerge", "restore_base", "combine", "resize", "convert", "transfer", "Report", "Row",
           "parse_source_arg", "factorize", "factorize_product", "randomized_svd", "FormatError"]

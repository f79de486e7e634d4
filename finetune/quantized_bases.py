"""Quantized checkpoints people pick as a fine-tuning base, and the bf16 repos to pick instead.

One place for the refusal and its wording: the profile refuses a known quantized repo id when it is validated, and
the download stage refuses any checkpoint whose config carries a ``quantization_config`` with the same hint.
"""

from __future__ import annotations

import re

BF16_REPOS = {"meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8": "meta-llama/Llama-4-Maverick-17B-128E-Instruct"}
"""Quantized repos people pick as a base, and the bf16 weights they were made from."""
_FP8_SUFFIX = re.compile(r"[-_]fp8$", re.IGNORECASE)


def bf16_hint(repo_id: str | None) -> str:
    """What to fine-tune instead of the quantized ``repo_id``."""
    if repo_id in BF16_REPOS:
        return f"fine-tune {BF16_REPOS[repo_id]} instead"
    if repo_id and _FP8_SUFFIX.search(repo_id):
        return f"fine-tune the bf16 repo it was quantized from ({_FP8_SUFFIX.sub('', repo_id)}?) instead"
    return "fine-tune the bf16 checkpoint it was quantized from instead"


def quantized_repo_error(repo_id: str | None) -> str | None:
    """Why ``repo_id`` cannot be a base (a known FP8 repo, or a name ending in -FP8), or None when it can."""
    if not repo_id or not (repo_id in BF16_REPOS or _FP8_SUFFIX.search(repo_id)):
        return None
    # Why refused and not dequantized: an FP8 base would need its 400B weights dequantized on load.
    return (f"{repo_id} holds FP8-quantized weights; training needs the bf16 weights (dequantizing 400B "
            f"parameters on load is not supported): {bf16_hint(repo_id)}")

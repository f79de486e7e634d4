"""Builds the embedded default's base model: a tiny, randomly initialised Llama 4 text model.

It keeps every Llama 4 text feature the pipeline must handle (routed + shared experts, top-1
sigmoid routing, chunked local attention on RoPE layers, a NoPE global layer every 4th layer
with attention temperature tuning, QK L2-norm, GQA, untied lm_head) at sizes a 2-core CPU
trains in minutes. The build is a pure function of the seed: same bytes in any process.

Sizes were picked by measurement (2.30M parameters; plain AdamW loop on this HF model, 2 torch
threads, lr 3e-3 cosine, 64 chats per step, loss on assistant tokens): train loss 6.25 -> 0.003
in 200 steps (~167 s of 2-core CPU time) and greedy exact match on the test split 0% -> 100%.

`python -m embedded.tiny_model OUT_DIR [--seed N] [--family scout|maverick]` writes a Hugging Face checkpoint
directory; a family other than tiny keeps these dims in that family's shape (its routed-expert count, MoE interleave
and qk-norm: llama4tune.models.embedded_text_config), what a rehearsal of a Scout or Maverick profile trains.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile

import torch
from transformers import GenerationConfig, Llama4ForCausalLM, Llama4TextConfig

from embedded import tokenizer as tiny_tokenizer
from llama4tune.models import TINY_TEXT_CONFIG, embedded_text_config

_BPE_IDS = {name: i for i, name in enumerate(tiny_tokenizer.NAMED_SPECIAL_TOKENS)}
BOS_ID = _BPE_IDS[tiny_tokenizer.BOS]
EOS_ID = _BPE_IDS[tiny_tokenizer.EOS]
EOT_ID = _BPE_IDS[tiny_tokenizer.EOT]
PAD_ID = _BPE_IDS[tiny_tokenizer.PAD]
FAMILIES = ("tiny", "scout", "maverick")


def tiny_text_config(family: str = "tiny") -> Llama4TextConfig:
    """The tiny architecture in `family`'s shape as a transformers config (fp32 weights)."""
    config = Llama4TextConfig(**embedded_text_config(family))
    config.architectures = ["Llama4ForCausalLM"]
    config.dtype = torch.float32
    return config


def init_tiny_model(seed: int = 0, family: str = "tiny") -> Llama4ForCausalLM:
    """A freshly initialised tiny model; every parameter is drawn from `seed` (no torch.empty left over)."""
    config = tiny_text_config(family)
    with torch.device("cpu"):  # CPU RNG: identical weights on any machine, GPU or not
        torch.manual_seed(seed)
        model = Llama4ForCausalLM(config)
        # transformers' own initialisation, re-run under the seed so that every tensor, including
        # the experts' torch.empty parameters, is set in a fixed order from this generator.
        torch.manual_seed(seed)
        for module in model.modules():
            model._init_weights(module)
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise RuntimeError(f"tiny model init left non-finite values in {name}")
    return model.eval()


def generation_config() -> GenerationConfig:
    """Greedy decoding that stops at end of turn or end of text."""
    return GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, EOT_ID],
        pad_token_id=PAD_ID,
        do_sample=False,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_tiny_model(out_dir: pathlib.Path, seed: int = 0, family: str = "tiny") -> pathlib.Path:
    """Write the tiny model (config, safetensors, tokenizer, generation config) to `out_dir`.

    The directory appears atomically (built beside it, then renamed); an existing `out_dir` is
    never overwritten.
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"tiny model output {out_dir} already exists; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    bpe = tiny_tokenizer.train_shipped_bpe()
    ids = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID], "pad_token_id": PAD_ID}
    if any(TINY_TEXT_CONFIG[name] != value for name, value in ids.items()):
        raise RuntimeError(f"the tokenizer's special token ids {ids} differ from llama4tune.models.TINY_TEXT_CONFIG's")
    if bpe.get_vocab_size() != TINY_TEXT_CONFIG["vocab_size"]:
        raise RuntimeError(
            f"tokenizer has {bpe.get_vocab_size()} tokens but TINY_TEXT_CONFIG['vocab_size'] is "
            f"{TINY_TEXT_CONFIG['vocab_size']}"
        )
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model = init_tiny_model(seed, family)
        model.generation_config = generation_config()
        model.save_pretrained(tmp)
        tiny_tokenizer.save_tokenizer(tmp, bpe)
        # mkdtemp and the safetensors writer create owner-only files; the checkpoint is shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m embedded.tiny_model", description=__doc__)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="tiny", help="whose shape (experts, MoE interleave)")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed, family=args.family)
    print(f"wrote {path} ({count_parameters(init_tiny_model(args.seed, args.family)):,} parameters)")


if __name__ == "__main__":
    main()

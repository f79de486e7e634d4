"""Byte-level BPE tokenizer for the embedded tiny Llama 4, with Llama 4's special tokens and chat format.

Trained deterministically on the shipped train split. The real Llama 4 tokenizer (tiktoken,
~200k entries, specials from id 200000) is far too large for a tiny model, so this one keeps
Llama 4's special-token *names* and chat template but numbers everything from 0.

`python -m embedded.tokenizer OUT_DIR` writes tokenizer.json, tokenizer_config.json (with the
chat template) and special_tokens_map.json, loadable with transformers.AutoTokenizer offline.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from embedded.dataset import read_split
from llama4tune.tool_calls import TOOLS_PREAMBLE

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOT = "<|eot|>"
PAD = "<|finetune_right_pad|>"
NAMED_SPECIAL_TOKENS: list[str] = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD]
# Fixed total size (shared with the model config): 256 byte symbols + named specials + merges,
# then reserved specials fill the rest, as Llama 4 reserves unused special ids. The shipped
# text supports only a few dozen merges; MIN_RESERVED caps the merges so the fill never fails.
VOCAB_SIZE = 512
MIN_RESERVED = 8
MODEL_MAX_LENGTH = 2048
# Llama 4 pre-splits text with the o200k regex (tiktoken's public o200k_base pattern): letters by
# case, digits in runs of at most three, newline runs kept whole.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Llama 4's format (its tokenizer_config's template without images): BOS once, then per message a header, two
# newlines, the trimmed content and <|eot|>; tool output under the `ipython` header. Tools and tool calls follow
# vLLM's llama4_pythonic format exactly as llama4tune/tool_calls.py renders training data (definitions after a preamble in
# the system message, an assistant call turn is `[name(arg=<Python literal>, ...)]`), so a served model is prompted
# as it was trained. `pyval` writes a JSON value as tool_calls.python_literal does.
CHAT_TEMPLATE = (
    "{%- macro pyval(v) -%}"
    "{%- if v is none -%}None{%- elif v is sameas true -%}True{%- elif v is sameas false -%}False"
    "{%- elif v is string or v is number -%}{{ v | tojson }}"
    "{%- elif v is mapping -%}{{ '{' }}{%- for k, item in v.items() -%}"
    "{{ k | string | tojson }}: {{ pyval(item) }}{{ ', ' if not loop.last else '' }}{%- endfor -%}{{ '}' }}"
    "{%- else -%}[{%- for item in v -%}{{ pyval(item) }}{{ ', ' if not loop.last else '' }}{%- endfor -%}]"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token }}"
    "{%- if tools %}"
    "{%- set ns = namespace(listing=" + json.dumps(TOOLS_PREAMBLE) + " + '[') %}"
    "{%- for tool in tools %}"
    "{%- set ns.listing = ns.listing + ((tool.function if tool.function is defined else tool) | tojson)"
    " + (', ' if not loop.last else ']') %}"
    "{%- endfor %}"
    "{%- set listing = ns.listing %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- if system %}{%- set listing = system + '\\n' + listing %}{%- endif %}"
    "{%- endif %}"
    "{{- '<|header_start|>system<|header_end|>\\n\\n' + listing | trim + '<|eot|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n[' }}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- fn.name + '(' }}"
    "{%- for k, v in fn.arguments.items() %}{{- k + '=' + pyval(v) + (', ' if not loop.last else '') }}{%- endfor %}"
    "{{- ')' + (', ' if not loop.last else '') }}"
    "{%- endfor %}"
    "{{- ']<|eot|>' }}"
    "{%- else %}"
    "{{- '<|header_start|>' + ('ipython' if message['role'] == 'tool' else message['role']) + '<|header_end|>\\n\\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


def _training_texts() -> Iterator[str]:
    """Every message of the shipped train split with the header text the chat template puts around it."""
    for row in read_split("train"):
        for message in row["messages"]:
            yield f"{message['role']}\n\n{message['content']}"


def train_bpe(texts: Iterable[str]) -> Tokenizer:
    """A byte-level BPE over `texts`: named specials at ids 0..5, reserved specials at the top."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - MIN_RESERVED,
        min_frequency=2,
        special_tokens=NAMED_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    reserved = VOCAB_SIZE - tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(f"<|reserved_special_token_{i}|>", special=True, normalized=False) for i in range(reserved)]
    )
    # Plain-text encodes (e.g. lm-eval loglikelihood) start with BOS as Llama 4's do;
    # apply_chat_template encodes without special tokens, so the template's BOS is not doubled.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def train_shipped_bpe() -> Tokenizer:
    """The project's tiny tokenizer, trained on the shipped train split."""
    return train_bpe(_training_texts())


def special_tokens(tokenizer: Tokenizer) -> list[str]:
    """All special tokens of `tokenizer` in id order."""
    added = tokenizer.get_added_tokens_decoder()
    return [added[i].content for i in sorted(added) if added[i].special]


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, object]:
    """tokenizer_config.json contents, readable by transformers 4.x and 5.x alike."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,  # chat turns end with <|eot|>, as in Llama 4 Instruct's tokenizer
        "pad_token": PAD,
        "additional_special_tokens": [t for t in special_tokens(tokenizer) if t not in (BOS, EOT, PAD)],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, object]:
    config = tokenizer_config(tokenizer)
    return {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}


def save_tokenizer(out_dir: pathlib.Path, tokenizer: Tokenizer | None = None) -> list[pathlib.Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into existing `out_dir`."""
    tok = train_shipped_bpe() if tokenizer is None else tokenizer
    files = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(tok), indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map(tok), indent=2) + "\n",
    }
    paths = []
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        paths.append(out_dir / name)
    return paths


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m embedded.tokenizer OUT_DIR")
    out_dir = pathlib.Path(args[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_shipped_bpe()
    for path in save_tokenizer(out_dir, tokenizer):
        print(path)
    print(f"vocab size: {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()

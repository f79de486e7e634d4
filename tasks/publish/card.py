"""The model card (a Hugging Face README.md) of a published model: what it is, where it came from, how it scores.

The Llama 4 Community License asks a redistributed derivative to carry its notice, to say "Built with Llama" and to
begin its name with "Llama"; the card does all three (the name is checked by the profile, PublishConfig.name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from finetune.hashing import hash_json
from finetune.profile import Profile
from finetune.store import Artifact
from llama4tune.tool_calls import SERVE_FLAGS, TOOL_CALL_PARSER
from tasks.run_report import result_sections

LICENSE_LINK = "https://github.com/meta-llama/llama-models/blob/main/models/llama4/LICENSE"
LICENSE_NOTICE = ("Llama 4 is licensed under the Llama 4 Community License, Copyright © Meta Platforms, Inc. All "
                  "Rights Reserved.")
WHAT = {"w4a16": "W4A16 (int4 weights, group-wise scales; compressed-tensors, served natively by vLLM)",
        "bf16": "bf16 Hugging Face checkpoint (safetensors)",
        "adapter": "PEFT LoRA adapter (apply it to the base model below)"}


def model_name(profile: Profile) -> str:
    return profile.publish.name or f"Llama-4-{profile.name}-{profile.publish.model}"


def base_model(profile: Profile, download: Artifact) -> tuple[str, str | None]:
    """The base model's hub id (or its local source) and its resolved revision."""
    fingerprint = download.config.get("fingerprint", {})
    if profile.model.source == "hub":
        return str(profile.model.repo_id), fingerprint.get("revision")
    return f"{profile.model.source} model ({profile.model.path or profile.model.family or 'embedded'})", \
        fingerprint.get("content")


def model_card(profile: Profile, inputs: Mapping[str, Artifact]) -> str:
    name = model_name(profile)
    base, revision = base_model(profile, inputs["download"])
    pack = inputs["pack"]
    front: dict[str, Any] = {
        "license": "other", "license_name": "llama4", "license_link": LICENSE_LINK,
        "library_name": "peft" if profile.publish.model == "adapter" else "transformers",
        "pipeline_tag": "text-generation", "tags": ["llama", "llama-4", "facebook", "meta", profile.publish.model],
    }
    if profile.model.source == "hub":
        front["base_model"] = base
    train = profile.train
    training = {"method": train.method, "epochs": train.epochs, "max_steps": train.max_steps, "lr": train.lr,
                "batch_size": train.batch_size, "gradient_accumulation_steps": train.gradient_accumulation_steps,
                "max_seq_len": profile.data.max_seq_len, "world_size": train.world_size,
                **({"lora": train.lora.model_dump(mode="json")} if train.lora and train.method != "full" else {})}
    sections = result_sections(inputs, profile.gate)
    lineage = "\n".join(f"| {label} | {artifact.stage} | `{artifact.key}` |" for label, artifact in inputs.items())
    body = [
        f"# {name}",
        "**Built with Llama.**",
        f"{name} is a fine-tune of {base}" + (f" (revision `{revision}`)" if revision else "") +
        f", published as {WHAT[profile.publish.model]}.",
        "## Training data",
        f"Data fingerprint `{hash_json(pack.config.get('fingerprint', {}), 16)}` (pack artifact `{pack.key}`): "
        f"{pack.metrics.get('samples', '?')} training documents, {pack.metrics.get('tokens', '?')} tokens, format "
        f"`{profile.data.format}`.",
        "## Tool calls",
        f"Tool calls in the training data were rendered in vLLM's `{TOOL_CALL_PARSER}` format (`[name(arg=value, "
        "...)]` as the whole assistant turn; tool results under the `ipython` header; definitions in the system "
        "message), learned, with tool results and definitions masked. Serve with `vllm serve <model> "
        f"{' '.join(SERVE_FLAGS)}`.",
        "## Training configuration",
        f"```yaml\n{yaml.safe_dump(training, sort_keys=False)}```",
        *(f"## {title}\n\n{text}" for title, text in sections.items()),
        "## Lineage",
        "Every artifact is content-keyed: the same keys mean the same inputs, code and settings.\n\n"
        "| step | stage | key |\n|---|---|---|\n" + lineage,
        "## License",
        f"{LICENSE_NOTICE} Use of this model is governed by the [Llama 4 Community License]({LICENSE_LINK}) and "
        "Meta's Acceptable Use Policy.",
    ]
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n" + "\n\n".join(body) + "\n"

"""quantize: AWQ W4A16 with llm-compressor, written as a compressed-tensors checkpoint vLLM serves natively.

Upstream: ``convert`` (a bf16/fp32 Hugging Face checkpoint of ``Llama4ForCausalLM`` or
``Llama4ForConditionalGeneration``) and ``pack`` (calibration tokens, see calibration.py).

Output (the stage's directory): ``model-*.safetensors`` (+ index) in compressed-tensors ``pack-quantized`` format with
``quantization_config`` in ``config.json``, llm-compressor's ``recipe.yaml``, and the tokenizer/generation config
files of the converted model, byte for byte. Routed experts, the shared expert, dense MLPs and attention output
projections are int4; what stays unquantized and why is in the metrics and the ``quantize`` table (llama4.py
explains the Llama 4 specifics).

Calibration runs llm-compressor's sequential pipeline: one decoder layer at a time on the execution device. With
``sequential_onloading`` the weights wait in CPU memory (spilling to disk when it is short) and each layer is moved
to the GPU only while it is calibrated, so one GPU that holds a single layer suffices.
"""

from __future__ import annotations

from typing import Any

from finetune.profile import Profile
from finetune.stage import StageSpec, deferred

run = deferred("tasks.quantize.awq")


def config(profile: Profile) -> dict[str, Any]:
    # Where the weights wait between layers does not change the result; everything else does.
    return profile.quantize.model_dump(mode="json", exclude={"sequential_onloading"})


SPEC = StageSpec(
    name="quantize",
    version="1",
    run=run,
    config=config,
    upstream=("convert", "pack"),
)

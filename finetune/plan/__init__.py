"""``finetune plan``: memory, time and cost of a profile at real size, and the check every run passes first.

``plan(profile)`` builds the model on the meta device and shards it with the recipe's own functions (see
planner.py); ``check_fits(profile)`` raises ``PlanDoesNotFit`` with the figures and the knobs; ``markdown(plan)`` and
``table(plan)`` render it. Importing this package loads no torch; planning does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.hashing import hash_json, sha256_file
from finetune.plan.errors import PlanDoesNotFit, PlanError
from finetune.plan.report import markdown, table
from finetune.profile import REPO_ROOT, Profile
from finetune.store import atomic_file

__all__ = ["PlanDoesNotFit", "PlanError", "check_fits", "markdown", "plan", "table"]


# What a plan is computed from besides the profile: a change to any of these plans again.
_SOURCES = ("finetune/plan", "tunerecipes/sharding.py", "tunerecipes/expert_parallel.py", "llama4tune",
            "profiles/recipes/sft.yaml")


def plan(profile: Profile) -> dict[str, Any]:
    """The plan, from a cache keyed by the profile, the planner's and the model's code, and this machine's RAM
    (planning imports torch and builds the model: seconds a cached rerun of the pipeline should not pay)."""
    from finetune.plan.catalog import this_machine

    key = hash_json({"profile": profile.model_dump(mode="json"), "ram": this_machine().hbm_gib,
                     "code": {str(path): sha256_file(path) for path in _source_files()}})
    cached = _cache_dir() / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from finetune.plan.planner import plan as make_plan

    result = make_plan(profile)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cached, "w") as handle:
        json.dump(result, handle)
    return result


def _source_files() -> list[Path]:
    files: list[Path] = []
    for name in _SOURCES:
        path = REPO_ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama4-finetune" / "plans"


def refusal(result: dict[str, Any]) -> str | None:
    """Why a plan cannot run, with its figures in GiB and what would fix it; None when it fits."""
    problems = []
    if not result["fits"]:
        problems.append(
            f"training needs {max(result['per_gpu_peak_gib'], result['base_weight_load_peak_gib']):.1f} GiB per GPU "
            f"(of {result['gpu_memory_gib']:g} GiB on {result['gpu']}) and {result['host_memory_gib_per_node']:.0f} "
            f"GiB host RAM per node (of {result['host_ram_gib_per_node']:g} GiB)")
    serve = result["serving"]["evaluate_and_benchmark"]
    if not serve["fits"]:
        for kind in ("bf16", "w4a16"):
            if kind in serve.get("served", (kind,)) and not serve[kind]["fits"]:
                s = serve[kind]
                problems.append(
                    f"serving {kind} at tensor_parallel_size {s['tensor_parallel_size']} needs "
                    f"{s['weights_gib_per_gpu'] + s['activation_reserve_gib'] + s['kv_cache_gib_per_sequence']:.1f} "
                    f"GiB per GPU of the {s['vllm_budget_gib']:g} GiB vLLM may use "
                    "(benchmark.gpu_memory_utilization x HBM)")
        if "note" in serve:
            problems.append(serve["note"])
    quant = result["serving"]["quantize"]
    if not quant["fits"]:
        problems.append(f"quantization needs {quant['host_ram_gib']:.0f} GiB host RAM (of "
                        f"{quant['host_ram_available_gib']:g}) and {quant['gpu_gib_per_layer']:.1f} GiB per GPU")
    if not problems:
        return None
    lines = [f"profile {result['profile']} does not fit its machines: " + "; ".join(problems) + "."]
    if result["knobs"]:
        lines.append("Single changes (train.* / data.* / plan.* overrides) and where they get:")
        lines += [f"  {knob}" for knob in result["knobs"]]
    lines.append("`finetune plan --profile ...` shows the whole breakdown; plan.enforce=false (or finetune run "
                 "--no-plan-check) runs anyway.")
    return "\n".join(lines)


def check_fits(profile: Profile, planned: dict[str, Any] | None = None) -> None:
    """Raise PlanDoesNotFit when the profile's run cannot fit its GPUs or hosts (unless plan.enforce is false);
    ``planned`` is the profile's plan when the caller already has it."""
    if not profile.plan.enforce:
        return
    message = refusal(planned or plan(profile))
    if message:
        raise PlanDoesNotFit(message)

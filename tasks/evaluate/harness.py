"""EleutherAI lm-eval through its Python API: resolve and check tasks, build the backend's model args, run.

Tasks are resolved and built (their data loaded, one document rendered) before any model is loaded, so a typo in a
task name or a broken local task YAML fails in seconds instead of after a multi-GPU model load.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from finetune.profile import BenchmarkConfig, EvaluateConfig
from finetune.stage import PermanentError

# lm-eval's stderr for mean metrics is analytic; bootstrap only serves other aggregations (e.g. f1), where 1000
# resamples estimate the stderr to a few percent at a fraction of lm-eval's default 100000's cost.
BOOTSTRAP_ITERS = 1000


def lm_eval_version() -> str:
    return version("lm-eval")


@dataclass
class ResolvedTasks:
    manager: Any  # lm_eval.tasks.TaskManager
    objects: list[Any]  # top-level lm_eval Task / Group objects, in profile order
    names: list[str]  # the names results are reported under: requested tasks and groups, tags expanded


def check_local_yamls(include_path: Path) -> None:
    """Every YAML in the local task directory must parse and resolve (lm-eval's index silently skips broken ones)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's own index uses

    if not include_path.is_dir():
        raise PermanentError(f"evaluate.include_path: {include_path} is not a directory of lm-eval task YAMLs")
    for path in sorted(include_path.rglob("*.yaml")):
        try:
            config = load_yaml(path, resolve_func=True)
        except Exception as exc:  # yaml errors, a !function naming a missing module or function, include cycles
            raise PermanentError(f"{path}: invalid lm-eval task YAML: {type(exc).__name__}: {exc}") from exc
        if not any(key in config for key in ("task", "group")):
            raise PermanentError(f"{path}: an lm-eval task YAML needs a 'task' (or 'group') key")


def task_manager(names: list[str], include_path: Path | None) -> Any:
    """A TaskManager that knows `names`. Indexing lm-eval's ~15k built-in YAMLs takes ~10 s on 2 cores, so a profile
    whose tasks are all local skips it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        check_local_yamls(include_path)
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def resolve_tasks(names: list[str], include_path: Path | None) -> ResolvedTasks:
    """Find, build and smoke-test every task (data loaded, first document rendered); no model is touched."""
    manager = task_manager(names, include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" or in {include_path}" if include_path else "; local tasks need evaluate.include_path"
        raise PermanentError(
            f"evaluate.tasks: unknown lm-eval task {', '.join(hints)}: not in lm-eval {lm_eval_version()}'s "
            f"registry{where}"
        )
    objects: list[Any] = []
    reported: list[str] = []
    for name in names:
        source = _source_of(manager, name)
        try:
            loaded = manager.load([name])
        except ModuleNotFoundError as exc:
            raise PermanentError(
                f"evaluate.tasks: task '{name}' needs the python package '{exc.name}', which is not installed "
                f"(lm-eval's optional extras name them, e.g. lm-eval[ifeval])"
            ) from exc
        except Exception as exc:
            if include_path is not None and source and Path(source).is_relative_to(include_path.resolve()):
                raise PermanentError(f"{source}: task '{name}' cannot be built: {type(exc).__name__}: {exc}") from exc
            raise  # built-in tasks download their data: a network failure is worth a retry
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
            reported.append(name)
        else:  # a task, or a tag that stands for several tasks
            objects.extend(loaded["tasks"].values())
            reported.extend(loaded["tasks"])
        for task_name, task in loaded["tasks"].items():
            _render_first_doc(task_name, task, _source_of(manager, task_name) or source)
    return ResolvedTasks(manager=manager, objects=objects, names=reported)


def _source_of(manager: Any, name: str) -> str | None:
    entry = manager.task_index.get(name)
    return str(entry.yaml_path) if entry is not None and entry.yaml_path else None


def _render_first_doc(name: str, task: Any, source: str | None) -> None:
    """Templates and choice functions fail on a real document here, not halfway through an evaluation."""
    docs = task.eval_docs
    if len(docs) == 0:
        raise PermanentError(f"{source or name}: task '{name}' has no documents in its evaluation split")
    doc = docs[0]
    try:
        task.doc_to_text(doc)
        task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            task.doc_to_choice(doc)
    except Exception as exc:
        raise PermanentError(
            f"{source or name}: task '{name}' cannot render its first document: {type(exc).__name__}: {exc}"
        ) from exc


def hf_model_args(model_path: str, device: str) -> dict[str, Any]:
    """lm-eval `hf` backend args. fp32 on CPU (bf16 matmuls there are slow and drift); the checkpoint's own dtype on
    GPU. Several visible GPUs: let accelerate spread the layers (a Llama 4 bf16 checkpoint exceeds one GPU)."""
    args: dict[str, Any] = {"pretrained": model_path, "dtype": "float32" if device == "cpu" else "auto"}
    if device == "cuda":
        import torch

        if torch.cuda.device_count() > 1:
            args["parallelize"] = True
    return args


def vllm_model_args(model_path: str, serving: BenchmarkConfig, max_gen_toks: int, seed: int = 1234) -> dict[str, Any]:
    """lm-eval `vllm` backend args. The serving geometry (tensor parallel degree, context length, memory share) is the
    benchmark section's: the same model is served the same way there. max_model_len is essential: Llama 4 configs
    declare up to 10M positions, whose KV cache vLLM would try to reserve. dtype 'auto' keeps bf16 weights bf16 and
    lets vLLM pick compressed-tensors W4A16 kernels from the checkpoint's quantization_config."""
    return {
        "pretrained": model_path,
        "dtype": "auto",
        "tensor_parallel_size": serving.tensor_parallel_size,
        "gpu_memory_utilization": serving.gpu_memory_utilization,
        "max_model_len": serving.max_model_len,
        "max_gen_toks": max_gen_toks,
        "seed": seed,
    }


def model_args(cfg: EvaluateConfig, serving: BenchmarkConfig, model_path: str) -> dict[str, Any]:
    if cfg.backend == "vllm":
        return vllm_model_args(model_path, serving, cfg.max_gen_toks)
    return hf_model_args(model_path, cfg.device)


def load_model(backend: str, args: dict[str, Any], batch_size: int | str, device: str) -> Any:
    """The lm-eval LM object, built the way simple_evaluate builds it from a name."""
    from lm_eval.api.registry import get_model

    extra: dict[str, Any] = {"batch_size": batch_size}
    if backend == "hf":  # vLLM places itself (CUDA_VISIBLE_DEVICES) and warns about a device argument
        extra["device"] = device
    return get_model(backend).create_from_arg_obj(args, extra)


def default_gen_toks(tasks: list[Any], max_gen_toks: int) -> None:
    """Cap generation at the profile's max_gen_toks for tasks that set no cap of their own (ifeval sets 1280, the
    local task 16): lm-eval's hf backend otherwise always uses 256."""
    for task in tasks:
        if task.get_config("output_type") == "generate_until":
            if "max_gen_toks" not in (task.get_config("generation_kwargs") or {}):
                task.set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)


def evaluate(lm: Any, resolved: ResolvedTasks, cfg: EvaluateConfig) -> dict[str, Any]:
    """simple_evaluate on pre-built tasks. Chat models (all of ours: Llama 4 Instruct, tuned chat models, the tiny
    chat model) are scored through their chat template, with few-shot examples as turns."""
    import lm_eval

    loaded = resolved.manager.load(resolved.objects)
    default_gen_toks(list(loaded["tasks"].values()), cfg.max_gen_toks)
    chat = getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=resolved.objects,
        task_manager=resolved.manager,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
    )
    if results is None:  # only non-zero ranks get None; this process is rank 0
        raise RuntimeError(f"lm-eval returned no results (rank {os.environ.get('RANK', '0')})")
    results["config"]["apply_chat_template"] = chat
    return results

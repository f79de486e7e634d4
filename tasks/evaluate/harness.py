"""EleutherAI lm-eval through its Python API: resolve and check tasks, build the backend's model args, run.

Backends: lm-eval's `hf` loads the model in-process; evaluate.backend 'vllm' (GPU profiles, and CPU ones where vLLM's
CPU build loads the model) starts `vllm serve` out of process, as the benchmark does, and scores it with lm-eval's
`local-completions`: vLLM pins packages that conflict with this environment's, so it is never imported here.

Tasks are resolved and built (their data loaded, one document rendered) before any model is loaded, so a typo in a
task name or a broken local task YAML fails in seconds instead of after a multi-GPU model load.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from finetune.procs import free_port
from finetune.profile import BenchmarkConfig, EvaluateConfig
from finetune.stage import PermanentError
from tasks.serving.engines import Engine, ServeRequest
from tasks.serving.server import serving
from tasks.serving.vllm import max_model_len, model_shape

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
    from lm_eval.tasks._yaml_loader import (
        load_yaml,  # the loader lm-eval's own index uses
    )

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


# Requests in flight against a vLLM server: vLLM batches them itself (continuous batching), so concurrency, not
# lm-eval's per-request batch, is what fills the GPUs.
SERVER_CONCURRENCY = 64
# Seconds per HTTP request: a 1024-token generation queued behind others on a large model takes minutes.
SERVER_TIMEOUT_S = 1800


def completions_model_args(model_path: str, base_url: str, max_model_len: int, max_gen_toks: int, *,
                           tokenized_requests: bool = True, num_concurrent: int = SERVER_CONCURRENCY,
                           seed: int = 1234) -> dict[str, Any]:
    """lm-eval `local-completions` args against an OpenAI-compatible server that serves ``model_path`` under that
    name (vllm serve and transformers serve both name a model by the path they were started with).

    /v1/completions, not chat completions: log-likelihood tasks are scored with ``echo`` + ``logprobs`` over the
    prompt, which only the completions endpoint returns. The local tokenizer renders the chat template and counts
    context lengths; with tokenized_requests the server gets token ids, so nothing is tokenized twice. max_length must
    be the server's max_model_len: lm-eval's API backends default to 2048 and silently left-truncate longer prompts."""
    return {
        "model": model_path,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer_backend": "huggingface",  # not 'auto', which probes the server for a tokenizer endpoint
        "tokenizer": model_path,
        "tokenized_requests": tokenized_requests,
        "max_length": max_model_len,
        "max_gen_toks": max_gen_toks,
        "num_concurrent": num_concurrent,
        "timeout": SERVER_TIMEOUT_S,
        "seed": seed,
    }


def completions_class() -> type:
    """lm-eval's `local-completions` model, rendering the chat template on the client in every mode.

    lm-eval renders it to a prompt string only when requests go out tokenized; otherwise it sends the chat as JSON
    messages, which a completions endpoint cannot take. Here both modes render transformers' apply_chat_template
    (exactly lm-eval's own call), so the server sees the tokens the in-process `hf` backend scores. A server that
    gets a string tokenizes it with special tokens (transformers serve, and vLLM by default): when the tokenizer adds
    a BOS, the template's own leading BOS is left to it, or the model would see two."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class ChatTemplatedCompletions(LocalCompletionsAPI):
        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            text = self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
            bos = self.tokenizer.bos_token
            if not self.tokenized_requests and bos and text.startswith(bos) and \
                    self.tokenizer("").input_ids[:1] == [self.tokenizer.bos_token_id]:
                return text[len(bos):]
            return text

    return ChatTemplatedCompletions


def load_completions(args: dict[str, Any], batch_size: int | str) -> Any:
    """The `local-completions` LM. lm-eval cannot size API batches ('auto'): one prompt per request then."""
    return completions_class().create_from_arg_obj(args, {"batch_size": batch_size if isinstance(batch_size, int)
                                                          else 1})


@contextlib.contextmanager
def served_model(engine: Engine, model_dir: Path, serving_cfg: BenchmarkConfig, cfg: EvaluateConfig, log_path: Path,
                 platform: str, *, tokenized_requests: bool = True, num_concurrent: int = SERVER_CONCURRENCY,
                 lock_fds: tuple[int, ...] = ()) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Serve ``model_dir`` with the benchmark's command and geometry and yield the lm-eval model that talks to it
    (and its args); the server stops on exit.

    Evaluate and benchmark do not share one server: they are separate stages of the pipeline DAG
    (flows/pipeline.py), each its own cached, retried unit and, on GPU profiles, its own flow run in its own pod;
    evaluate-tuned runs before the quality gate and benchmark-bf16 only after it, so a shared server would have to
    outlive a stage and hold the GPUs across the gate. Both start the same command, so the cost is one model load
    per stage."""
    port = serving_cfg.port or free_port()
    cmd = engine.serve_command(ServeRequest(model_dir, port, serving_cfg, platform, num_concurrent, evaluation=True))
    max_length = max_model_len(model_shape(model_dir), serving_cfg)  # the server's, or lm-eval truncates silently
    with serving(cmd, port, log_path, health_path=engine.health_path, startup_timeout_s=serving_cfg.startup_timeout_s,
                 env=engine.env(), pass_fds=lock_fds) as server:
        args = completions_model_args(str(model_dir), server.base_url, max_length, cfg.max_gen_toks,
                                      tokenized_requests=tokenized_requests, num_concurrent=num_concurrent)
        yield load_completions(args, cfg.batch_size), {**args, "server_command": cmd}


def load_model(args: dict[str, Any], batch_size: int | str, device: str) -> Any:
    """The in-process lm-eval `hf` LM, built the way simple_evaluate builds it from a name."""
    from lm_eval.api.registry import get_model

    return get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size, "device": device})


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

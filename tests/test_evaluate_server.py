"""evaluate against a served model: lm-eval's local-completions, the requests it sends, and refusing a missing vLLM.

What runs here (CPU): generation through a real OpenAI-compatible server (`transformers serve`, the benchmark's CPU
stand-in for vLLM) compared with the in-process `hf` backend, and the log-likelihood requests as lm-eval builds them.
What cannot: log-likelihood scored by a server. transformers serve ignores `echo` and `logprobs` (it lists them as
unsupported fields), so only vLLM answers those requests, and there is no vLLM without a GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from embedded.tiny_model import build_tiny_model
from finetune.profile import BenchmarkConfig, EvaluateConfig, load_profile
from finetune.stage import PermanentError, StageContext
from finetune.store import Artifact
from tasks import evaluate
from tasks.evaluate import harness
from tasks.serving import vllm_env
from tasks.serving.engines import TRANSFORMERS_SERVE

LOCAL_TASKS = Path(evaluate.__file__).resolve().parents[2] / "embedded" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "base", seed=0)


class _Response:
    """What requests.post returns for an echo+logprobs completion of ``prompts`` (one choice per prompt)."""

    ok = True

    def __init__(self, prompts: list[list[int]]):
        self.choices = [{"index": i, "logprobs": {"token_logprobs": [None] + [-1.0] * len(p),
                                                  "top_logprobs": [None] + [{"x": -1.0}] * len(p)}}
                        for i, p in enumerate(prompts)]

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict[str, Any]:
        return {"choices": self.choices}


def test_loglikelihood_requests_echo_the_chat_templated_prompt_tokens_and_ask_for_logprobs(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requests lm-eval's local-completions sends for a multiple-choice task, captured before they leave."""
    import requests
    from transformers import AutoTokenizer

    sent: list[dict[str, Any]] = []

    def post(url: str, json: dict[str, Any], **kwargs: Any) -> _Response:
        sent.append({"url": url, **json})
        return _Response(json["prompt"])

    monkeypatch.setattr(requests, "post", post)
    cfg = EvaluateConfig(device="cpu", tasks=["tiny_synth_mc"], limit=2, batch_size=4, max_gen_toks=32)
    args = harness.completions_model_args(str(tiny_model), "http://127.0.0.1:9", 512, cfg.max_gen_toks,
                                          num_concurrent=1)
    lm = harness.load_completions(args, cfg.batch_size)
    resolved = harness.resolve_tasks(cfg.tasks, LOCAL_TASKS)
    results = harness.evaluate(lm, resolved, cfg)

    choices = 4 * 2  # four choices per document, two documents
    assert sum(len(r["prompt"]) for r in sent) == choices
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for request in sent:
        assert request["url"] == "http://127.0.0.1:9/v1/completions"
        # Score the prompt: echo it back with each token's log-probability, generate nothing worth keeping.
        assert (request["echo"], request["logprobs"], request["max_tokens"], request["temperature"]) == (True, 1, 1, 0)
        for prompt in request["prompt"]:
            assert all(isinstance(t, int) for t in prompt)  # token ids: nothing tokenized again on the server
            text = tok.decode(prompt)
            # The chat template rendered on the client, with its one BOS, the choice after the assistant header.
            assert text.startswith("<|begin_of_text|><|header_start|>user<|header_end|>")
            assert prompt.count(tok.bos_token_id) == 1
            assert "<|header_start|>assistant<|header_end|>" in text
    # Every choice scored -1 per continuation token: lm-eval read the logprobs after each context length.
    sample = results["samples"]["tiny_synth_mc"][0]
    assert all(resp[0][0] < 0 for resp in sample["resps"])


@pytest.mark.slow
def test_generation_through_transformers_serve_matches_the_in_process_hf_backend(
        tiny_model: Path, tmp_path: Path) -> None:
    """tiny_synth_em through lm-eval local-completions against a real server, then in-process: same scores within
    lm-eval's stderr, and the same greedy generations from the same prompt tokens."""
    from transformers import AutoTokenizer

    cfg = EvaluateConfig(device="cpu", tasks=["tiny_synth_em"], limit=24, batch_size=1, max_gen_toks=32)
    resolved = harness.resolve_tasks(cfg.tasks, LOCAL_TASKS)
    serving_cfg = BenchmarkConfig(engine="transformers-serve", max_model_len=512, startup_timeout_s=300)
    # transformers serve takes one prompt string per request: untokenized, one at a time.
    with harness.served_model(TRANSFORMERS_SERVE, tiny_model, serving_cfg, cfg, tmp_path / "server.log", "cpu",
                              tokenized_requests=False, num_concurrent=1) as (lm, args):
        assert args["base_url"].endswith("/v1/completions") and args["max_length"] == 512
        served = harness.evaluate(lm, resolved, cfg)
    resolved = harness.resolve_tasks(cfg.tasks, LOCAL_TASKS)
    in_process = harness.evaluate(harness.load_model(harness.hf_model_args(str(tiny_model), "cpu"), 8, "cpu"),
                                  resolved, cfg)

    assert served["config"]["apply_chat_template"] is in_process["config"]["apply_chat_template"] is True
    a, b = served["results"]["tiny_synth_em"], in_process["results"]["tiny_synth_em"]
    stderr = max(a["exact_match_stderr,none"], b["exact_match_stderr,none"])
    assert abs(a["exact_match,none"] - b["exact_match,none"]) <= stderr
    tok = AutoTokenizer.from_pretrained(tiny_model)
    by_doc = {s["doc_id"]: s for s in in_process["samples"]["tiny_synth_em"]}
    for sample in served["samples"]["tiny_synth_em"]:
        other = by_doc[sample["doc_id"]]
        # The server tokenizes the prompt string with special tokens (adding the BOS); lm-eval's hf backend does not.
        served_prompt, in_process_prompt = sample["arguments"][0][0], other["arguments"][0][0]
        assert tok(served_prompt).input_ids == tok(in_process_prompt, add_special_tokens=False).input_ids
        assert sample["filtered_resps"] == other["filtered_resps"]


def _scout_evaluate_context(tmp_path: Path) -> StageContext:
    profile = load_profile("scout-lora")
    assert profile.evaluate.backend == "vllm"
    return StageContext(profile=profile, key="k", workdir=tmp_path,
                        inputs={"model": Artifact(stage="convert", key="k", path=str(tmp_path / "missing-model"))})


def test_gpu_evaluate_with_a_vllm_older_than_its_flags_fails_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `vllm` on PATH (a separate environment, as in the serve image) that reports an old version."""
    if (Path(sys.executable).parent / "vllm").is_file():
        pytest.skip("this environment has its own vllm, which takes precedence")
    bindir = tmp_path / "old-vllm" / "bin"
    bindir.mkdir(parents=True)
    script = bindir / "vllm"
    script.write_text("#!/bin/sh\necho 0.10.1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(vllm_env, "_RESOLVED", {})
    with pytest.raises(PermanentError, match=r"--version says '0\.10\.1'.*vllm >= 0\.33\.0 on cuda") as caught:
        evaluate.run(_scout_evaluate_context(tmp_path))
    assert str(script) in str(caught.value)

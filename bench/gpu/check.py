#!/usr/bin/env python
"""One prepared GPU check (issue 19): what only a GPU can prove, in one call of at most 10 minutes on one H200.

    python bench/gpu/check.py                        # CUDA, the reduced Scout-shaped model (bench/gpu/sizes.py)
    python bench/gpu/check.py --device cpu --quick   # every step scaled down on CPU (what tests/ runs)

Steps, in order (steps.py): base (reduced Scout in transformers, saved as the HF base checkpoint), baseline
(transformers' training step), parity (our bf16 forward against fp32), train (our recipe, full SFT: tokens/s, MFU,
peak memory, `finetune plan`'s predicted peak), convert (convert stage + reload in transformers), lora (LoRA steps,
DCP save, resume), quantize (llm-compressor AWQ W4A16 + reload). Each step has a time budget: it is stopped when it
overruns, steps that need its result are skipped, and the summary is printed whatever happens (a watchdog prints it
and exits if a step hangs inside native code past the run's limit). Last line of stdout: the JSON summary. With
$OUT set, the whole log and the summary are also written there (gpu_check.log, gpu_check_summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.gpu.sizes import Settings, quick_settings  # noqa: E402

# Step -> the steps whose results it reads.
STEPS: dict[str, tuple[str, ...]] = {
    "base": (),
    "baseline": ("base",),
    "parity": ("base",),
    "train": ("base",),
    "convert": ("train",),
    "lora": ("base",),
    "quantize": ("convert",),
}
SUMMARY_RESERVE_S = 10.0
WATCHDOG_GRACE_S = 15.0


class StepTimeout(Exception):
    pass


class Tee:
    """Writes to the terminal and to the log file under $OUT."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


class Runner:
    def __init__(self, settings: Settings, device: str, quick: bool, out_dir: Path | None) -> None:
        self.settings = settings
        self.device = device
        self.quick = quick
        self.out_dir = out_dir
        self.started = time.monotonic()
        self.deadline = self.started + settings.time_limit_s
        self.results: dict[str, dict[str, Any]] = {name: {"status": "pending"} for name in STEPS}
        self.current: str | None = None
        self.context: dict[str, Any] = {}
        self._printed = threading.Lock()

    def log(self, message: str) -> None:
        print(f"[gpu-check {time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def run(self, name: str, step: Callable[[], dict[str, Any]]) -> None:
        missing = [dep for dep in STEPS[name] if self.results[dep]["status"] != "ok"]
        left = self.deadline - time.monotonic() - SUMMARY_RESERVE_S
        budget = min(self.settings.budgets[name], left)
        if missing:
            self.results[name] = {"status": "skipped", "ok": None, "error": f"needs step(s) {', '.join(missing)}"}
            return
        if left < 1:
            self.results[name] = {"status": "skipped", "ok": None, "error": "no time left in the run's limit"}
            return
        self.log(f"step {name}: budget {budget:.0f}s")
        self.current = name
        clock = time.monotonic()

        def overran(signum: int, frame: Any) -> None:
            raise StepTimeout(f"overran its {budget:.0f}s budget")

        previous = signal.signal(signal.SIGALRM, overran)
        signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            figures = step()
            result = {"status": "ok", "ok": True, **figures}
        except StepTimeout as exc:
            result = {"status": "timeout", "ok": False, "error": str(exc)}
        except Exception as exc:  # a step's failure is reported, and the next steps still run
            traceback.print_exc()
            result = {"status": "failed", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.current = None
        result["seconds"] = round(time.monotonic() - clock, 1)
        self.results[name] = result
        self.log(f"step {name}: {result['status']} in {result['seconds']}s"
                 + (f" ({result['error']})" if result.get("error") else ""))

    def summary(self) -> dict[str, Any]:
        import torch
        import transformers

        steps = self.results
        train, baseline, parity = steps["train"], steps["baseline"], steps["parity"]
        ours, theirs = train.get("tokens_per_s"), baseline.get("tokens_per_s")
        gpu = torch.cuda.get_device_name(0) if self.device == "cuda" and torch.cuda.is_available() else None
        ran = [result for result in steps.values() if result["status"] not in ("skipped", "pending")]
        return {
            "ok": bool(ran) and all(result.get("ok") for result in ran) and steps["base"]["status"] == "ok",
            "device": self.device,
            "gpu": gpu,
            "quick": self.quick,
            "wall_s": round(time.monotonic() - self.started, 1),
            "train_tokens_per_s": ours,
            "mfu": train.get("mfu"),
            "baseline_tokens_per_s": theirs,
            "tokens_per_s_ratio": round(ours / theirs, 3) if ours and theirs else None,
            "predicted_peak_gib": train.get("predicted_peak_gib"),
            "measured_peak_gib": train.get("measured_peak_gib"),
            "measured_reserved_peak_gib": train.get("measured_reserved_peak_gib"),
            "peak_ratio": train.get("peak_ratio_measured_over_predicted"),
            "peak_ratio_reserved": train.get("peak_ratio_reserved_over_predicted"),
            "parity_max_abs_diff": parity.get("max_abs_diff"),
            "parity_tolerance": parity.get("tolerance"),
            "min_free_disk_gib": self.context.get("min_free_disk_gib"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "settings": {"seq_len": self.settings.seq_len, "batch_size": self.settings.batch_size,
                         "train_steps": self.settings.train_steps, "baseline_steps": self.settings.baseline_steps},
            "steps": steps,
        }

    def finish(self, note: str | None = None) -> None:
        """Print the summary once (the main thread or the watchdog, whichever comes first)."""
        if not self._printed.acquire(blocking=False):
            return
        if note and self.current:
            self.results[self.current] = {"status": "timeout", "ok": False, "error": note}
        summary = self.summary()
        line = json.dumps(summary, default=str)
        if self.out_dir is not None:
            (self.out_dir / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(line, flush=True)

    def watchdog(self) -> None:
        """A step stuck in native code never sees its alarm: past the run's limit, report and leave."""
        time.sleep(max(0.0, self.deadline + WATCHDOG_GRACE_S - time.monotonic()))
        self.finish(note="still running at the run's time limit (stuck in native code): stopped by the watchdog")
        os._exit(3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, short sequences (CPU proof)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("GPU_CHECK_WORKDIR", "/tmp/gpu-check")),
                        help="scratch space for the model copies (needs ~45 GB at full size); emptied first")
    parser.add_argument("--time-limit-s", type=float, help="whole-run limit (default: 530 full, 300 quick)")
    parser.add_argument("--steps", help="comma-separated subset of " + ",".join(STEPS) + " (dependencies kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = quick_settings() if args.quick else Settings()
    if args.time_limit_s:
        from dataclasses import replace

        settings = replace(settings, time_limit_s=args.time_limit_s)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(out_dir / "gpu_check.log", "a", buffering=1)
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log_file), Tee(sys.__stderr__, log_file)
    runner = Runner(settings, args.device, args.quick, out_dir)
    threading.Thread(target=runner.watchdog, daemon=True).start()
    try:
        import shutil

        import torch

        from bench.gpu.steps import Check

        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu --quick without a GPU)")
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        check = Check(settings, args.device, args.workdir, args.quick, runner.log)
        wanted = set(args.steps.split(",")) if args.steps else set(STEPS)
        for name in STEPS:
            if name in wanted:
                runner.run(name, getattr(check, name))
            else:
                runner.results[name] = {"status": "skipped", "ok": None, "error": "not selected (--steps)"}
        if check.min_free_disk_gib != float("inf"):
            runner.context["min_free_disk_gib"] = round(check.min_free_disk_gib, 1)
        shutil.rmtree(args.workdir, ignore_errors=True)
    finally:
        runner.finish()
        if log_file is not None:
            sys.stdout.flush()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            log_file.close()
    return 0 if runner.summary()["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``finetune``: run the pipeline, list and show profiles, render launch specs."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

from finetune.profile import (
    REPO_ROOT,
    Profile,
    ProfileError,
    list_profiles,
    load_profile,
    resolved_yaml,
)


def _prefect_defaults() -> None:
    """Without a Prefect server configured, run against a project-local ephemeral API (SQLite)."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".prefect"))
        # Prefect's SQLite cannot open its database in a directory whose parents do not exist yet.
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
    # The ephemeral server's first start on a small machine can exceed Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Clusters without internet would log a failed telemetry call on every run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _shared_cores_defaults() -> None:
    """Before torch loads (here or in a child): OpenMP threads that wait by spinning starve every other process of
    the cores they share (stages run side by side, trainers beside vLLM). Measured on 2 cores: two quantize stages
    at once took 90 s each spinning, 11 s each passive; one alone 10 s (flows/local_cluster.py sets it too)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cmd_run(args: argparse.Namespace) -> int:
    from entrypoints import orchestrator
    from finetune import notice

    profile = load_profile(args.profile, args.overrides)  # fail fast, before Prefect starts
    if (code := _check_store(args.store)) is not None:
        return code
    family = orchestrator.start(profile.train.preemption_grace_s)
    try:
        code = _run(args, profile)
    except BaseException:  # Prefect's TerminationSignal after a SIGTERM, or the stage's Preempted
        if notice.received() is None:
            raise
    if notice.received() is not None:
        orchestrator.preempted_exit(family)
    return code


def _run(args: argparse.Namespace, profile: Profile) -> int:
    if args.no_plan_check:
        args.overrides = [*args.overrides, "plan.enforce=false"]  # the flow checks the plan again
    _prefect_defaults()
    _shared_cores_defaults()
    started = time.perf_counter()
    if args.verbose:
        if (code := _check_plan(args, profile, sys.stderr)) is not None:
            return code
        from flows.finetune import finetune

        with _stdout_to_stderr(args.json):
            summary = finetune(profile=args.profile, overrides=args.overrides, store=args.store, until=args.until)
    else:
        summary = _run_with_progress(args, profile)
        if isinstance(summary, int):
            return summary
    wall = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps({"profile": args.profile, "wall_seconds": wall, "stages": summary}, indent=2, default=str))
    else:
        from finetune.store import Store, default_store_url
        from tasks.run_report import find_run_record, report_markdown

        store = Store(args.store or default_store_url())
        print(report_markdown(store, find_run_record(store, profile.name)))
        print(f"finished in {wall}s; again: finetune report --profile {args.profile}"
              + (f" --store {args.store}" if args.store else ""))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from finetune.stage import PermanentError
    from finetune.store import Store, default_store_url
    from tasks.run_report import find_run_record, report_markdown

    store = Store(args.store or default_store_url())
    profile = load_profile(args.profile).name if args.profile else None
    try:
        print(report_markdown(store, find_run_record(store, profile, args.run)), end="")
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_store(url: str | None) -> int | None:
    """Exit code 2 with one line per problem when the store cannot be used (before any stage, log or run record)."""
    from finetune.store import default_store_url
    from finetune.store_check import check_store

    problems = check_store(url or default_store_url())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else None


def _check_plan(args: argparse.Namespace, profile: Profile, err: TextIO) -> int | None:
    """Exit code 2 (with the figures on ``err``) when the plan does not fit; None to go on."""
    if args.no_plan_check:
        return None
    from finetune.plan import PlanDoesNotFit, PlanError, check_fits

    try:
        check_fits(profile)  # before any stage: no download, no GPU rented
    except (PlanDoesNotFit, PlanError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    return None


def _run_with_progress(args: argparse.Namespace, profile: Profile) -> dict[str, Any] | int:
    """Run the flow with every log line and library output in the run's log file and a progress display per stage
    on stderr; on failure, the error and the log's last lines. Returns the flow's summary, or the exit code."""
    from finetune import notice
    from finetune.console import StageDisplay, log_tail, output_to_log, run_log_path
    from finetune.store import Store, default_store_url

    # What the plan check's libraries print (torchao's warnings) belongs in the log, which a refused run never opens.
    early, console = io.StringIO(), sys.stderr
    with contextlib.redirect_stdout(early), contextlib.redirect_stderr(early):
        if (code := _check_plan(args, profile, console)) is not None:
            return code
    # That logging.warning() also gave the root logger a bare handler, and Prefect keeps one it finds there instead
    # of its own (timestamps, run names): drop it before Prefect loads.
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    log_path = run_log_path(Store(args.store or default_store_url()).runs_dir(), profile.name)
    os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")  # Prefect's log goes to a file, not a terminal
    failure: Exception | None = None
    with output_to_log(log_path) as (_, err):
        sys.stderr.write(early.getvalue())
        with StageDisplay(err) as display:
            display.print(f"full log: {log_path}  (-v streams it here)")
            try:
                from flows.finetune import (
                    finetune,  # imported here: Prefect's log handlers see the log file
                )

                return finetune(profile=args.profile, overrides=args.overrides, store=args.store, until=args.until)
            except Exception as exc:
                traceback.print_exc()  # into the log file
                if notice.received() is not None:
                    raise  # preempted: one line, not an error
                failure = exc
        err.write(f"error: {type(failure).__name__}: {failure}\n--- last lines of {log_path} ---\n"
                  f"{log_tail(log_path)}\n")
    return 1


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """Keep stdout for the JSON summary: libraries (llm-compressor's loguru) and trainers print to fd 1."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _cmd_plan(args: argparse.Namespace) -> int:
    from finetune.plan import PlanError, plan, refusal, table

    try:
        result = plan(load_profile(args.profile, args.overrides))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else table(result))
    if reason := refusal(result):  # as `finetune run` refuses it
        print(f"error: {reason}", file=sys.stderr)
        return 2
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from finetune.plan import PlanError, plan
    from finetune.preflight import PreflightFailed, pools_used, preflight
    from finetune.store import Store, default_store_url
    from flows.pipeline import spec, steps_until
    from flows.pool_workers import check_pools

    profile = load_profile(args.profile, args.overrides)
    stages = [step.stage for step in steps_until(args.until, profile) if not spec(step.stage).skipped(profile)]
    pools = pools_used(profile, stages)
    # Without a server the GPU pools' workers cannot be seen: said, not failed (a deployment run checks them).
    check_workers = bool(os.environ.get("PREFECT_API_URL"))
    try:
        preflight(profile, Store(args.store or default_store_url()), stages, plan(profile), pools,
                  check_pools if check_workers else None, log=lambda line: print(line, file=sys.stderr))
    except (PreflightFailed, PlanError) as exc:
        for line in getattr(exc, "problems", [str(exc)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    unchecked = f"; workers of {', '.join(pools)} not checked (no PREFECT_API_URL)" if pools and not check_workers else ""
    print(f"preflight of {profile.name}: ok{unchecked}")
    return 0


def _cmd_rehearse(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from flows.rehearse import RehearsalFailed, rehearse

    load_profile(args.profile, args.overrides)  # a typo fails here, before a server starts
    # Stopped (SIGTERM, as `timeout` or a CI job does), the rehearsal still stops its server and workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    store = Path(args.store or REPO_ROOT / ".rehearsals" / f"{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    if store.exists() and any(store.iterdir()):
        print(f"error: --store {store} is not empty: a rehearsal starts from an empty store", file=sys.stderr)
        return 2
    try:
        report = rehearse(args.profile, args.overrides, store, log=lambda line: print(line, file=sys.stderr))
    except RehearsalFailed as exc:
        print(json.dumps(exc.report, indent=2, default=str) if args.json else "", end="")
        print(f"error: rehearsal of {args.profile} failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from flows.rehearse import summary

        print(summary(report))
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    profiles = list_profiles()
    width = max(map(len, profiles), default=0)
    for name, description in profiles.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(resolved_yaml(load_profile(args.name, args.overrides)), end="")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from tasks.train.render import RenderError, render

    try:
        text = render(load_profile(args.profile, args.overrides), args.overrides, args.target,
                      store=args.store, spot=args.spot)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        from pathlib import Path

        from finetune.store import atomic_file

        with atomic_file(Path(args.output), "w") as handle:
            handle.write(text)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flows.pipeline import (  # no Prefect there: the parser stays fast
        STAGES,
        STEP_LABELS,
    )

    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline for a profile")
    run.add_argument("--profile", default="tiny-cpu", help="profile name (see `finetune profiles`) or YAML path")
    run.add_argument("--store", default=None, help="artifact store: directory or fsspec URL (default: ./.store)")
    run.add_argument("--until", default=STAGES[-1], choices=STAGES + STEP_LABELS,
                     help=f"stop after this stage or step, e.g. evaluate-tuned: a step runs with what it reads and "
                          f"the steps of its stage before it (default: {STAGES[-1]})")
    run.add_argument("--json", action="store_true", help="print a JSON summary per stage")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="stream every log line here instead of a progress display (the log file otherwise)")
    run.add_argument("--no-plan-check", action="store_true",
                     help="start even when `finetune plan` says the run does not fit (as plan.enforce=false)")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="profile overrides")
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser("plan", help="memory per GPU and node, time and cost of a profile at real size")
    plan.add_argument("--profile", default="tiny-cpu", help="profile name or YAML path")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", metavar="key.path=value", help="profile overrides")
    plan.set_defaults(func=_cmd_plan)

    rehearse = sub.add_parser("rehearse", help="run a profile as written on this machine's CPUs, only the model "
                                               "shrunk, through a local Prefect server, with a spot-notice and a "
                                               "lost-worker drill: what would break, found before renting")
    rehearse.add_argument("--profile", default="tiny-cpu", help="profile name (one deployed by prefect.yaml)")
    rehearse.add_argument("--store", default=None,
                          help="an empty artifact store directory (default: .rehearsals/<profile>-<time>)")
    rehearse.add_argument("--json", action="store_true", help="print the report as JSON")
    rehearse.add_argument("overrides", nargs="*", metavar="key.path=value", help="profile overrides")
    rehearse.set_defaults(func=_cmd_rehearse)

    preflight = sub.add_parser("preflight", help="what would stop a run (data, hub access, store room, GPU pool "
                                                 "workers), found before anything is downloaded or rented")
    preflight.add_argument("--profile", default="tiny-cpu", help="profile name or YAML path")
    preflight.add_argument("--store", default=None, help="artifact store: directory or fsspec URL (default: ./.store)")
    preflight.add_argument("--until", default=STAGES[-1], choices=STAGES, help="the stages the run would do")
    preflight.add_argument("overrides", nargs="*", metavar="key.path=value", help="profile overrides")
    preflight.set_defaults(func=_cmd_preflight)

    report = sub.add_parser("report", help="what a run achieved: loss, scores and gate, 4-bit, serving, stage times")
    report.add_argument("--profile", default=None, help="the newest run of this profile (default: of any)")
    report.add_argument("--store", default=None, help="artifact store: directory or fsspec URL (default: ./.store)")
    report.add_argument("--run", default=None, help="this flow run (its name, as the Prefect UI shows it)")
    report.set_defaults(func=_cmd_report)

    profiles = sub.add_parser("profiles", help="list the shipped profiles")
    profiles.set_defaults(func=_cmd_profiles)

    show = sub.add_parser("show", help="print a fully resolved profile")
    show.add_argument("name")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    show.set_defaults(func=_cmd_show)

    render = sub.add_parser("render", help="render a SkyPilot task or a Kubernetes JobSet for a profile's run")
    render.add_argument("--target", required=True, choices=["skypilot", "jobset"])
    render.add_argument("--profile", default="tiny-cpu", help="profile name or YAML path")
    render.add_argument("--store", default="/store/artifacts",
                        help="artifact store the nodes share: a path on the shared volume, or (skypilot) an "
                             "object store URL mounted at /store")
    render.add_argument("--spot", action="store_true", help="(skypilot) spot instances with managed recovery")
    render.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    render.add_argument("overrides", nargs="*", metavar="key.path=value")
    render.set_defaults(func=_cmd_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

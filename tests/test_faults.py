"""Fault campaign, input side: damaged artifacts, a read-only or full store, a malformed profile, broken data lines
and a secret that must never reach the store. Each fault ends in a clear error or a clean recovery.

Stages run through finetune.stage.execute_stage in a subprocess (``drive``, below), the way a Prefect task would
run them but without an API server; tests/test_faults_kill.py uses the same driver to SIGKILL stages mid-work.
Settings are the smallest that still exercise each stage (SMALL).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gzip
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from finetune.stage import PermanentError
from flows import pipeline

pytestmark = pytest.mark.slow  # drives every stage (trainer, servers) in subprocesses

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "hf_FAULTCAMPAIGNSENTINEL0123456789abcdef"  # HF_TOKEN of every fault run: must never be written anywhere

# Smallest settings that still run every stage for real (train: 6 steps, a checkpoint every 2).
SMALL = [
    "data.max_seq_len=64", "train.max_steps=6", "train.batch_size=2", "train.warmup_steps=1",
    "train.checkpoint_every_steps=2",
    "evaluate.limit=4", "evaluate.tasks=[tiny_synth_mc]", "evaluate.batch_size=4",
    "quantize.calibration_samples=4", "quantize.calibration_seq_len=64",
    "benchmark.num_prompts=2", "benchmark.concurrencies=[1]", "benchmark.max_tokens=4",
]
# Every stage once; "evaluate-base" scores the base model: it needs no training.
ALL = "evaluate-base,benchmark-bf16,benchmark-w4a16"


def needed(targets: str) -> list[str]:
    """The pipeline steps the comma-separated ``targets`` depend on, upstream first, ending with the targets."""
    return [step.label for step in pipeline.needed(targets.split(","))]


def stage_of(slot: str) -> str:
    return pipeline.STEPS[slot].stage


def run_chain(store_url: str, targets: str, overrides: list[str], profile_name: str = "tiny-cpu",
              emit: Callable[[dict[str, Any]], None] = lambda event: None) -> dict[str, Any]:
    """Run every slot ``targets`` need through execute_stage (cached ones are reused); emit start/done events."""
    from finetune.profile import load_profile
    from finetune.stage import execute_stage, stage_key
    from finetune.store import Store

    profile = load_profile(profile_name, overrides)
    store = Store(store_url)
    done: dict[str, Any] = {}
    for step in pipeline.needed(targets.split(",")):
        slot, spec = step.label, pipeline.spec(step.stage)
        inputs = pipeline.step_inputs(step, done)
        cached = store.verified_artifact(step.stage, stage_key(spec, profile, inputs)) is not None
        emit({"event": "start", "slot": slot, "cached": cached})
        done[slot], _ = execute_stage(spec, profile, store, inputs)
        emit({"event": "done", "slot": slot, "cached": cached, "key": done[slot].key, "path": done[slot].path})
    return done


def drive(argv: list[str]) -> None:
    """Subprocess entry: argv = store, targets (comma-separated slots), JSON list of overrides, profile.
    Prints one JSON event per stage start and end, and every log line (searched for leaked secrets)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    run_chain(argv[0], argv[1], json.loads(argv[2]), argv[3], emit=lambda event: print(json.dumps(event), flush=True))


DRIVER = "import sys; from tests.test_faults import drive; drive(sys.argv[1:])"


@dataclass
class Driven:
    returncode: int
    events: list[dict[str, Any]]
    output: str

    def done(self, slot: str) -> dict[str, Any]:
        return next(e for e in self.events if e["event"] == "done" and e["slot"] == slot)


def fault_env(scratch: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FINETUNE_"))}
    env.update(FINETUNE_SCRATCH=str(scratch), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def start_driver(store: Path, target: str, env: dict[str, str], overrides: list[str] | None = None,
                 profile: str = "tiny-cpu", preexec_fn: Any = None) -> subprocess.Popen[str]:
    args = [str(store), target, json.dumps(SMALL + (overrides or [])), profile]
    # Own session: the test can kill the driver and everything it started, as a lost machine would.
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=preexec_fn)


def parse_events(output: str) -> list[dict[str, Any]]:
    events = []
    for line in output.splitlines():
        if line.startswith('{"event"'):
            events.append(json.loads(line))
    return events


def run_driver(store: Path, target: str, env: dict[str, str], overrides: list[str] | None = None,
               profile: str = "tiny-cpu", preexec_fn: Any = None, timeout: float = 600) -> Driven:
    proc = start_driver(store, target, env, overrides, profile, preexec_fn)
    output, _ = proc.communicate(timeout=timeout)
    return Driven(proc.returncode, parse_events(output), output)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, as losing the machine would: stop them all first so none can fork or
    be reparented out of reach between the listing and the kill."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    stopped: dict[int, psutil.Process] = {}
    for _ in range(5):
        fresh = [p for p in [root, *_children(root)] if p.pid not in stopped]
        if not fresh:
            break
        for process in fresh:
            try:
                process.send_signal(signal.SIGSTOP)
                stopped[process.pid] = process
            except psutil.NoSuchProcess:
                pass
    for process in stopped.values():
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(stopped.values()), timeout=10)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def leftovers(store: Path) -> list[str]:
    """Files and directories in a store that no finished artifact accounts for (temp files, staging dirs,
    unfinished stage directories)."""
    found = []
    for stage_dir in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for work in sorted(stage_dir.iterdir()):
            manifest = work / "artifact.json"
            if work.name == ".quarantine":
                continue
            if not manifest.is_file():
                found.append(f"{work.relative_to(store)} (no artifact.json)")
                continue
            listed = set(json.loads(manifest.read_text())["files"]) | {"artifact.json"}
            for path in sorted(work.rglob("*")):
                name = str(path.relative_to(work))
                if path.is_file() and name not in listed:
                    found.append(f"{path.relative_to(store)} (not in artifact.json)")
                if path.name.endswith(".tmp") or path.name.startswith((".tmp-", ".saving-")):
                    found.append(f"{path.relative_to(store)} (temp)")
    return found


def copy_stages(source: Path, target: Path, slots: list[str]) -> None:
    """Put finished artifacts of ``slots`` from one store into another (mtimes kept: they verify without rehash)."""
    for slot in slots:
        stage = stage_of(slot)
        for work in (source / stage).iterdir():
            if (work / "artifact.json").is_file() and not (target / stage / work.name).exists():
                shutil.copytree(work, target / stage / work.name)


# ---- shared reference run ----------------------------------------------------------------------------------------

@dataclass
class Reference:
    """One uninterrupted run of every stage with SMALL settings, and how long each stage took."""

    store: Path
    scratch: Path
    env: dict[str, str]
    seconds: dict[str, float]
    keys: dict[str, str]


def reference_run(root: Path) -> Reference:
    """Runs with HF_TOKEN set to SENTINEL, so the whole store and log can be searched for it afterwards."""
    scratch = root / "scratch"
    env = fault_env(scratch, HF_TOKEN=SENTINEL)
    store = root / "store"
    proc = start_driver(store, ALL, env)
    seconds: dict[str, float] = {}
    keys: dict[str, str] = {}
    lines = []
    clock = time.perf_counter()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('{"event"'):
            event = json.loads(line)
            if event["event"] == "start":
                clock = time.perf_counter()
            else:
                seconds[event["slot"]] = time.perf_counter() - clock
                keys[event["slot"]] = event["key"]
    assert proc.wait() == 0, "".join(lines[-60:])
    (root / "reference.log").write_text("".join(lines))
    return Reference(store=store, scratch=scratch, env=env, seconds=seconds, keys=keys)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Built once per session: both fault modules import this fixture, so its record lives on disk."""
    root = tmp_path_factory.getbasetemp() / "fault-reference"
    record = root / "reference.json"
    if not record.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        built = reference_run(root)
        record.write_text(json.dumps({"seconds": built.seconds, "keys": built.keys}))
    data = json.loads(record.read_text())
    return Reference(store=root / "store", scratch=root / "scratch", env=fault_env(root / "scratch", HF_TOKEN=SENTINEL),
                     **data)


def fresh_store(reference: Reference, tmp_path: Path, target: str) -> Path:
    """A store holding the reference's finished upstream artifacts of ``target``, not ``target`` itself."""
    store = tmp_path / "store"
    store.mkdir()
    copy_stages(reference.store, store, needed(target)[:-1])
    return store


# ---- input faults ------------------------------------------------------------------------------------------------

def _manifest(store: Path, stage: str, key: str) -> Path:
    return store / stage / key / "artifact.json"


def test_damaged_artifacts_are_recomputed_alone_and_kept_aside(reference: Reference, tmp_path: Path) -> None:
    """One store, one fault per stage: truncated safetensors shards (download, convert, quantize), an artifact.json
    cut mid-JSON (pack), an artifact.json naming another key (evaluate). train is intact and must not rerun."""
    store = tmp_path / "store"
    store.mkdir()
    damaged = ["download", "pack", "evaluate-base", "convert", "quantize"]
    copy_stages(reference.store, store, needed("evaluate-base,quantize"))
    originals = {}
    for slot in ("download", "convert", "quantize"):
        shard = sorted((store / slot / reference.keys[slot]).glob("*.safetensors"))[0]
        originals[shard] = shard.read_bytes()
        with open(shard, "r+b") as handle:
            handle.truncate(len(originals[shard]) // 2)
    torn = _manifest(store, "pack", reference.keys["pack"])
    torn.write_text(torn.read_text()[:200])
    other = _manifest(store, "evaluate", reference.keys["evaluate-base"])
    other.write_text(other.read_text().replace(reference.keys["evaluate-base"], "0" * 20))

    driven = run_driver(store, "evaluate-base,quantize", reference.env)
    assert driven.returncode == 0, driven.output[-4000:]
    assert {e["slot"]: e["cached"] for e in driven.events if e["event"] == "done"} == {
        slot: slot not in damaged for slot in needed("evaluate-base,quantize")}
    assert all(shard.read_bytes() == content for shard, content in originals.items())
    for slot in damaged:
        assert_same_result(store, reference, slot)
        (kept,) = (store / stage_of(slot) / ".quarantine").iterdir()  # the damaged copy is moved aside, never deleted
        assert kept.name.startswith(reference.keys[slot])
    assert leftovers(store) == []


@contextlib.contextmanager
def _read_only(store: Path) -> Iterator[None]:
    """chmod where permissions bind (not root), else a read-only bind mount (needs root)."""
    if os.geteuid() != 0:
        store.chmod(0o555)
        try:
            yield
        finally:
            store.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only store here: root ignores permissions and bind mounts are refused")
    try:
        yield
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_read_only_store_fails_at_once_naming_the_directory(reference: Reference, tmp_path: Path) -> None:
    store = fresh_store(reference, tmp_path, "pack")
    with _read_only(store), pytest.raises(OSError) as failure:
        run_chain(str(store), "pack", SMALL)
    assert failure.value.errno in (errno.EROFS, errno.EACCES)
    # The first write is the stage key's lock (<store>/.locks/pack/...): the error names that directory.
    assert str(store / ".locks") in str(failure.value)
    assert leftovers(store) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        # Past the limit write() fails with EFBIG instead of the process being killed by SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_fails_the_stage_clearly_and_a_rerun_recovers(reference: Reference, tmp_path: Path) -> None:
    """RLIMIT_FSIZE works without privileges: writes past 64 KiB fail with EFBIG in the middle of convert's
    streamed safetensors shard."""
    store = fresh_store(reference, tmp_path, "convert")
    driven = run_driver(store, "convert", reference.env, preexec_fn=_limit_file_size(64 << 10))
    assert driven.returncode != 0
    assert "File too large" in driven.output, driven.output[-4000:]
    work = store / "convert" / reference.keys["convert"]
    assert not (work / "artifact.json").exists() and not list(work.rglob("*.tmp"))
    again = run_driver(store, "convert", reference.env)
    assert again.returncode == 0 and again.done("convert")["cached"] is False
    assert leftovers(store) == []
    assert_same_result(store, reference, "convert")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _resize(mount: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mount)], check=True)


def test_full_disk_fails_the_stage_clearly_and_a_rerun_with_space_recovers(reference: Reference,
                                                                           tmpfs: Path) -> None:
    store = tmpfs / "store"
    store.mkdir()
    copy_stages(reference.store, store, ["download"])
    used = sum(-(-p.stat().st_size // 4096) * 4 for p in store.rglob("*"))  # KiB in 4 KiB pages
    _resize(tmpfs, used + 256)  # pack writes ~0.9 MB: the disk fills in the middle of it
    with pytest.raises(OSError) as failure:
        run_chain(str(store), "pack", SMALL)
    assert failure.value.errno == errno.ENOSPC and str(store / "pack") in str(failure.value)
    work = store / "pack" / reference.keys["pack"]
    assert not (work / "artifact.json").exists() and not list(work.rglob("*.tmp"))
    _resize(tmpfs, 64 << 10)
    events: list[dict[str, Any]] = []
    run_chain(str(store), "pack", SMALL, emit=events.append)
    assert [(e["slot"], e["cached"]) for e in events if e["event"] == "done"] == [("download", True), ("pack", False)]
    assert leftovers(store) == []
    assert_same_result(store, reference, "pack")


def test_malformed_profile_is_refused_before_anything_runs(tmp_path: Path) -> None:
    shipped = (REPO / "profiles" / "tiny-cpu.yaml").read_text()
    assert "\n  epochs: " in shipped
    wrong_type, unknown_key = tmp_path / "wrong_type.yaml", tmp_path / "unknown_key.yaml"
    broken = tmp_path / "broken.yaml"
    wrong_type.write_text(shipped.replace("\n  epochs: ", "\n  epochs: one #", 1))
    unknown_key.write_text(shipped + "surprise: 1\n")
    broken.write_text("data:\n  source: [embedded/data\nmodel: {}\n")
    store = tmp_path / "store"
    env = {**fault_env(tmp_path / "scratch"), "FINETUNE_STORE": str(store)}
    for profile, expected in ((wrong_type, ["train.epochs"]), (unknown_key, ["surprise"]), (broken, ["line 2"])):
        proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "run", "--profile", str(profile)], cwd=REPO,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
        assert str(profile) in proc.stderr and "Traceback" not in proc.stderr
        assert all(text in proc.stderr for text in expected), proc.stderr
    assert not store.exists()


def _broken_dataset(root: Path) -> Path:
    data = root / "data"
    shutil.copytree(REPO / "embedded" / "data", data)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # a torn line
    lines[9] = '{"messages": "not a list"}'
    lines[14] = "\x00\x01binary junk"
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    return data


def test_dataset_with_broken_lines_drops_and_counts_them_or_fails_naming_the_line(reference: Reference,
                                                                                 tmp_path: Path) -> None:
    data = _broken_dataset(tmp_path)
    store = fresh_store(reference, tmp_path, "pack")
    with pytest.raises(PermanentError, match=r"train\.jsonl:5"):
        run_chain(str(store), "pack", [*SMALL, f"data.source={data}", "data.on_bad_record=fail"])
    packed = run_chain(str(store), "pack", [*SMALL, f"data.source={data}"])["pack"]
    assert packed.metrics["dropped"] == 3 and sum(packed.metrics["dropped_by_reason"].values()) == 3
    clean = json.loads(_manifest(reference.store, "pack", reference.keys["pack"]).read_text())["metrics"]
    assert packed.metrics["samples"] == clean["samples"] and packed.metrics["dropped"] == clean["dropped"] + 3
    # The failed strict attempt (another key: on_bad_record is part of it) keeps its unfinished directory, never
    # trusted, cleared when that key runs again; nothing in it is a temp file.
    (unfinished,) = leftovers(store)
    assert unfinished.endswith("(no artifact.json)") and not list(store.rglob("*.tmp"))


def test_hf_token_never_reaches_logs_artifacts_or_the_store(reference: Reference) -> None:
    """The reference run had HF_TOKEN set through every stage, trainer and server subprocess included."""
    searched = [reference.store.parent / "reference.log", *reference.store.rglob("*"), *reference.scratch.rglob("*")]
    files = [p for p in searched if p.is_file()]
    assert len(files) > 50
    assert [str(p) for p in files if SENTINEL.encode() in p.read_bytes()] == []


_KILLED_ATOMIC_WRITE = """
import sys, time
from finetune.profile import load_profile
from finetune.stage import StageSpec, execute_stage
from finetune.store import Store, atomic_file

def run(ctx):
    (ctx.workdir / "progress.bin").write_bytes(b"resumable progress")
    with atomic_file(ctx.workdir / "weights.bin") as handle:
        handle.write(b"half")
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
    return {}

execute_stage(StageSpec(name="resumable", version="1", run=run, config=lambda p: {}, resumable=True),
              load_profile("tiny-cpu"), Store(sys.argv[1]), {})
"""


def test_resumable_stage_killed_mid_atomic_write_records_no_temp_file(tmp_path: Path) -> None:
    """download and train keep a killed attempt's files to resume from; a temp file of atomic_file that the kill
    left behind is not progress and must not become part of the finished artifact."""
    from finetune.profile import load_profile
    from finetune.stage import StageContext, StageSpec, execute_stage
    from finetune.store import Store, atomic_file

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_ATOMIC_WRITE, str(tmp_path)], cwd=REPO,
                            env=fault_env(tmp_path / "scratch"), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (work,) = (tmp_path / "resumable").iterdir()
    assert [p.name for p in work.glob(".weights.bin.*.tmp")], "the kill should have left atomic_file's temp file"

    def finish(ctx: StageContext) -> dict[str, Any]:
        assert (ctx.workdir / "progress.bin").is_file(), "a resumable stage keeps its progress"
        with atomic_file(ctx.workdir / "weights.bin") as handle:
            handle.write(b"complete")
        return {}

    spec = StageSpec(name="resumable", version="1", run=finish, config=lambda p: {}, resumable=True)
    artifact, _ = execute_stage(spec, load_profile("tiny-cpu"), Store(tmp_path), {})
    assert sorted(artifact.files) == ["progress.bin", "tables.json", "weights.bin"]
    assert leftovers(tmp_path) == []


def test_resumable_stage_killed_after_its_tables_sees_only_its_own_files(tmp_path: Path) -> None:
    """Found by the SIGKILL campaign: download killed between writing tables.json and artifact.json listed the stale
    tables.json among the model's files on the rerun (and counted it in its metrics)."""
    from finetune.profile import load_profile
    from finetune.stage import TABLES_FILE, StageContext, StageSpec, execute_stage, stage_key
    from finetune.store import Store

    def run(ctx: StageContext) -> dict[str, Any]:
        (ctx.workdir / "model.bin").write_bytes(b"weights")
        return {"files": sorted(p.name for p in ctx.workdir.iterdir())}

    spec = StageSpec(name="resumable", version="1", run=run, config=lambda p: {}, resumable=True)
    profile, store = load_profile("tiny-cpu"), Store(tmp_path)
    killed = store.local_dir("resumable", stage_key(spec, profile, {}))
    killed.mkdir(parents=True)
    (killed / "model.bin").write_bytes(b"weights")
    (killed / TABLES_FILE).write_text("{}")  # what the killed attempt had written just before its manifest
    artifact, _ = execute_stage(spec, profile, store, {})
    assert artifact.metrics["files"] == ["model.bin"]


# ---- comparing a faulted run's artifact with the reference's -----------------------------------------------------

# Files that record wall time, absolute paths or a random id: equal in meaning, not in bytes (see _same_meaning).
VOLATILE = {
    "train": {"metrics.jsonl", "checkpoints.jsonl", "tables.json", "torchtune_config.yaml", "final/train_meta.json"},
    "evaluate": {"results.json"},
    "quantize": {"tables.json"},
    "benchmark": {"results.json", "tables.json", "latency_vs_throughput.png"},
}
# Measurements in files of their own: `vllm bench serve`'s result per level (throughputs and latencies).
VOLATILE_PATTERNS = {"benchmark": ("vllm-bench/*.json",)}
# DCP writes the checkpoint's absolute path and a random save id into `.metadata` (tensors are in *.distcp); gzip
# headers carry the write time; server logs carry timestamps.
VOLATILE_SUFFIXES = (".metadata", ".log", ".jsonl.gz", ".distcp")


def _same_meaning(stage: str, name: str, mine: Path, theirs: Path, roots: tuple[Path, Path]) -> None:
    """Compare a volatile file by what it means: losses, scores, settings; not timings, paths or ids."""
    if name.endswith(".distcp"):
        # Compared by value: model, optimizer, trainer counters, scheduler and RNG state must be identical (a resumed
        # run's RNG stream is the uninterrupted one's: tunerecipes.sampler.epoch_batches).
        assert _dcp_values(mine.parent) == _dcp_values(theirs.parent), name
    elif name.endswith(".jsonl.gz"):
        assert gzip.decompress(mine.read_bytes()) == gzip.decompress(theirs.read_bytes()), name
    elif name == "metrics.jsonl":
        def losses(path: Path) -> dict[int, float]:
            return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}
        assert losses(mine) == pytest.approx(losses(theirs), rel=1e-6), name
    elif name == "checkpoints.jsonl":
        # One line per save, appended by every attempt: a killed run's trainer may save on its way out (on notice)
        # and the rerun saves again from where it resumed, so only the form and the range can match.
        def saves(path: Path) -> list[dict[str, Any]]:
            return [json.loads(line) for line in path.read_text().splitlines()]
        assert {r["reason"] for r in saves(mine)} <= {"steps", "minutes", "notice"}, name
        assert 0 < max(r["step"] for r in saves(mine)) <= max(r["step"] for r in saves(theirs)), name
    elif name in ("torchtune_config.yaml", "final/train_meta.json"):
        def normalized(path: Path, root: Path) -> Any:
            return yaml.safe_load(path.read_text().replace(str(root), "<store>"))
        assert normalized(mine, roots[0]) == normalized(theirs, roots[1]), name
    elif stage == "evaluate" and name == "results.json":
        def scores(path: Path) -> Any:
            return json.loads(path.read_text())["results"]
        assert scores(mine) == scores(theirs)
    elif _volatile_pattern(stage, name):
        assert sorted(json.loads(mine.read_text())) == sorted(json.loads(theirs.read_text())), name
    elif stage == "benchmark" and name == "results.json":
        def shape(path: Path) -> Any:
            data = json.loads(path.read_text())
            return data["config"], data["workload"], sorted(data["models"])
        assert shape(mine) == shape(theirs)


def _volatile_pattern(stage: str, name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in VOLATILE_PATTERNS.get(stage, ()))


def _dcp_values(checkpoint: Path) -> dict[str, Any]:
    """Every value of a DCP checkpoint, tensors as (dtype, shape, bytes) so == compares them exactly."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        if isinstance(value, torch.Tensor):
            return {prefix: (value.dtype, tuple(value.shape), value.reshape(-1).view(torch.uint8).numpy().tobytes())}
        return {prefix: value}

    return flat(_load_state_dict_from_keys(checkpoint_id=str(checkpoint)))


def assert_same_result(store: Path, reference: Reference, slot: str) -> None:
    """The artifact of ``slot`` in ``store`` equals the reference's: byte for byte except VOLATILE files."""
    stage, key = stage_of(slot), reference.keys[slot]
    mine = json.loads(_manifest(store, stage, key).read_text())["files"]
    theirs = json.loads(_manifest(reference.store, stage, key).read_text())["files"]
    assert set(mine) == set(theirs), (f"{slot}: different files: only in this run {sorted(set(mine) - set(theirs))}, "
                                      f"only in the uninterrupted run {sorted(set(theirs) - set(mine))}")
    for name in mine:
        if (name in VOLATILE.get(stage, ()) or name.endswith(VOLATILE_SUFFIXES)
                or _volatile_pattern(stage, name)):
            _same_meaning(stage, name, store / stage / key / name, reference.store / stage / key / name,
                          (store, reference.store))
        else:
            assert mine[name]["sha256"] == theirs[name]["sha256"], f"{slot}: {name} differs from the uninterrupted run"

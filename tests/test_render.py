"""`finetune render`: SkyPilot tasks and JobSets for a profile's multi-node run, validated against their schemas."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

import pytest
import yaml

from finetune.profile import list_profiles, load_profile
from tasks.train.launch import node_command, torchrun_args
from tasks.train.render import RenderError, jobset, render, skypilot_task, validate

PROFILES = sorted(list_profiles())


@pytest.mark.parametrize("target", ["skypilot", "jobset"])
@pytest.mark.parametrize("name", PROFILES)
def test_every_shipped_profile_renders_a_valid_document(name: str, target: str) -> None:
    text = render(load_profile(name), ["train.max_steps=10"], target, store="/store/artifacts")
    document = yaml.safe_load(text)
    validate(target, document)  # what was printed is what was validated
    nodes = load_profile(name).train.nnodes
    if target == "skypilot":
        assert document["num_nodes"] == nodes
    else:
        job = document["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job["parallelism"] == job["completions"] == nodes
        assert job["completionMode"] == "Indexed"


def _script(text: str) -> str:
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # the node script is valid shell
    return text


def test_skypilot_task_sizes_nodes_and_gpus_from_the_profile_and_never_holds_the_token() -> None:
    profile = load_profile("maverick-sft")
    task = skypilot_task(profile, ["data.source=/data/chats.jsonl"], store="s3://bucket/ft", spot=True)
    assert task["num_nodes"] == 4
    assert task["resources"]["accelerators"] == "H200:8"
    assert task["resources"]["use_spot"] is True
    assert task["resources"]["job_recovery"]["max_restarts_on_errors"] == profile.train.elastic.max_restarts
    assert task["secrets"] == {"HF_TOKEN": None}
    assert task["file_mounts"]["/store"]["source"] == "s3://bucket/ft"
    assert task["envs"]["FINETUNE_STORE"] == "/store"
    script = _script(task["run"])
    # Node 0 runs the pipeline, the others join its training; all agree on the launcher (part of the train key).
    assert "finetune run --profile maverick-sft data.source=/data/chats.jsonl train.launcher=skypilot" in script
    assert "python -m flows.multinode join --profile maverick-sft data.source=/data/chats.jsonl " \
           "train.launcher=skypilot" in script
    assert 'FINETUNE_RDZV_ENDPOINT="$(echo "$SKYPILOT_NODE_IPS" | head -n1):29500"' in script


def test_jobset_pods_are_sized_like_the_gpu_pool_with_the_profiles_job_variables() -> None:
    profile = load_profile("maverick-sft")
    document = jobset(profile, [], store="/store/artifacts")
    pod = document["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "finetune-store"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert "value" not in env["HF_TOKEN"]
    assert env["FINETUNE_STORE"]["value"] == "/store/artifacts"
    assert document["spec"]["failurePolicy"]["maxRestarts"] == profile.train.elastic.max_restarts
    script = _script(container["command"][2])
    # Pod 0 of the indexed job is the rendezvous host, reached by its JobSet DNS name.
    assert 'FINETUNE_RDZV_ENDPOINT="finetune-maverick-sft-node-0-0.finetune-maverick-sft:29500"' in script
    assert '"${JOB_COMPLETION_INDEX}" = "0"' in script


def test_jobset_refuses_an_object_store_the_pods_cannot_share() -> None:
    with pytest.raises(RenderError, match="volume claim 'finetune-store'"):
        jobset(load_profile("scout-sft"), [], store="s3://bucket/ft")


def test_schema_rejects_a_misspelt_field_and_names_it() -> None:
    task = skypilot_task(load_profile("scout-sft"), [], store="/store/artifacts")
    task["num_node"] = task.pop("num_nodes")
    with pytest.raises(RenderError, match="num_node"):
        validate("skypilot", task)
    document = jobset(load_profile("scout-sft"), [], store="/store/artifacts")
    document["spec"]["replicatedJobs"][0]["replica"] = 2
    with pytest.raises(RenderError, match="spec.replicatedJobs.0"):
        validate("jobset", document)


def test_torchrun_flags_carry_the_elastic_node_range_and_restarts() -> None:
    train = load_profile("scout-sft", ["train.elastic.min_nodes=1", "train.elastic.max_restarts=5"]).train
    args = torchrun_args(train, "10.0.0.1:29500", "run-1")
    assert args[args.index("--nnodes") + 1] == "1:2"
    assert args[args.index("--max_restarts") + 1] == "5"
    # Survivors wait for a preempted node as long as the profile says (torchrun's default is 600 s).
    assert args[args.index("--rdzv_conf") + 1] == f"join_timeout={train.elastic.join_timeout_s}"
    host = torchrun_args(train, "10.0.0.1:29500", "run-1", is_host=True)
    assert host[host.index("--rdzv_conf") + 1] == f"is_host=1,join_timeout={train.elastic.join_timeout_s}"
    assert args[args.index("--rdzv_backend") + 1] == "c10d"
    command = node_command(train, "/store/train/k/torchtune_config.yaml", "10.0.0.1:29500", "run-1")
    assert command[:2] == ["tune", "run"] and command[-2:] == ["--config", "/store/train/k/torchtune_config.yaml"]


def test_cli_writes_the_rendered_file(tmp_path) -> None:
    out = tmp_path / "task.yaml"
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "render", "--target", "skypilot", "--profile",
                           "scout-sft", "--spot", "-o", str(out), "train.max_steps=100"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    task = yaml.safe_load(out.read_text())
    assert "train.max_steps=100" in shlex.split(task["run"].split("finetune run", 1)[1].splitlines()[0])


@pytest.mark.skipif(importlib.util.find_spec("sky") is None, reason="skypilot is not installed")
def test_skypilot_accepts_the_rendered_tasks() -> None:
    """With SkyPilot installed, its own task schema and parser agree with ours."""
    import jsonschema
    from sky import task as sky_task
    from sky.utils import schemas

    for name in PROFILES:
        for store in ("/store/artifacts", "s3://bucket/ft"):
            document = yaml.safe_load(render(load_profile(name), [], "skypilot", store=store, spot=True))
            jsonschema.validate(document, schemas.get_task_schema())
            assert sky_task.Task.from_yaml_config(document).num_nodes == load_profile(name).train.nnodes

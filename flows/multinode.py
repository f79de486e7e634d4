"""``python -m flows.multinode join``: the trainer of a non-zero node of a job that SkyPilot or a JobSet placed
(rendered by ``finetune render``, tasks/train/render.py).

Node 0 runs the pipeline, whose train stage writes the training config into the shared store and starts node 0's
trainer. Every other node runs ``join``: it computes the train key from the pipeline definition (the same keys node
0 computes), waits until that config appears in the store, and starts this node's trainer with the rendezvous the
launcher exported.
"""

from __future__ import annotations

import argparse
import sys
import time

from finetune.profile import Profile, load_profile
from finetune.stage import StageContext
from finetune.store import Store, default_store_url
from flows.node_runs import ENDPOINT_TIMEOUT_S
from flows.pipeline import needed, stage_keys
from tasks.train.launch import external_node_command, launch_trainers
from tunerecipes.checkpoint_layout import CONFIG_FILE

POLL_S = 5.0


def train_key(profile: Profile) -> str:
    """The train stage's key as node 0's pipeline computes it."""
    return stage_keys(profile, needed(["train"]))["train"]


def join(profile: Profile, store: Store, timeout_s: float = ENDPOINT_TIMEOUT_S) -> None:
    """Wait until node 0's pipeline has written the training config to the shared store, then train with it."""
    workdir = store.local_dir("train", train_key(profile))
    config_path = workdir / CONFIG_FILE
    deadline = time.monotonic() + timeout_s
    while not config_path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{config_path} did not appear within {timeout_s:.0f}s (is node 0's pipeline running "
                               "against the same shared store?)")
        time.sleep(POLL_S)
    ctx = StageContext(profile=profile, key=workdir.name, workdir=workdir, inputs={}, log=print)
    launch_trainers(ctx, [external_node_command(profile.train, config_path)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.multinode", description="Nodes placed by SkyPilot/JobSet.")
    sub = parser.add_subparsers(dest="command", required=True)
    joiner = sub.add_parser("join", help="train as a non-zero node of a rendered SkyPilot task / JobSet")
    joiner.add_argument("--profile", required=True)
    joiner.add_argument("--store", default=None)
    joiner.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    join(load_profile(args.profile, args.overrides), Store(args.store or default_store_url()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

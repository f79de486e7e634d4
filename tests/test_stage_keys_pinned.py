"""The stage keys of every shipped profile are pinned: a change of code layout or of how a profile is read must not
change a key, or every user's store is invalidated at upgrade (each stage recomputed: days of GPU time at full
size). A key that should change (a stage's output for the same inputs changed) changes with the stage's ``version``,
and this file's expected keys are rewritten on purpose: ``python -m tests.test_stage_keys_pinned --write``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune.profile import Profile, list_profiles, load_profile
from flows.pipeline import pipeline, stage_keys

EXPECTED = Path(__file__).parent / "expected" / "stage_keys.json"
# Production profiles read a hub revision and an object store at key time: pinned to a revision and to the shipped
# data (repo-relative paths, so the keys do not depend on where the checkout lies).
REVISION = "ab" * 20
DATA = {"chat": "embedded/data/train.jsonl", "preference": "embedded/preferences/train.jsonl"}


def _profile(name: str) -> Profile:
    profile = load_profile(name)
    if profile.model.source != "hub":
        return profile
    data = DATA["preference" if profile.data.format == "preference" else "chat"]
    return load_profile(name, [f"model.revision={REVISION}", f"data.source={data}"])


def current_keys() -> dict[str, dict[str, str]]:
    return {name: stage_keys(profile, pipeline(profile)) for name in sorted(list_profiles())
            for profile in [_profile(name)]}


def test_every_shipped_profiles_stage_keys_are_unchanged() -> None:
    expected = json.loads(EXPECTED.read_text())
    current = current_keys()
    changed = {f"{name}/{label}": (keys.get(label), current[name].get(label))
               for name, keys in expected.items() for label in {*keys, *current.get(name, {})}
               if keys.get(label) != current.get(name, {}).get(label)}
    assert set(current) == set(expected), f"profiles added or removed: rewrite {EXPECTED.name} (--write)"
    assert not changed, f"stage keys changed (expected, now): {changed}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    EXPECTED.write_text(json.dumps(current_keys(), indent=1, sort_keys=True) + "\n")

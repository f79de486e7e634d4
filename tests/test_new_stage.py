"""A new stage is one module exporting ``SPEC`` plus its line in ``flows/pipeline.py``'s PIPELINE (and the import of
its module), as README "Architecture" says. This adds a dummy stage exactly that way, to a copy of the pipeline's
source, and runs it through the real CLI and flow (on a store of its own: the shared run's store keeps its run
records): it is keyed, computed, cached and recorded like any other stage, and ``--until`` knows it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import isolated_env

pytestmark = pytest.mark.slow  # two CLI runs: the embedded download and the probe, then a cached rerun

REPO = Path(__file__).resolve().parents[1]

PROBE_STAGE = textwrap.dedent('''
    """probe: lists the files of the model it reads (a stage written for the test, the way every stage is)."""
    from pathlib import Path
    from typing import Any

    from finetune.stage import StageContext, StageSpec


    def run(ctx: StageContext) -> dict[str, Any]:
        files = sorted(p.name for p in Path(ctx.inputs["model"].path).iterdir())
        (ctx.workdir / "files.txt").write_text("\\n".join(files) + "\\n")
        ctx.log(f"probe: {len(files)} files")
        return {"files": len(files)}


    SPEC = StageSpec(name="probe", version="1", run=run, config=lambda profile: {}, upstream=("model",))
''')

# Loads flows/pipeline.py with the two added lines as flows.pipeline, then runs the CLI as `finetune` would.
RUN_WITH_PROBE = textwrap.dedent('''
    import sys, types
    from pathlib import Path
    source = Path("flows/pipeline.py").read_text()
    anchor = '    Step("pack", pack.SPEC, {"download": "download"}),\\n'
    assert anchor in source, "the pipeline's pack line moved: update this test's anchor"
    source = source.replace(anchor, '    Step("probe", probe.SPEC, {"model": "download"}),\\n' + anchor)
    source = source.replace("from tasks import benchmark,", "from probe_stage import stage as probe\\nfrom tasks import benchmark,")
    module = types.ModuleType("flows.pipeline")
    module.__file__ = "flows/pipeline.py"
    sys.modules["flows.pipeline"] = module
    exec(compile(source, "flows/pipeline.py", "exec"), module.__dict__)
    from entrypoints.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_a_stage_added_as_one_module_and_one_pipeline_line_runs_cached_and_keyed(tmp_path: Path) -> None:
    package = tmp_path / "probe_stage"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text(PROBE_STAGE)
    env = {**isolated_env(tmp_path / "run"), "PYTHONPATH": f"{REPO}:{tmp_path}"}

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", RUN_WITH_PROBE, "run", "--profile", "tiny-cpu", "--until", "probe",
                               "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout)

    first = run()
    assert list(first["stages"]) == ["download", "probe"], first["stages"].keys()
    assert not first["stages"]["probe"]["cached"]
    probe = first["stages"]["probe"]
    files = (Path(probe["path"]) / "files.txt").read_text().split()
    assert probe["metrics"]["files"] == len(files) and "config.json" in files
    assert json.loads((Path(probe["path"]) / "artifact.json").read_text())["inputs"] == {
        "model": first["stages"]["download"]["key"]}
    again = run()["stages"]["probe"]
    assert again["cached"] and again["key"] == probe["key"] and again["path"] == probe["path"]

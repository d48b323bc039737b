"""Every registered combination runs, generated from the registries: a data shape registered tomorrow is covered the
day it is registered (tests/shape_samples.py must write it, or test_data_shapes fails).

- every data shape (SFT and preference) × upload: one file of each dropped where `loraflow watch --once` sees it; the
  server's triggers start one run of its objective's deployment, which the pool's worker completes;
- every SFT shape × form run: the deployment run with the parameters the UI's Run form submits (the deployment's
  defaults as the form shows them, the file and its shape picked in the form's choices), completed by the worker;
- every shape × CLI: `loraflow run` through the console script, completed;
- every file in examples/ × `loraflow run` on the built model: the example as shipped, with the base, the data file
  and the store overridden (and the DPO example's 200 steps cut to 2).

Cost (the suite's budget is 15 minutes on 2 cores): one server, pool and worker for the module; every run is one
step on 8 rows, no quantization, no merge, no validation split, in one store, so the lora stage is built once and
each shape's dataset and training are built once: by its upload run; the form and CLI runs of the same file and
settings reuse them (their keys read the shape as resolved, so format auto and a format picked in the form meet
the same key). Everything is submitted at once and waited for together.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from loraflow.data.shapes import BY_NAME, SHAPES, names
from real_prefect import BIN, REPO, flow_run_logs, server_with_pool_worker
from shape_samples import every_shape, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("combinations")]  # (one module: one server, one store)

SAMPLE = REPO / "loraflow" / "data" / "sample" / "alpaca_gpt4_sample.json"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
FILES = every_shape(8)  # {file stem: (shape, rows)}: at least one file of every registered shape
# One file per shape for the form and CLI runs (the first of its shape: e.g. messages, not messages-with-system).
FIRST_OF = {shape: stem for stem, (shape, _) in reversed(FILES.items())}
DEPLOYMENT = {"sft": "loraflow-sft/sft-xpu", "dpo": "loraflow-dpo/dpo-xpu"}
CLI_AT_ONCE = 2  # `loraflow run` processes at a time (each a Prefect client and a trainer: memory and 2 cores)
WAIT_SECONDS = 900


def _template(shape: str) -> str:
    return BY_NAME[shape].template


def _small_defaults(tiny_model: Path, store: Path) -> dict[str, dict]:
    """The deployments' defaults, made small: the tiny model, one step, no validation split, no merge."""
    tiny = {"storage": str(store), "model": {"base": str(tiny_model), "quantization": "none"}, "merge": {"enabled": False}}
    train = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "save_steps": 1, "gradient_checkpointing": "off"}
    return {
        "sft": {**tiny, "name": "shapes", "data": {"path": str(SAMPLE), "cutoff_len": 128, "val_set_size": 0},
                "train": {**train, "learning_rate": 1e-2}},
        "dpo": {**tiny, "name": "shapes-dpo", "objective": "dpo",
                "data": {"path": str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl"), "val_set_size": 0},
                "dpo": {"max_prompt_length": 48, "max_length": 64}, "train": {**train, "learning_rate": 1e-3}},
    }


def _logs(server, flow_run_id) -> list[str]:
    return [log.message for log in flow_run_logs(server, flow_run_id)]


def _example_data(example: dict, files: dict[str, Path]) -> Path:
    """The sample file an example runs on: of its objective's shapes, the one its data.path names (alpaca_data.json:
    alpaca), else the first its data settings accept."""
    objective = example.get("objective", "sft")
    data = example.get("data", {})
    accepted = [shape for shape in names(objective) if data.get("format", "auto") in ("auto", shape)
                and data.get("template", "auto") in ("auto", *BY_NAME[shape].templates)]
    assert accepted, f"no registered shape fits the example's data settings {data}"
    named = [shape for shape in accepted if shape.replace("-", "_") in Path(data.get("path", "")).stem.replace("-", "_")]
    return files[FIRST_OF[max(named, key=len) if named else accepted[0]]]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A server, the xpu pool from its JSON, a worker started by infra/worker/start-worker, and the deployments."""
    home = tmp_path_factory.mktemp("prefect-combinations")
    with server_with_pool_worker(home, "combinations") as server:
        yield server


@pytest.fixture(scope="module")
def runs(pool, tiny_model, tmp_path_factory):
    """Every combination, started at once: the uploads (watch --once), the form runs, the CLI runs and the examples;
    returned once every one has ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    server, root = pool, tmp_path_factory.mktemp("combinations")
    store, incoming = root / "store", root / "incoming"
    incoming.mkdir()
    files = {stem: write_jsonl(incoming / f"{stem}.jsonl", rows) for stem, (_, rows) in FILES.items()}
    defaults = _small_defaults(tiny_model, store)
    with server.client_settings(), get_client(sync_client=True) as client:
        deployments = {objective: client.read_deployment_by_name(name) for objective, name in DEPLOYMENT.items()}
        for objective, deployment in deployments.items():
            client.update_deployment(deployment.id, DeploymentUpdate(parameters={"config": defaults[objective]}))
        client.update_work_pool("xpu", WorkPoolUpdate(concurrency_limit=4))  # (memory: 13 fine-tunes queued on a small host)
    try:
        watched = server.run(str(BIN / "loraflow"), "watch", str(incoming), "--storage", str(store), "--once")

        # The form runs: what the UI's Run form submits, the deployment's defaults as the form shows them with the
        # file and its shape picked (the server enforces the deployment's parameter schema: the form's own check).
        form_runs = {}
        with server.client_settings(), get_client(sync_client=True) as client:
            sft = client.read_deployment(deployments["sft"].id)
            for shape in names("sft"):
                config = yaml.safe_load(yaml.safe_dump(sft.parameters["config"]))
                config["data"].update(path=str(files[FIRST_OF[shape]]), format=shape, template="auto")
                form_runs[shape] = client.create_flow_run_from_deployment(sft.id, parameters={"config": config}).id
            schema = sft.parameter_openapi_schema

        def loraflow_run(config: Path, *overrides: str) -> subprocess.CompletedProcess:
            argv = [str(BIN / "loraflow"), "run", str(config), *(item for key in overrides for item in ("--set", key))]
            return subprocess.run(argv, env=server.env, cwd=REPO, capture_output=True, text=True, timeout=WAIT_SECONDS)

        cli_configs = {}
        for shape in BY_NAME:
            cli_configs[shape] = root / f"cli-{shape}.yaml"
            config = {**defaults[BY_NAME[shape].objective]}
            config["data"] = {**config["data"], "path": str(files[FIRST_OF[shape]])}
            cli_configs[shape].write_text(yaml.safe_dump(config))
        with ThreadPoolExecutor(CLI_AT_ONCE) as executor:
            examples = {}
            for path in EXAMPLES:
                example = yaml.safe_load(path.read_text())
                cut = ["train.max_steps=2"] if example.get("train", {}).get("max_steps", 0) > 2 else []
                examples[path.name] = executor.submit(loraflow_run, path, f"model.base={tiny_model}",
                                                      f"data.path={_example_data(example, files)}",
                                                      f"storage={root / 'example-store'}", *cut)
            cli = {shape: executor.submit(loraflow_run, cli_configs[shape]) for shape in BY_NAME}

            def pool_runs() -> dict[str, list]:
                with server.client_settings(), get_client(sync_client=True) as client:
                    return {objective: client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
                            for objective, d in deployments.items()}

            def ended(listed: dict[str, list]) -> bool:
                # (at least: a client request the loaded server answered late is retried by Prefect's client, which may
                # create a form run twice; the upload test counts the watcher's runs exactly)
                every = [run for runs_of in listed.values() for run in runs_of]
                return len(every) >= len(files) + len(form_runs) and all(run.state.is_final() for run in every)

            deadline = time.time() + WAIT_SECONDS
            while not ended(started := pool_runs()):
                assert time.time() < deadline, (server.worker_log.read_text()[-3000:],
                                                {o: [(r.parameters.get("dataset"), r.state_name) for r in rs] for o, rs in started.items()})
                time.sleep(2)
            examples = {name: future.result() for name, future in examples.items()}
            cli = {shape: future.result() for shape, future in cli.items()}
    finally:
        with server.client_settings(), get_client(sync_client=True) as client:
            client.update_work_pool("xpu", WorkPoolUpdate(concurrency_limit=None))
            for deployment in deployments.values():
                client.update_deployment(deployment.id, DeploymentUpdate(parameters=deployment.parameters))
    return {"server": server, "files": {str(path): stem for stem, path in files.items()}, "watched": watched.stdout,
            "pool": started, "form": form_runs, "schema": schema, "cli": cli, "examples": examples}


def test_an_upload_of_every_data_shape_starts_one_run_of_its_deployment_that_completes(runs):
    """The watcher (a real `loraflow watch --once`) sees one file of every shape the data layer registers (SFT and
    preference, made from real rows); the server's triggers start exactly one run per file, of the deployment of the
    shape's objective, with the deployments' defaults (format and template auto), and the worker completes each."""
    files = {path: (FILES[stem][0], BY_NAME[FILES[stem][0]].objective) for path, stem in runs["files"].items()}
    assert {shape for shape, _ in files.values()} == {shape.name for shape in SHAPES}
    assert runs["watched"].count("new dataset") == len(files), runs["watched"]
    for objective, listed in runs["pool"].items():
        uploads = [run for run in listed if run.parameters.get("dataset")]
        # exactly one run per file of this objective, none for the other objective's files
        assert sorted(run.parameters["dataset"] for run in uploads) == sorted(path for path, (_, o) in files.items() if o == objective)
        for run in uploads:
            assert run.state.is_completed(), (run.parameters["dataset"], run.state.message, runs["server"].worker_log.read_text()[-3000:])
            shape = files[run.parameters["dataset"]][0]
            messages = _logs(runs["server"], run.id)
            assert any(m.endswith(f"read as {shape} rows, template {_template(shape)}") for m in messages), (shape, messages[:30])


@pytest.mark.parametrize("shape", names("sft"))
def test_a_form_run_of_every_sft_shape_completes(runs, shape):
    """The SFT deployment's form offers the shape (its data.format choices are the registry's), and a run submitted
    with it picked completes, the file read as that shape."""
    data = runs["schema"]["definitions"]["DataSettings"]["properties"]["format"]
    assert shape in data["enum"]
    [run] = [run for run in runs["pool"]["sft"] if run.id == runs["form"][shape]]
    assert run.state.is_completed(), (run.state.message, runs["server"].worker_log.read_text()[-3000:])
    messages = _logs(runs["server"], run.id)
    assert any(m.endswith(f"read as {shape} rows, template {_template(shape)}") for m in messages), messages[:30]


@pytest.mark.parametrize("shape", [shape.name for shape in SHAPES])
def test_loraflow_run_of_every_shape_completes(runs, shape):
    """`loraflow run` on a file of each shape (format and template auto) reads it as that shape and completes."""
    result = runs["cli"][shape]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"read as {shape} rows, template {_template(shape)}" in output, output[-4000:]
    assert re.search(r"data: 8 rows read, [1-8] kept", output), output[-4000:]


@pytest.mark.parametrize("example", [path.name for path in EXAMPLES])
def test_every_example_runs_on_the_built_model(runs, example):
    """Each shipped example, as shipped but for the base, the data file and the store (and the DPO example's 200
    steps), fine-tunes the built model to a committed adapter."""
    result = runs["examples"][example]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "summary (with Python that loads the adapter)" in output, output[-4000:]

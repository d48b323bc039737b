"""`loraflow …`: run, demo, serve, watch, runs, artifacts, generate, du, gc, store serve, doctor, build-model.

The application's entry point, and the only module under loraflow/ that may reach Prefect: it imports
flows inside its commands, never at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loraflow import process
from loraflow.backends import BACKENDS, backend
from loraflow.compare import comparison_artifact, comparison_markdown, differing, loss_curves_png, read_run
from loraflow.config_loader import load_config, parse_overrides
from loraflow.data.formats import read_rows
from loraflow.data.shapes import names as shape_names
from loraflow.errors import LoraflowError
from loraflow.gc import DefaultConfig, apply, plan, usage
from loraflow.paths import check_local_inputs
from loraflow.registry import DATASET, EVALUATION, TRAIN
from loraflow.report import eval_text, evaluation_text, generate_command, loss_text, reward_text, rows_text, run_uri_of
from loraflow.storage import STORE_URL_SETTING, ArtifactStore, remote_failure, sha256_hex
from loraflow.store_server import DEFAULT_HOST, DEFAULT_PORT, StoreRoot, exposure_note, make_server, server_url, start_in_thread
from loraflow.sweep import describe

# Lazy imports: flows/ and tasks/ (Prefect: about 1.5 s, and by DESIGN.md only inside commands) and the modules that
# import torch, transformers and bitsandbytes (models, plan, envcheck, generate: seconds) are imported inside the
# commands that use them, so `loraflow --help` and the store, gc, runs and watch commands start without them.

# A Prefect server that reports nothing outside: no usage analytics, and the v1 UI at its root (Prefect 3.8's v2 UI,
# the default there, fetches its analytics library's remote config from amplitude.com on load even with analytics off).
QUIET_SERVER = "PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_V2_ENABLED=false"

SAMPLE_DATA = Path(__file__).parent / "data" / "sample" / "alpaca_gpt4_sample.json"

DEMO_CONFIG = """\
# The embedded demo: a real QLoRA fine-tune of a small Llama-architecture model that loraflow built
# (random weights, a BPE tokenizer trained on the sample data), on 200 Alpaca-GPT4 rows.
name: demo
storage: ./store
model:
  base: ./models/tiny-llama
  quantization: nf4
data:
  path: {sample}
  format: auto  # detected from the file ({shapes})
  template: auto  # alpaca rows: alpaca-lora's template; conversations: chatml
  cutoff_len: 256
  val_set_size: 20
lora:
  r: 8
  alpha: 16
  target: all-linear
train:
  # A randomly initialised toy model needs a far larger step than the seeds' 3e-5 (tuned for
  # pretrained 7B models) to show learning within a minute on a CPU.
  learning_rate: 1.0e-2
  batch_size: 16
  num_epochs: 2
  eval_steps: 10
  save_steps: 10
"""


def _quiet_libraries() -> None:
    # The CLI's own process builds, quantizes and merges models but never runs DeepSpeed (a trainer process does):
    # loraflow.process blocks its import; SIGTERM ends a command as Ctrl-C does (its run ends Crashed, Prefect's
    # temporary server is stopped).
    process.setup(quiet_environment=True, interrupt_on_sigterm=True)
    for name, value in (setting.split("=") for setting in QUIET_SERVER.split()):
        os.environ.setdefault(name, value)


def _print_records(records: dict, outcomes: dict[str, str]) -> None:
    print("\noutputs (built: computed in this run; cached: Prefect's cache; reused: found committed in the store):")
    for name, record in records.items():
        if record.uri:
            print(f"  {name:<10} {outcomes.get(name, ''):<7} {record.uri}")
    data = records.get(DATASET.name)
    if data:
        d = data.metrics

        print(f"\ndata: {rows_text(d)}; {d.get('truncated_rows')} truncated "
              + (f"at cutoff {d['cutoff_len']}" if "cutoff_len" in d else f"to max prompt {d.get('max_prompt_length')} / max length {d.get('max_length')} tokens"))
    train = records.get(TRAIN.name)
    if train:
        m = train.metrics

        print(f"\n{loss_text(m, '{:.4f}'.format)}, {eval_text(m, '{:.4f}'.format)}, {m.get('tokens_per_s')} tokens/s on {m.get('device')}")
        if (rewards := reward_text(m)) is not None:
            print(rewards)
    if (evaluation := records.get(EVALUATION.name)) is not None:
        for line in evaluation_text(evaluation.metrics):
            print(line)


# Prefect gives its temporary server 20 s to answer (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Its first start
# in a fresh PREFECT_HOME creates the database (114 migrations, 4 s alone; then 17-18 s to answer on this shared 2-core
# machine, against 8-12 s in a used PREFECT_HOME); it took about 21 s on another idle 2-core machine, 35-40 s here with
# both cores busy, and `loraflow runs` took 77 s end to end with two busy loops beside other work. Where the user sets
# no bound, loraflow allows this many (Prefect counts only its waits between polls: the wall time can be longer).
TEMPORARY_SERVER_START_SECONDS = 180


def start_temporary_server() -> None:
    """Start Prefect's temporary server now, for a command that needs Prefect while PREFECT_API_URL names no server:
    with a bound that fits a slow or busy machine, and a start that fails is one error line, not a traceback from
    wherever Prefect first needed it. The flows' calls then find it running (Prefect keeps one per process)."""
    import time

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings

    settings = get_current_settings().server.ephemeral
    if PREFECT_API_URL.value():  # a server of the user's: it may still be starting (`prefect server start &` just before)
        wait_for_server(PREFECT_API_URL.value())
        return
    if not settings.enabled:  # no server allowed: Prefect says so
        return
    user_bound = "startup_timeout_seconds" in settings.model_fields_set  # (env, profile or prefect.toml)
    bound = settings.startup_timeout_seconds if user_bound else TEMPORARY_SERVER_START_SECONDS
    server = SubprocessASGIServer()
    started = time.monotonic()
    try:
        server.start(timeout=max(bound, 1))
    except Exception:  # a timeout (RuntimeError) or the health check's answer (httpx): no server either way
        waited = time.monotonic() - started
        home = get_current_settings().home
        instead = ("or start a server once (`.venv/bin/prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api, "
                   "then run this again")
        code = server.server_process.poll() if server.server_process else None
        if code is not None:
            raise LoraflowError(f"Prefect's temporary server (PREFECT_HOME {home}) exited with code {code} before it answered; "
                                f"its output above says why: fix that, {instead}") from None
        raise LoraflowError(f"Prefect's temporary server (PREFECT_HOME {home}) did not answer within its start bound of {bound} s "
                            f"(waited {waited:.0f} s); a first start in a fresh PREFECT_HOME creates its "
                            f"database, slower on a busy machine: allow more, e.g. export "
                            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={max(4 * bound, 300)}, {instead}") from None


# How long a command waits for the server PREFECT_API_URL names to answer (LORAFLOW_SERVER_WAIT_SECONDS): a server
# started just before (`prefect server start &` on the line above, as the README's steps do) takes 20-40 s on 2 cores.
SERVER_WAIT_SECONDS = 120


def wait_for_server(api_url: str) -> None:
    """Wait until the Prefect server at api_url answers its health check; one error line if it does not in time."""
    import time

    import httpx

    bound = float(os.environ.get("LORAFLOW_SERVER_WAIT_SECONDS", SERVER_WAIT_SECONDS))
    deadline, said = time.monotonic() + bound, False
    while True:
        try:
            if httpx.get(f"{api_url.rstrip('/')}/health", timeout=5).status_code == 200:
                return
            problem = "it answered, but not as a Prefect server"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}"
        if time.monotonic() >= deadline:
            raise LoraflowError(f"the Prefect server at PREFECT_API_URL={api_url} did not answer within {bound:.0f} s ({problem}); "
                                "start it (`.venv/bin/prefect server start`), check the address, or unset PREFECT_API_URL "
                                "to use a temporary server")
        if not said:
            print(f"waiting for the Prefect server at {api_url} (up to {bound:.0f} s)", flush=True)
            said = True
        time.sleep(0.5)


def _run_flow(config, show_ui_hint: bool) -> dict:
    check_local_inputs(config)  # before the temporary server starts and the store or a block is created
    import tasks.common
    from tasks.runs import stage_outcomes, task_states

    start_temporary_server()
    tasks.common.CALLER_PRINTS_USER_ERRORS = True  # printed once, at the end (_failure_reason)
    from flows.common import finetune_flow

    state = finetune_flow(config.objective)(config, return_state=True)
    records = state.result(raise_on_failure=False)
    if state.is_failed():
        raise _failure_reason(state)
    _print_records(records, stage_outcomes(records, task_states(state.state_details.flow_run_id)))
    if "adapter" in records:
        print(f"\nsummary (with Python that loads the adapter): {run_uri_of(records)}/summary.md\n"
              f"try it: {generate_command(config.for_run().model_dump(mode='json'), records)}")
    if show_ui_hint:
        from prefect.settings import PREFECT_UI_URL

        home = os.environ.get("PREFECT_HOME", "~/.prefect")
        if os.environ.get("PREFECT_API_URL"):  # a running server: its UI shows the run now
            print(f"\nsee this run in the Prefect UI: {PREFECT_UI_URL.value()}/runs/flow-run/{state.state_details.flow_run_id}")
            return records
        print(
            "\nsee this run in the Prefect UI:\n"
            # (no usage analytics from the server, and the v1 UI at its root: the v2 UI contacts amplitude.com on load)
            f"  PREFECT_HOME={home} {QUIET_SERVER} {Path(sys.executable).parent / 'prefect'} server start\n"
            f"  then open http://127.0.0.1:4200/runs/flow-run/{state.state_details.flow_run_id}"
        )
    return records


def _failure_reason(state) -> Exception:
    try:
        state.result()
    except LoraflowError as error:
        return error
    except Exception as error:  # a stage raised something else: keep its type in the message
        return LoraflowError(f"{type(error).__name__}: {error}")
    return LoraflowError(f"the flow run ended {state.name}")


def cmd_run(args) -> int:
    config = load_config(args.config, args.set or [])
    _run_flow(config, show_ui_hint=True)
    return 0


def cmd_sweep(args) -> int:
    """The sweep flow on a config and a grid given as --grid KEY=[V1,V2] (YAML lists)."""
    import tasks.common
    from flows.sweep import rank_variants, sweep

    config = load_config(args.config, args.set or [])
    grid = {key: values if isinstance(values, list) else [values] for key, values in parse_overrides(args.grid or [])}
    space = dict(parse_overrides(args.search or []))
    if not grid and not space:
        raise LoraflowError("give the settings to sweep: --grid lora.r=[8,16,32] (repeatable; every combination runs), or "
                            "an Optuna search: --search 'train.learning_rate={low: 1e-5, high: 1e-3, log: true}' --trials 8")
    tasks.common.CALLER_PRINTS_USER_ERRORS = True
    start_temporary_server()
    state = sweep(config, grid=grid, metric=args.metric, higher_is_better=args.higher_is_better, parallel=args.parallel,
                  search_space=space, trials=args.trials, return_state=True)
    if state.is_failed():
        raise _failure_reason(state)
    results = state.result()
    # Each variant's settings that differ from the others' (as the store records them: also what a search chose)
    store = ArtifactStore(config.storage)
    runs = {name: read_run(store, run_uri_of(records).rsplit("/", 1)[-1]) for name, records in results.items()}
    changed = differing(list(runs.values()))
    print(f"\nvariants ranked by {args.metric} ({'higher' if args.higher_is_better else 'lower'} is better):")
    for place, (name, value) in enumerate(rank_variants(results, args.metric, args.higher_is_better), start=1):
        # (a setting this variant's method lacks, e.g. lora.r of an IA3 variant, is left out)
        settings = describe({key: setting for key in changed if (setting := runs[name].settings.get(key)) not in (None, [])})
        print(f"  {place}. {name:<20} {value:.4g}  {settings}  {results[name]['adapter'].uri}")
    return 0


def cmd_build_model(args) -> int:
    from loraflow.models.tiny import build_tiny_llama, sample_texts

    out = build_tiny_llama(args.out, sample_texts(read_rows(args.data)), vocab_size=args.vocab_size,
                           hidden_size=args.hidden_size, layers=args.layers)
    print(f"built {out}")
    return 0


def _demo_config_path(workdir: Path) -> Path:
    """The demo's config in workdir, building the demo model there first if it is missing."""
    from loraflow.models.tiny import build_tiny_llama, sample_texts

    model_dir = workdir / "models" / "tiny-llama"
    if not (model_dir / "config.json").exists():
        print(f"building the demo model in {model_dir}")
        build_tiny_llama(model_dir, sample_texts(read_rows(str(SAMPLE_DATA))))
    config_path = workdir / "demo.yaml"
    if not config_path.exists():
        config_path.write_text(DEMO_CONFIG.format(sample=SAMPLE_DATA, shapes=", ".join(shape_names("sft"))))
    return config_path


def cmd_demo(args) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))

    config_path = _demo_config_path(workdir)
    print(f"config: {config_path}   (edit it, or run `loraflow run {config_path} --set key=value`)")
    _run_flow(load_config(config_path, args.set or []), show_ui_hint=True)
    return 0


def _require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LoraflowError("no Prefect server: start one (`.venv/bin/prefect server start`) and "
                            "export PREFECT_API_URL=http://127.0.0.1:4200/api, then run this again")
    wait_for_server(url)
    return url


DEPLOYMENTS_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def served_deployments(config: dict, watch_prefix: str | None, interval: float) -> list:
    """deployments/prefect.yaml's entries as `<what>-local` deployments of this process (one source for both).

    The config becomes every `config` default; the watcher gets `watch_prefix` and the config's store,
    with an interval schedule when a prefix is given. Work pools and the YAML's example schedules do
    not apply to a served process.
    """
    import importlib

    import yaml
    from prefect.events import DeploymentEventTrigger

    served = []
    for entry in yaml.safe_load(DEPLOYMENTS_YAML.read_text())["deployments"]:
        module, _, attribute = entry["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attribute)
        parameters = dict(entry.get("parameters") or {})
        for name in ("config", "preferences"):
            if name in parameters:
                own = parameters[name]
                # Another objective's config (a DPO one, serving an SFT config) keeps its own data and settings; model
                # and store are the served config's (on the native backend where the served one does not train it).
                objective = own.get("objective", "sft")
                model = config["model"]
                if objective not in backend(model.get("backend", "native")).objectives:
                    model = {**model, "backend": "native"}
                parameters[name] = config if objective == config.get("objective", "sft") else {
                    **own, "storage": config["storage"], "model": model,
                    "data": {**own["data"], "path": str(DEPLOYMENTS_YAML.parents[1] / own["data"]["path"])}}
        if "prefix" in parameters:
            parameters.update(prefix=watch_prefix or parameters["prefix"], storage=config["storage"])
        triggers = [DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"}) for trigger in entry.get("triggers") or []]
        served.append(flow.to_deployment(
            entry["name"].removesuffix("-" + entry["work_pool"]["name"]) + "-local",
            description=entry.get("description"), tags=entry.get("tags"), parameters=parameters, triggers=triggers,
            interval=interval if ("prefix" in parameters and watch_prefix) else None,
            enforce_parameter_schema=entry.get("enforce_parameter_schema", True),
        ))
    return served


def cmd_serve(args) -> int:
    """Serve the SFT (with the upload trigger), training, merge and watcher deployments from this process."""
    _require_server()
    config_path = Path(args.config) if args.config else _demo_config_path(Path(args.workdir).resolve())
    config = load_config(config_path, args.set or []).model_dump(mode="json")
    from prefect import serve

    deployments = served_deployments(config, args.watch, args.interval)
    print(_start_store_server(config["storage"], args))
    print(f"serving {len(deployments)} deployments ({', '.join(d.name for d in deployments)}) with defaults from {config_path}"
          + (f"; scanning {args.watch} every {args.interval} s" if args.watch else "") + " (Ctrl-C stops)")
    serve(*deployments)
    return 0


def _start_store_server(storage: str, args) -> str:
    """`loraflow serve`'s store server (a thread of this process), and LORAFLOW_STORE_URL for the runs it starts (they
    inherit this environment), so their artifact links open in the UI. Returns the line that says so."""
    if os.environ.get(STORE_URL_SETTING):
        return f"store links: {os.environ[STORE_URL_SETTING]} ({STORE_URL_SETTING} is set; no store server started here)"
    if args.no_store_server:
        return "store server off (--no-store-server): links to store files are file:// paths to copy"
    if "://" in storage and not storage.startswith("file://"):
        return f"store server not started: {storage} is not a local store (its links open the object store's own view)"

    _, url = start_in_thread([storage], args.store_host, args.store_port)
    os.environ[STORE_URL_SETTING] = url
    note = exposure_note(args.store_host)
    return (f"serving the store {StoreRoot(storage).path} read-only at {url}/ (artifact links open there; --no-store-server turns it off)"
            + (f"\n{note}" if note else ""))


def cmd_store_serve(args) -> int:
    """Serve local artifact stores read-only over HTTP until Ctrl-C."""
    for store in args.stores:
        if not os.path.isdir(StoreRoot(store).path):
            raise LoraflowError(f"{store}: no such folder (give the `storage:` folder of your config)")
    server = make_server(args.stores, args.host, args.port)
    url = server_url(server)
    print(f"serving {', '.join(StoreRoot(store).path for store in args.stores)} read-only at {url}/ (Ctrl-C stops)\n"
          f"for artifact links that open there, start runs and workers with {STORE_URL_SETTING}={url}")
    if note := exposure_note(args.host):
        print(note)
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_watch(args) -> int:
    """Scan the prefix now and then every --interval seconds, emitting loraflow.dataset.* events."""
    import time

    _require_server()
    from flows.watch import emit_upload_events

    while True:
        emit_upload_events(args.prefix, args.storage, print)
        if args.once:
            return 0
        time.sleep(args.interval)


def cmd_artifacts(args) -> int:
    """A run's summary and output URIs: from the store when --storage is given, else from Prefect by flow-run name or run id."""
    if args.storage:
        store = ArtifactStore(args.storage)
        run_uri = store.uri("runs", args.run)
        try:
            print(store.read_text(f"{run_uri}/summary.md"))
        except FileNotFoundError:
            raise LoraflowError(f"{run_uri}: no summary.md; is {args.run!r} a run in {args.storage}? (see `loraflow runs`)") from None
        return 0
    from tasks.runs import recent_runs

    start_temporary_server()
    for row in recent_runs(limit=200):
        if args.run in (row["flow_run"], row["run"], row["flow_run_id"]):
            if row["summary_markdown"] is None:
                raise LoraflowError(f"flow run {row['flow_run']} ({row['state']}) published no summary; it did not finish")
            print(row["summary_markdown"])
            return 0
    raise LoraflowError(f"no loraflow run or flow run named {args.run!r} in this Prefect database (PREFECT_HOME); "
                        "pass --storage URL to read a run folder from the store")


def cmd_generate(args) -> int:
    """Stream the run's answers to --prompt (or each line of --prompts-file)."""
    from transformers.utils import logging as transformers_logging

    from loraflow.generate import generate

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the answer
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise LoraflowError(f"{args.prompts_file}: cannot read the prompts file ({error.strerror})") from None
    if not prompts:
        raise LoraflowError("nothing to generate: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt a line)")
    # One load of the model for every prompt; a wrong run id fails before anything is printed.
    generate(args.storage, args.run, prompts, args.max_new_tokens, args.merged, args.trust_remote_code,
             on_text=lambda text: print(text, end="", flush=True), on_prompt=lambda prompt: print(f"\n>>> {prompt}\n", flush=True),
             log=lambda line: print(line, flush=True))
    return 0


def cmd_compare(args) -> int:
    """Two or more runs of a store side by side: the settings that differ, the results, the loss curves overlaid."""
    if len(set(args.runs)) < 2:
        raise LoraflowError("compare needs two different runs or more (run ids, as `loraflow du --storage …` lists them)")
    store = ArtifactStore(args.storage)
    if "://" not in store.url and not Path(store.url).is_dir():
        raise LoraflowError(f"--storage {args.storage}: no store there (the folder does not exist)")
    runs = [read_run(store, run) for run in dict.fromkeys(args.runs)]
    markdown = comparison_markdown(runs)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(markdown + "\n![loss curves](loss-curves.png)\n")
        (out / "loss-curves.png").write_bytes(loss_curves_png(runs))
        print(f"written: {out / 'compare.md'}, {out / 'loss-curves.png'}")
    if os.environ.get("PREFECT_API_URL"):  # a running server: the comparison on its Artifacts page too
        from flows.compare import publish_comparison

        key = f"compare-{sha256_hex(store.url, sorted(args.runs))[:8]}"
        publish_comparison(comparison_artifact(runs), key=key, description=f"runs compared: {', '.join(args.runs)}")
        print(f"published in the Prefect UI as the artifact {key}")
    else:
        print("(not published as a Prefect artifact: PREFECT_API_URL names no server)")
    return 0


def cmd_runs(args) -> int:
    from tasks.runs import FINETUNE_FLOWS, recent_runs

    start_temporary_server()
    rows = recent_runs(limit=args.limit)
    if not rows:
        print(f"no fine-tune flow runs ({', '.join(FINETUNE_FLOWS)}) in this Prefect database (PREFECT_HOME)")
        return 0
    width = max(len("flow run"), *(len(row["flow_run"]) for row in rows))
    print(f"{'flow run':<{width}} {'state':<10} {'started':<17} {'run':<28} result")
    for row in rows:
        print(f"{row['flow_run']:<{width}} {row['state']:<10} {row['started']:<17} {row['run']:<28} {row['result']}")
    return 0


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def cmd_du(args) -> int:
    import time


    store = ArtifactStore(args.storage)
    parts, runs = usage(store)
    print(f"{store.url}: {_size(sum(row[1] for row in parts))} in {sum(row[2] for row in parts)} files\n")
    print(f"  {'part':<18} {'size':>10} {'files':>7} {'committed':>10}")
    for part, size, files, committed in parts:
        print(f"  {part:<18} {_size(size):>10} {files:>7} {committed:>10}")
    if runs:
        print(f"\n  {'run':<34} {'size':>10} {'checkpoints':>12}  last write")
        for run, size, checkpoints, newest in runs[:args.limit]:
            print(f"  {run:<34} {_size(size):>10} {_size(checkpoints):>12}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(newest))}")
        if len(runs) > args.limit:
            print(f"  … and {len(runs) - args.limit} smaller runs (--limit)")
    return 0


def _deployment_defaults(store_url: str) -> tuple[dict[str, str], list]:
    """What deployments' default parameters use: (paths or URLs inside the store → which deployment, the default
    fine-tune configs). From deployments/prefect.yaml and, when a Prefect server is configured, every deployment on it.
    Relative paths in them resolve against the checkout, as a deployment's runs (working directory: the checkout) do."""
    import yaml


    found: dict[str, str] = {}
    configs: list[DefaultConfig] = []
    checkout = DEPLOYMENTS_YAML.parents[1]

    def collect(value, owner: str, entrypoint: str) -> None:
        if isinstance(value, dict):
            data = value.get("data")
            if isinstance(value.get("name"), str) and "model" in value and isinstance(data, dict) and data.get("path"):
                path = str(data["path"])  # a fine-tune config: its runs are name-<key>, trained on data.path
                path = path if "://" in path else os.path.normpath(checkout / path)
                configs.append(DefaultConfig(owner, value["name"], path, sweep=entrypoint.startswith("flows/sweep.py")))
            for item in value.values():
                collect(item, owner, entrypoint)
        elif isinstance(value, list):
            for item in value:
                collect(item, owner, entrypoint)
        elif isinstance(value, str) and value.rstrip("/").startswith(store_url + "/"):
            found[value.rstrip("/")] = f"deployment {owner}'s default parameters use it"

    for entry in yaml.safe_load(DEPLOYMENTS_YAML.read_text())["deployments"]:
        collect(entry.get("parameters") or {}, entry["name"], entry.get("entrypoint") or "")
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                for deployment in client.read_deployments():
                    collect(deployment.parameters, deployment.name, deployment.entrypoint or "")
        except Exception as error:  # httpx/network errors, of several types
            raise LoraflowError(f"cannot read the deployments from the Prefect server at {PREFECT_API_URL.value()} "
                                f"({type(error).__name__}); gc would not know which outputs their defaults use") from None
    return found, configs


def cmd_gc(args) -> int:
    store = ArtifactStore(args.storage)
    protected, defaults = _deployment_defaults(store.url)
    removable, notes = plan(store, args.older_than, args.grace_hours, protected, defaults=defaults)
    total = sum(item.size for item in removable)
    if not removable:
        print(f"{store.url}: nothing to remove")
    else:
        verb = "removing" if args.apply else "would remove (a dry run: add --apply to remove)"
        print(f"{store.url}: {verb} {len(removable)} items, {_size(total)}")
        for item in removable:
            print(f"  {_size(item.size):>10}  {item.uri} — {item.reason}")
    for note in notes:
        print(f"  {note}")
    if args.apply and removable:
        print(f"freed {_size(apply(store, removable))}")
    return 0


def cmd_plan(args) -> int:
    """The training footprint of a config, estimated from the model's config alone: nothing is loaded or run."""
    from loraflow.models import native
    from loraflow.plan import check_fits, choose_precision, context_warning, estimate_memory, free_memory_bytes

    config = load_config(args.config, args.set or [])
    part = backend(config.model.backend)
    device = part.training_device(config, {})  # (the ipex-llm backend's own environment decides the device and format)
    quantization = part.describe_quantization(config, device)
    precision, why = choose_precision(config.train.precision, device)
    estimate = estimate_memory(config, native.resolve_model_path(config.model.base), precision)
    print(f"{config.model.base} on {device} ({precision}: {why}), {config.lora.method} adapter, quantization {quantization}:")
    print("\n".join(estimate.lines()))
    fits, said = check_fits(estimate, device, free_memory_bytes(device))
    print(said if not fits else f"fits: {said} (the estimate is a lower bound: the process itself adds about 170 MiB on a "
                                 "CPU, and activations can take twice the estimate; bench/memory.py)")
    if beyond := context_warning(estimate):
        print(f"warning: {beyond}")
    return 0 if fits else 1


def cmd_doctor(args) -> int:
    from loraflow.envcheck import describe_environment

    report = describe_environment()
    for part in BACKENDS.values():  # a backend's own environment (the ipex-llm backend's), where there is one
        if (environment := part.environment_report()) is not None:
            report[f"{part.name.replace('-', '_')}_environment"] = environment
    print(json.dumps(report, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="loraflow", description="QLoRA/LoRA fine-tuning as cached, retryable Prefect stages")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a fine-tune (the SFT flow, or the DPO flow for objective: dpo) for a config file")
    run.add_argument("config", help="YAML config (see examples/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set train.learning_rate=1e-4")
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser("sweep", help="fine-tune every combination of --grid values (or an Optuna --search) on one "
                                "config, sharing data and base; the variants ranked")
    sweep.add_argument("config", help="YAML config: the base every variant changes")
    sweep.add_argument("--grid", action="append", metavar="KEY=[V1,V2]", help="a setting and its values, e.g. --grid lora.r=[8,16] (repeatable)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the base config")
    sweep.add_argument("--metric", default="eval_loss", help="what ranks the variants (default eval_loss; an evaluation metric such as rouge_l_after)")
    sweep.add_argument("--higher-is-better", action="store_true", help="rank the metric's highest first (exact match, ROUGE-L)")
    sweep.add_argument("--search", action="append", metavar="KEY=VALUES",
                       help="instead of --grid, an Optuna search over a setting's values ([8,16,32]) or range "
                       "('{low: 1e-5, high: 1e-3, log: true}') (repeatable)")
    sweep.add_argument("--trials", type=int, default=8, help="with --search: the variants it tries (default 8)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="variants run at once (needs train.pool; the pool's concurrency limit caps the training jobs)")
    sweep.set_defaults(handler=cmd_sweep)

    demo = commands.add_parser("demo", help="build a small model and fine-tune it on the embedded sample data")
    demo.add_argument("--workdir", default="loraflow-demo", help="where the model, store and Prefect database go")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.set_defaults(handler=cmd_demo)

    build = commands.add_parser("build-model", help="build a small random-weight Llama model + tokenizer trained on a dataset")
    build.add_argument("out", help="the model folder to write (config, safetensors weights, tokenizer)")
    build.add_argument("--data", default=str(SAMPLE_DATA), help="rows whose text trains the BPE tokenizer (default: the embedded Alpaca sample)")
    build.add_argument("--vocab-size", type=int, default=2048, help="tokenizer and embedding size (default 2048)")
    build.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128: about 0.8M parameters with 2 layers)")
    build.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    build.set_defaults(handler=cmd_build_model)

    artifacts = commands.add_parser("artifacts", help="print a run's summary and output URIs")
    artifacts.add_argument("run", help="run id (e.g. demo-17182e7ab5d2), flow-run name or flow-run id")
    artifacts.add_argument("--storage", help="read the run folder from this artifact store instead of Prefect")
    artifacts.set_defaults(handler=cmd_artifacts)

    gen = commands.add_parser("generate", help="try a fine-tune: its template, base + adapter (or the merged model), streamed output")
    gen.add_argument("run", help="run id in the store (e.g. demo-17182e7ab5d2: see `loraflow runs` or the run's summary)")
    gen.add_argument("--storage", required=True, help="the artifact store the run is in")
    gen.add_argument("--prompt", action="append", help="a user message (repeatable)")
    gen.add_argument("--prompts-file", help="a text file with one prompt a line")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--merged", action="store_true", help="use the merged model instead of base + adapter")
    gen.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code to run (never taken from the store)")
    gen.set_defaults(handler=cmd_generate)

    compare = commands.add_parser("compare", help="runs side by side: the settings that differ, eval loss before/after, speed, memory, loss curves")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run ids in the store (e.g. demo-17182e7ab5d2), two or more")
    compare.add_argument("--storage", required=True, help="the artifact store the runs are in")
    compare.add_argument("--out", metavar="DIR", help="also write compare.md and loss-curves.png (every run's curves overlaid) there")
    compare.set_defaults(handler=cmd_compare)

    runs = commands.add_parser("runs", help="list recent fine-tunes with their state and final loss")
    runs.add_argument("--limit", type=int, default=20)
    runs.set_defaults(handler=cmd_runs)

    serve = commands.add_parser("serve", help="serve the SFT and DPO (with their upload triggers), align, training, merge and watcher deployments from this process (needs a running Prefect server: PREFECT_API_URL)")
    serve.add_argument("--config", help="YAML config whose values become the deployments' defaults (default: the demo's)")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE")
    serve.add_argument("--workdir", default="loraflow-demo", help="where the demo model and config live when --config is not given")
    serve.add_argument("--watch", metavar="PREFIX", help="also scan this folder or fsspec prefix for new datasets on a schedule")
    serve.add_argument("--interval", type=int, default=60, help="seconds between scans with --watch")

    serve.add_argument("--store-port", type=int, default=DEFAULT_PORT, help="port of the store server it starts for the "
                       f"config's local store, so artifact links open (default {DEFAULT_PORT}; 0: a free one); not started "
                       "when LORAFLOW_STORE_URL is set")
    serve.add_argument("--store-host", default=DEFAULT_HOST, help=f"address the store server listens on (default {DEFAULT_HOST})")
    serve.add_argument("--no-store-server", action="store_true", help="start no store server (links stay file:// paths to copy)")
    serve.set_defaults(handler=cmd_serve)

    store = commands.add_parser("store", help="the artifact store: `store serve` serves local stores read-only over HTTP")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    store_serve = store_commands.add_parser("serve", help="serve local artifact stores read-only over HTTP (folder listings, "
                                            "markdown, JSON, PNG, downloads), so the UI's links open; see LORAFLOW_STORE_URL")
    store_serve.add_argument("stores", nargs="+", metavar="STORE", help="a local store folder (the config's storage:)")
    store_serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    store_serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    store_serve.set_defaults(handler=cmd_store_serve)

    watch = commands.add_parser("watch", help="scan a folder or bucket prefix for new dataset files and emit upload events")
    watch.add_argument("prefix", help="a local folder or fsspec URL (s3://bucket/incoming)")
    watch.add_argument("--storage", required=True, help="artifact store where the watcher remembers what it has seen")
    watch.add_argument("--interval", type=float, default=30, help="seconds between scans (default 30); it scans until Ctrl-C")
    watch.add_argument("--once", action="store_true", help="scan once and exit")
    watch.set_defaults(handler=cmd_watch)

    du = commands.add_parser("du", help="what each part of an artifact store holds, and the largest runs")
    du.add_argument("--storage", required=True, help="the artifact store (a folder or fsspec URL)")
    du.add_argument("--limit", type=int, default=20, help="runs to list (largest first)")
    du.set_defaults(handler=cmd_du)

    gc = commands.add_parser("gc", help="remove leftovers, superseded checkpoints and (with --older-than) old runs; a dry run unless --apply")
    gc.add_argument("--storage", required=True, help="the artifact store (a folder or fsspec URL)")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove runs not written for DAYS days, and the "
                    "datasets, quantized bases, LoRA inits and reference log-probs no remaining run uses")
    gc.add_argument("--grace-hours", type=float, default=6.0, help="uncommitted folders younger than this are kept (default 6)")
    gc.add_argument("--apply", action="store_true", help="remove what the dry run lists")
    gc.set_defaults(handler=cmd_gc)

    plan = commands.add_parser("plan", help="estimate a config's training memory (weights, adapter, gradients, optimizer, "
                               "activations) from the model's config alone, against this device's free memory")
    plan.add_argument("config", help="YAML config")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    plan.set_defaults(handler=cmd_plan)
    doctor = commands.add_parser("doctor", help="print what this machine offers (devices, versions, launchers)")
    doctor.set_defaults(handler=cmd_doctor)
    return root


def main(argv: list[str] | None = None) -> int:
    """The `loraflow` command (argv None) or a call with its arguments (tests)."""
    code = _main(argv)
    if argv is None:
        # The interpreter's teardown of torch, transformers and Prefect took 1.7 s after the last line; Prefect sends its
        # last logs and events in the exit handlers, which run first.
        process.exit_now(code, run_exit_handlers=True)
    return code


def _main(argv: list[str] | None) -> int:
    _quiet_libraries()
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except LoraflowError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        # A command given --storage that cannot reach it (du, gc, artifacts, generate, watch): the same one-line
        # message `loraflow run` gives, naming the store and what was read; anything else keeps its traceback.

        failure = remote_failure(error, args.storage, "--storage") if getattr(args, "storage", None) else None
        if failure is None:
            raise
        print(f"\nerror: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Stage logic behind the Prefect tasks: content keys, reuse of committed outputs, build-then-commit.

Every stage follows one contract. Its key hashes the stage name, its version constant, the keys of
the upstream records and the config fields it reads: never paths or run ids. Its output lives at a
URI derived from that key; if the folder's manifest is there, the stage returns the recorded result
without recomputing (even with a cold Prefect database). Otherwise it builds into a local temporary
folder and commits it: files first, manifest last.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from loraflow import adapters
from loraflow.adapters.targets import describe_targets
from loraflow.backends import LOW_BIT_FORMATS, backend
from loraflow import export as export_stage
from loraflow import merge as merge_stage
from loraflow.config import FinetuneConfig
from loraflow.data.formats import read_rows
from loraflow.data.shapes import resolve_data
from loraflow.data.tokenize import load_tokenizer
from loraflow.envcheck import check_environment
from loraflow.errors import LoraflowError
from loraflow.evaluate import evaluate_adapter
from loraflow.launch import Topology, build_command, deepspeed_config, run_streaming, write_hostfile
from loraflow.lease import build_once
from loraflow.objectives import objective_of
from loraflow.models import native
from loraflow.plan import rows_used
from loraflow.registry import ADAPTER, BASE, DATASET, ENV, EVALUATION, LORA, MERGED, REFERENCE, RUNS_FOLDER, SOURCES, TRAIN, Records
from loraflow.spec import RunSpec
from loraflow.storage import ArtifactStore, StageRecord, hash_uri, remote_failure, sha256_hex
from loraflow.train import USER_ERROR_EXIT, compute_reference_logps

Log = Callable[[str], None]


def _short(key: str) -> str:
    return key[:16]


def _hold_for_test() -> None:
    """Tests: the build lasts LORAFLOW_TEST_SLOW_SECONDS, or, with LORAFLOW_TEST_HOLD_UNTIL set, until that file exists
    (at most 5 minutes): a test that needs other runs to meet this build in progress releases it when they have."""
    release = os.environ.get("LORAFLOW_TEST_HOLD_UNTIL")
    deadline = time.monotonic() + (300 if release else float(os.environ.get("LORAFLOW_TEST_SLOW_SECONDS", 8)))
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.2)


def reuse_or_build(store: ArtifactStore, stage: str, key: str, uri: str, build: Callable[[Path], dict], log: Log) -> StageRecord:
    """The committed output at `uri`, built first if absent: by exactly one process of all that share the store
    (the others wait for it and reuse it; see loraflow.lease)."""
    with build_once(store, f"{stage}-{_short(key)}", lambda: store.is_committed(uri), log) as must_build:
        if must_build:
            if stage == os.environ.get("LORAFLOW_TEST_SLOW_STAGE"):  # tests: a build as long as a real base's
                _hold_for_test()
            with tempfile.TemporaryDirectory(prefix=f"loraflow-{stage}-") as tmp:
                metrics = build(Path(tmp))
                store.commit(tmp, uri, {"stage": stage, "key": key, "metrics": metrics})
            log(f"{stage}: committed {uri}")
            return StageRecord(stage=stage, key=key, uri=uri, metrics=metrics)
    log(f"{stage}: reusing committed output {uri}")
    store.mark_used(uri)
    return StageRecord(stage=stage, key=key, uri=uri, metrics=store.manifest(uri).get("metrics", {}), reused=True)


# ---- env + sources ----------------------------------------------------------------------------
def env_check(config: FinetuneConfig) -> StageRecord:
    report = check_environment(config)
    ArtifactStore(config.storage).probe()  # unreachable or read-only: said now, naming `storage`
    return StageRecord(stage=ENV.name, key=sha256_hex(report), metrics=report)


def inspect_sources(config: FinetuneConfig) -> StageRecord:
    """Content identities of the inputs: the dataset's bytes, the base model's weights, its tokenizer."""
    model_path = native.resolve_model_path(config.model.base)
    data_uri = config.data.path
    try:
        dataset_sha256 = hash_uri(data_uri)
    except FileNotFoundError as error:
        raise remote_failure(error, data_uri, "data.path") or LoraflowError(f"{data_uri}: dataset file not found; check data.path") from None
    except IsADirectoryError:
        raise LoraflowError(f"{data_uri}: this is a folder; data.path names one dataset file (.json, .jsonl or .parquet)") from None
    except Exception as error:  # a remote store's failures, whatever their type
        raise remote_failure(error, data_uri, "data.path") or error from None
    metrics = {
        "dataset_uri": data_uri,
        "dataset_sha256": dataset_sha256,
        "model_path": str(model_path),
        "model_key": sha256_hex(native.model_fingerprint(model_path)),
    }
    # Checked on the architecture alone (meta device), before any stage reads weights.
    metrics["lora_targets"] = native.targets_without_weights(model_path, config.lora, config.model.trust_remote_code)
    tokenizer = native.tokenizer_identity(model_path)
    metrics.update(tokenizer_key=sha256_hex(tokenizer), tokenizer_class=tokenizer["class"], tokenizer_size=tokenizer["size"],
                   model_vocab_size=native.config_vocab_size(model_path))
    # The file's shape, decided once per run here (before any heavy work): every later stage reads the resolved
    # data.format / data.template through with_data_shape.
    resolved = resolve_data(config.data, config.objective, read_rows(data_uri))
    metrics.update(data_format=resolved.format, data_template=resolved.template)
    return StageRecord(stage=SOURCES.name, key=sha256_hex(metrics["dataset_sha256"], metrics["model_key"], metrics["tokenizer_key"]), metrics=metrics)


def with_data_shape(config: FinetuneConfig, sources: StageRecord) -> FinetuneConfig:
    """The config as the sources stage read its data: data.format and data.template resolved from the file's shape
    (auto replaced; a set value kept, checked against the file). What every later stage, key and report sees."""
    if "data_format" not in sources.metrics:  # (a record written before shapes were resolved here: the config as it is)
        return config
    resolved = {"format": sources.metrics["data_format"], "template": sources.metrics["data_template"]}
    return config.model_copy(update={"data": config.data.model_copy(update=resolved)})


def check_token_ids(dataset: StageRecord, sources: StageRecord) -> None:
    """Every token id of the tokenized data, and the pad id, index the model's embeddings: a tokenizer that
    does not match the model fails here, before quantization, instead of deep in the first forward pass."""
    vocab = sources.metrics.get("model_vocab_size")
    if not vocab:
        return
    tokenizer = f"the tokenizer ({sources.metrics.get('tokenizer_class')}, {sources.metrics.get('tokenizer_size')} tokens)"
    where = f"{sources.metrics['model_path']}/config.json"
    # (data.new_tokens have ids past the vocabulary until the lora stage grows the embeddings to fit them)
    limit = max([vocab - 1, *dataset.metrics.get("new_token_ids", {}).values()]) + 1
    for what, token_id in (("token id", dataset.metrics.get("max_token_id")), ("pad token id", dataset.metrics.get("pad_token_id"))):
        if token_id is not None and token_id >= limit:
            raise LoraflowError(
                f"{what} {token_id} in the tokenized data ({dataset.uri}) is outside the model's vocabulary of {vocab} "
                f"(vocab_size in {where}): {tokenizer} does not belong to this model; use the model's own tokenizer files"
            )


# ---- keys ---------------------------------------------------------------------------------------
def dataset_key(config: FinetuneConfig, sources: StageRecord) -> str:
    # (the data as the sources stage resolved it: the same key whether or not the caller's config still says auto)
    fields = with_data_shape(config, sources).data.model_dump(exclude={"path"}) | objective_of(config).dataset_fields(config)
    return DATASET.key(sources.metrics["dataset_sha256"], sources.metrics["tokenizer_key"], fields)


def quantize_key(config: FinetuneConfig, env: StageRecord, sources: StageRecord) -> str:
    fields = backend(config.model.backend).quantize_key_fields(config, env)
    return BASE.key(sources.metrics["model_key"], fields, env.metrics["precision"])


def lora_key(config: FinetuneConfig, base: StageRecord) -> str:
    # (new tokens grow the embeddings the adapter trains; a key without them stays what it was)
    grown = [{"new_tokens": config.data.new_tokens}] if config.data.new_tokens else []
    return LORA.key(base.key, config.lora.model_dump(), config.train.seed, *grown)


def training_fields(config: FinetuneConfig) -> dict:
    """What training computes from, beyond its data and starting adapter: the one list of it (the train key and a
    pool job's identity read it). Where and how patiently it runs, and where it reports, do not change what it computes."""
    fields = config.train.model_dump(exclude={"pool", "device", "retries", "timeout_s", "master_port", "mpi", "report_to"})
    return fields | objective_of(config).training_fields(config)


def train_key(config: FinetuneConfig, records: Records) -> str:
    dataset, lora, env = records[DATASET.name], records[LORA.name], records[ENV.name]
    return TRAIN.key(dataset.key, lora.key, training_fields(config), env.metrics["device"], env.metrics["precision"])


def reference_key(config: FinetuneConfig, records: Records) -> str:
    dataset, base, lora, env = (records[stage.name] for stage in (DATASET, BASE, LORA, ENV))
    # The pairs (their template and lengths are in dataset.key) and which of them training reaches, the frozen weights,
    # the starting adapter, the arithmetic. A rerun that changes only beta, the loss or the schedule shares it.
    train_rows = dataset.metrics["train_rows"]
    used = rows_used(train_rows, config.train)
    reached = [] if used == train_rows else [used, config.train.seed]  # (all rows: the key it always had)
    return REFERENCE.key(dataset.key, base.key, lora.key, env.metrics["device"], env.metrics["precision"], *reached)


def run_uri(store: ArtifactStore, config: FinetuneConfig, train_key_: str) -> str:
    return store.uri(RUNS_FOLDER, f"{config.name}-{train_key_[:12]}")


# ---- stages -------------------------------------------------------------------------------------
def prepare_data(config: FinetuneConfig, sources: StageRecord, log: Log = print) -> StageRecord:
    config = with_data_shape(config, sources)
    store = ArtifactStore(config.storage)
    key = dataset_key(config, sources)
    def build(out: Path) -> dict:
        return objective_of(config).prepare_dataset(config, sources.metrics["model_path"], out, log)

    return reuse_or_build(store, DATASET.name, key, DATASET.uri(store, key), build, log)


def quantize_base(config: FinetuneConfig, env: StageRecord, sources: StageRecord, log: Log = print) -> StageRecord:
    store = ArtifactStore(config.storage)
    key = quantize_key(config, env, sources)
    if config.model.quantization == "none":
        log("quantization none: training plain LoRA on the original base")
        return StageRecord(stage=BASE.name, key=key, uri=sources.metrics["model_path"], metrics={"quantization": "none", "in_store": False})

    def build(out: Path) -> dict:
        return backend(config.model.backend).quantize(config, env, sources, out, log)

    return reuse_or_build(store, BASE.name, key, BASE.uri(store, key), build, log)


def start_from_adapter(config: FinetuneConfig) -> tuple[str, dict, dict]:
    """dpo.start_from's adapter: (its URI, manifest, adapter_config.json), checked before any stage runs (a wrong name,
    another store, another base, or a method DPO cannot train)."""
    store = ArtifactStore(config.storage)
    start = config.dpo.start_from.rstrip("/")
    uri = start if "/" in start else store.uri(RUNS_FOLDER, start, ADAPTER.folder)
    if "://" not in store.url:  # a local store: the summary's file:// link and a path relative to here name it too
        uri = str(Path(uri.removeprefix("file://")).resolve()) if "/" in start else uri
    if store.manifest(uri) is None and store.manifest(f"{uri}/{ADAPTER.folder}") is not None:
        uri = f"{uri}/{ADAPTER.folder}"  # a run's folder: its adapter
    if not uri.startswith(store.url + "/"):
        raise LoraflowError(f"dpo.start_from {start!r} is outside this store ({store.url}); name a run of this store, or "
                            "set storage to the store that run is in")
    manifest = store.manifest(uri)
    if manifest is None:
        raise LoraflowError(f"dpo.start_from {start!r}: no committed adapter at {uri}; name an SFT run of this store "
                            "(see `loraflow runs`) or its adapter folder")
    adapter_config = json.loads((store.local_copy(uri, verify=True) / "adapter_config.json").read_text())
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on and Path(trained_on).name != Path(config.model.base).name and trained_on != config.model.base:
        raise LoraflowError(f"dpo.start_from {start!r}: that adapter was trained on {trained_on}, not on model.base {config.model.base}")
    method = adapters.saved_method(adapter_config)
    if method is None or config.objective not in method.objectives:
        what = f"{method.name} ({method.trains})" if method else f"a {adapter_config.get('peft_type')} adapter"
        able = adapters.for_objective(config.objective)
        raise LoraflowError(f"dpo.start_from {start!r}: that adapter is {what}, and TRL's DPOTrainer trains {adapters.titles(able)} "
                            f"adapters: start from an SFT run with lora.method {adapters.choices(able)}, or leave dpo.start_from empty")
    return uri, manifest, adapter_config


def describe_saved_adapter(adapter_config: dict) -> str:
    """A saved adapter in a few words, as the logs and the summary name a configured one (its method's settings' describe)."""
    return adapters.describe_saved(adapter_config)


def starting_adapter(config: FinetuneConfig, sources: StageRecord, log: Log = print) -> StageRecord:
    """DPO from an SFT run (`dpo.start_from`): that run's exported adapter as the starting point, in place of a fresh
    LoRA init. Its key is the adapter's content (manifest sha256), so the runs and reference log-probs built on it
    change when it does."""
    store = ArtifactStore(config.storage)
    uri, manifest, adapter_config = start_from_adapter(config)
    description = describe_saved_adapter(adapter_config)
    log(f"starting from the adapter {uri} ({description}); the lora section does not apply")
    trained_config = store.local_copy(uri) / "loraflow_config.json"
    if trained_config.exists():
        earlier = json.loads(trained_config.read_text()).get("data", {}).get("template")
        if earlier and earlier != config.data.template:
            log(f"warning: that adapter was trained with template {earlier!r}, this run formats pairs with {config.data.template!r} "
                f"(unless the tokenizer has a chat template of its own); set data.template: {earlier} to keep the format it learned")
    return StageRecord(stage=LORA.name, key=LORA.key("start-from", manifest["sha256"]), uri=uri, reused=True,
                       metrics={"start_from": uri, "method": adapters.saved_method(adapter_config).name, "description": description,
                                "r": adapter_config.get("r"), "target_modules": sorted(adapter_config.get("target_modules") or [])})


def initial_adapter(config: FinetuneConfig, env: StageRecord, sources: StageRecord, base: StageRecord, log: Log = print) -> StageRecord:
    """The lora stage: the adapter training starts from, a fresh LoRA init or (DPO with start_from) an SFT run's."""
    if config.starts_from_an_adapter:
        return starting_adapter(config, sources, log)
    return inject_adapter(config, env, sources, base, log)


def lora_cache_key(config: FinetuneConfig, base: StageRecord) -> str | None:
    """The lora stage's Prefect cache key; None (not cached by Prefect) for a start_from adapter, whose key is the
    adapter's content and is only known by reading it."""
    if config.starts_from_an_adapter:
        return None
    return LORA.cache_key(lora_key(config, base))


def _base_dir(store: ArtifactStore, base: StageRecord) -> Path:
    return store.local_copy(base.uri) if base.metrics.get("in_store") else Path(base.uri)


def inject_adapter(config: FinetuneConfig, env: StageRecord, sources: StageRecord, base: StageRecord, log: Log = print) -> StageRecord:
    """A fresh adapter of lora.method on the base, saved as a PEFT folder: what training starts from."""
    store = ArtifactStore(config.storage)
    key = lora_key(config, base)

    def build(out: Path) -> dict:
        part = backend(config.model.backend)
        report = part.init_adapter(config, env, sources, _base_dir(store, base), base.metrics["in_store"],
                                   lambda: load_tokenizer(sources.metrics["model_path"], config.data.new_tokens), out, log)
        layers = part.adapter_layers_note
        log(f"{config.lora.describe(describe_targets(report['target_modules']))}{layers}: {report['trainable_params']:,} "
            f"trainable of {report['total_params']:,} parameters ({report['trainable_percent']}%)")
        return report

    return reuse_or_build(store, LORA.name, key, LORA.uri(store, key), build, log)


def train_spec(config: FinetuneConfig, records: Records) -> tuple[str, str, RunSpec]:
    """(key, run URI, spec) for the training subprocess, from the train stage's input records (a reference record:
    training reads its log-probs instead of running the reference)."""
    records = TRAIN.inputs_from(records)
    env, dataset, base, lora = (records[stage.name] for stage in (ENV, DATASET, BASE, LORA))
    reference = records.get(REFERENCE.name)
    store = ArtifactStore(config.storage)
    key = train_key(config, records)
    run = run_uri(store, config, key)
    spec = RunSpec(
        objective=config.objective,
        store=config.storage,
        run_uri=run,
        dataset_uri=dataset.uri,
        base_uri=base.uri,
        base_in_store=bool(base.metrics.get("in_store")),
        quantized=base.metrics.get("quantization") in LOW_BIT_FORMATS,
        backend=config.model.backend,
        lora_uri=lora.uri,
        adapter_method=lora.metrics.get("method", config.lora.method),  # (dpo.start_from's adapter: its own method)
        train=config.train.model_copy(update={"device": env.metrics["device"], "precision": env.metrics["precision"]}),
        precision_reason=env.metrics.get("precision_reason", ""),
        **objective_of(config).spec_fields(config),
        reference_uri=reference.uri if reference is not None else "",
        ddp_backend=backend(config.model.backend).ddp_backend(env.metrics["device"]) if Topology.from_train(config.train).world_size > 1 else None,
        deepspeed_config=deepspeed_config(config.train.deepspeed_zero, config.train.deepspeed_offload_optimizer),
        # No trust_remote_code here: the spec is a file in the shared store (see launch.build_command).
    )
    return key, run, spec


def reference_logps(config: FinetuneConfig, records: Records, log: Log = print) -> StageRecord:
    """DPO's reference log-probs of every pair (the frozen base with the starting adapter), computed once and kept
    in the store: training, its retries and every rerun that changes only beta, the loss or the schedule read them
    instead of running the reference model."""
    store = ArtifactStore(config.storage)
    records = REFERENCE.inputs_from(records)
    key = reference_key(config, records)

    def build(out: Path) -> dict:
        _, _, spec = train_spec(config, records)
        # One process here, whatever the training's launcher: no process group, no DeepSpeed engine.
        spec = spec.model_copy(update={"ddp_backend": None, "deepspeed_config": None})
        metrics = compute_reference_logps(spec, out, config.model.trust_remote_code, log)
        log(f"reference log-probs of {metrics['pairs']} pairs computed ({metrics['reference_forwards']} forward passes)")
        return metrics

    return reuse_or_build(store, REFERENCE.name, key, REFERENCE.uri(store, key), build, log)


def train(config: FinetuneConfig, records: Records, log: Log = print, on_line: Log = print) -> StageRecord:
    """The train stage: the committed adapter of this content if there is one, else write the run spec, launch
    `python -m loraflow.train` (local/torchrun/deepspeed/mpirun) and stream its lines to on_line.

    One trainer per run folder, even when a retry races a rerun of the same content: the other waits and reuses.
    """
    store = ArtifactStore(config.storage)
    key, run, spec = train_spec(config, records)
    final = f"{run}/{TRAIN.folder}"
    with build_once(store, f"{TRAIN.name}-{_short(key)}", lambda: store.is_committed(final), log) as must_train:
        if not must_train:
            log(f"train: reusing committed adapter {final}")
            return trained_record(store, key, run, reused=True)
        spec_uri = f"{run}/spec.json"
        store.write_json(spec_uri, spec.model_dump(mode="json"))
        topology = Topology.from_train(config.train)
        errors: list[str] = []

        def each_line(line: str) -> None:
            if line.startswith("error: "):
                errors.append(line.removeprefix("error: "))
            on_line(line)

        on_line(TRAINING_RUN_LINE.format(run=run.rsplit("/", 1)[-1], uri=run))
        with tempfile.TemporaryDirectory(prefix="loraflow-launch-") as scratch:
            command = build_command(topology, spec_uri, hostfile=write_hostfile(topology, Path(scratch)),
                                    python=backend(config.model.backend).trainer_python(),
                                    trust_remote_code=config.model.trust_remote_code)
            log(f"launching: {' '.join(command.argv)}")
            if topology.launcher == "torchrun" and topology.nnodes > 1:
                trust = " --trust-remote-code" if config.model.trust_remote_code else ""
                log(f"on each other host N of {topology.hosts}: python -m loraflow.launch {spec_uri} --node-rank N{trust}")
            code = run_streaming(command, each_line, timeout=config.train.timeout_s or None, spec_uri=spec_uri,
                                 forkable=topology.launcher == "local" and spec.deepspeed_config is None)
        if code == USER_ERROR_EXIT and errors:
            raise LoraflowError(errors[-1])  # a user error: not retried (tasks.common.retry_unless_user_error)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise RuntimeError(f"the training process {how} (its log is above); a retry resumes from the newest checkpoint in {run}/checkpoints")
        record = trained_record(store, key, run, reused=False)
        if record is None:
            raise LoraflowError(f"the training process exited cleanly but committed no adapter at {final}")
        return record


def evaluation(config: FinetuneConfig, env: StageRecord, base: StageRecord, adapter: StageRecord, log: Log = print) -> StageRecord:
    """Task metrics and the forgetting check (loraflow.evaluate), keyed by the adapter, the base, the evaluation files'
    contents and settings: changing a setting re-evaluates the run and never retrains it."""
    store = ArtifactStore(config.storage)
    settings = config.evaluation
    files = {}
    for name in ("tasks_path", "general_text_path"):
        if uri := getattr(settings, name):
            try:
                files[name] = hash_uri(uri)
            except (FileNotFoundError, IsADirectoryError):
                raise LoraflowError(f"{uri}: evaluation.{name} names no readable file") from None
    key = EVALUATION.key(adapter.key, base.key, settings.model_dump(exclude=set(files)), files, env.metrics["device"], env.metrics["precision"])
    run = adapter.uri.rsplit(f"/{ADAPTER.folder}", 1)[0]

    def build(out: Path) -> dict:
        base_dir = store.local_copy(base.uri, verify=True) if base.metrics.get("in_store") else Path(base.uri)
        data = config.data
        return evaluate_adapter(settings, base_dir, store.local_copy(adapter.uri, verify=True), data.format, data.template,
                                env.metrics["device"], env.metrics["precision"], out, config.model.trust_remote_code, log)

    return reuse_or_build(store, EVALUATION.name, key, f"{run}/{EVALUATION.folder}/{key[:16]}", build, log)


# The stages an objective adds before training (loraflow.objectives: `Objective.stages`), by name: (its logic, which
# takes the config, its input records (Stage.inputs) and a log; its content key from the config and those records).
# tasks/model.py makes each a cached task; the flows run the ones the config's objective names.
OBJECTIVE_STAGES: dict[str, tuple[Callable[[FinetuneConfig, Records, Log], StageRecord], Callable[[FinetuneConfig, Records], str]]] = {
    REFERENCE.name: (reference_logps, reference_key),
}


def objective_stages(config: FinetuneConfig) -> list:
    """The registry's stages this config's objective runs before training (DPO with a precomputed reference: reference)."""
    objective = objective_of(config)
    return [stage for stage in objective.stages if objective.runs_stage(stage, config)]


# The line that names a training run, first in its log: the progress display keys on it (tasks/train.py).
TRAINING_RUN_LINE = "training run {run}: {uri}"


def prepare_training(config: FinetuneConfig, log: Log = print) -> tuple[ArtifactStore, str, str, str]:
    """Every stage before training, without Prefect, and the run spec written: (store, train key, run URI, spec URI).

    For benchmarks and launcher tests, which start the training process themselves.
    """
    env = env_check(config)
    sources = inspect_sources(config)
    config = with_data_shape(config, sources)
    dataset = prepare_data(config, sources, log)
    base = quantize_base(config, env, sources, log)
    lora = initial_adapter(config, env, sources, base, log)
    records = {ENV.name: env, SOURCES.name: sources, DATASET.name: dataset, BASE.name: base, LORA.name: lora}
    for stage in objective_stages(config):
        records[stage.name] = OBJECTIVE_STAGES[stage.name][0](config, stage.inputs_from(records), log)
    key, run, spec = train_spec(config, records)
    store = ArtifactStore(config.storage)
    store.write_json(f"{run}/spec.json", spec.model_dump(mode="json"))
    return store, key, run, f"{run}/spec.json"


def trained_record(store: ArtifactStore, key: str, run: str, reused: bool) -> StageRecord | None:
    final = f"{run}/{TRAIN.folder}"
    if not store.is_committed(final):
        return None
    summary = store.read_json(f"{final}/train_summary.json")
    return StageRecord(stage=TRAIN.name, key=key, uri=final, metrics=summary, reused=reused)


def export(config: FinetuneConfig, dataset: StageRecord, trained: StageRecord, log: Log = print) -> StageRecord:
    store = ArtifactStore(config.storage)
    key = ADAPTER.key(trained.key, dataset.key, config.model.base)
    run = trained.uri.removesuffix("/" + TRAIN.folder)

    def build(out: Path) -> dict:
        return export_stage.export_adapter(
            store.local_copy(trained.uri), store.local_copy(dataset.uri) / "tokenizer", config.model.base,
            config.model_dump(mode="json"), out,
        )

    return reuse_or_build(store, ADAPTER.name, key, f"{run}/{ADAPTER.folder}", build, log)


def merge(config: FinetuneConfig, env: StageRecord, sources: StageRecord, dataset: StageRecord, adapter: StageRecord, log: Log = print) -> StageRecord:
    store = ArtifactStore(config.storage)
    device = env.metrics["device"]
    precision = config.merge.dtype if config.merge.dtype != "auto" else ("bf16" if device in ("xpu", "cuda") else "fp32")
    key = MERGED.key(adapter.key, precision, config.merge.check_rows)
    run = adapter.uri.rsplit(f"/{ADAPTER.folder}", 1)[0]

    def build(out: Path) -> dict:
        dataset_dir = store.local_copy(dataset.uri)
        split = dataset_dir / ("val.parquet" if (dataset_dir / "val.parquet").exists() else "train.parquet")
        table = pq.read_table(split).slice(0, config.merge.check_rows)
        # SFT rows are input_ids; DPO pairs are checked on prompt + chosen answer.
        rows = table.column("input_ids").to_pylist() if "input_ids" in table.column_names else \
            [p + c for p, c in zip(table.column("prompt_ids").to_pylist(), table.column("chosen_ids").to_pylist())]
        metrics = merge_stage.merge_adapter(Path(sources.metrics["model_path"]), store.local_copy(adapter.uri, verify=True), out, device, precision, rows, config.model.trust_remote_code)
        log(f"merged; max |logit difference| vs base+adapter {metrics['max_abs_logit_diff']:.3g} (allowed {metrics['tolerance']:.3g})")
        return metrics

    return reuse_or_build(store, MERGED.name, key, f"{run}/{MERGED.folder}", build, log)

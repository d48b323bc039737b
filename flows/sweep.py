"""A sweep of fine-tunes: one base config, a grid (or list) of variants, each variant a fine-tune run of its own.

Variants share every cached stage their settings leave alone (tokenization, the quantized base, the LoRA init when
only the training settings vary), run one after another here, or `parallel` at a time when they train on a work pool
(whose own concurrency limit, a Prefect work-pool limit, caps the training jobs on its devices), and a failed variant
does not stop the others. Running the sweep again retries only what failed:
the finished variants come back from the cache. The comparison artifact ranks the variants by a metric and names
the best. Instead of a grid, an Optuna search (a search space and a number of trials) picks each variant from the
results of the ones before it, on the same machinery.
"""

from __future__ import annotations

import math
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import finetune_flow, parameter_field
from flows.train import local_work_one_at_a_time
from loraflow.compare import comparison_artifact, read_run
from loraflow.objectives import AnyFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.registry import EVALUATION
from loraflow.report import run_uri_of
from loraflow.storage import ArtifactStore
from loraflow.sweep import describe, search_distributions, variant_configs, variant_overrides
from tasks.common import prepare_flow_process
from tasks.report import artifact_key

prepare_flow_process()


def sweep_run_name() -> str:
    from prefect.runtime import flow_run

    return f"{parameter_field(flow_run.parameters.get('config'), 'name') or 'loraflow'}-sweep"


@flow(name="loraflow-sweep", flow_run_name=sweep_run_name,
      description="A grid of fine-tunes sharing tokenization and the quantized base; the comparison ranks them.")
def sweep(config: AnyFinetuneConfig, grid: dict[str, list] = {}, variants: list[dict] = [],  # noqa: B006 (never mutated;
          metric: str = "eval_loss", higher_is_better: bool = False,  # a None default would give the UI form a type switch)
          parallel: int = 1, search_space: dict[str, Any] = {}, trials: int = 8) -> dict[str, dict]:  # noqa: B006
    """Fine-tune every variant of a base config and rank them.

    Args:
        config: The base fine-tune (SFT or DPO) every variant changes.
        grid: Settings and their values; every combination is a variant, e.g. {"lora.r": [8, 16, 32],
            "train.learning_rate": [1e-4, 2e-4]}.
        variants: Or the variants themselves, e.g. [{"lora.r": 8}, {"lora.r": 16, "train.learning_rate": 2e-4}].
        metric: What ranks them: a result of training (eval_loss, perplexity, tokens_per_s) or of the evaluation
            stage (rouge_l_after, exact_match_after, general_loss_after).
        higher_is_better: True for metrics where more is better (exact match, ROUGE-L, tokens/s).
        parallel: Variants run at once (1: one after another). More than 1 needs train.pool: each variant's training
            is a job of the pool, and the pool's concurrency limit decides how many train at the same time.
        search_space: Or an Optuna search (TPE, seeded with train.seed) instead of a grid: each setting's values or
            range, e.g. {"train.learning_rate": {"low": 1e-5, "high": 1e-3, "log": true}, "lora.r": [8, 16, 32]};
            each trial is a variant, told the metric of the one before it.
        trials: With search_space: how many variants the search tries.
    """
    if parallel < 1:
        raise LoraflowError(f"parallel is {parallel}: give the number of variants to run at once (1: one after another)")
    if search_space:
        if grid or variants:
            raise LoraflowError("a sweep takes a grid, a list of variants or a search space: one of the three")
        overrides, configs, results, failed = _search(config, search_space, trials, metric, higher_is_better, parallel)
    else:
        overrides = variant_overrides(grid, variants)
        configs = variant_configs(config, overrides)
        results, failed = _run_variants(overrides, configs, parallel)
    ranking = rank_variants(results, metric, higher_is_better)
    settings_of = {variant.name: settings for settings, variant in zip(overrides, configs)}
    store = ArtifactStore(config.storage)
    runs = [read_run(store, run_uri_of(records).rsplit("/", 1)[-1]) for records in results.values()]
    how = f"an Optuna search (TPE, seed {config.train.seed}) of" if search_space else ""
    lines = ["# Sweep", "", f"{how} {len(configs)} variants of `{config.name}`, ranked by {metric} "
             f"({'higher' if higher_is_better else 'lower'} is better):".strip(), ""]
    lines += [f"{place}. `{name}` {metric} {value:.4g}: {describe(settings_of[name])}" + (" ← **best**" if place == 1 else "")
              for place, (name, value) in enumerate(ranking, start=1)]
    lines += [f"- `{name}` failed: {message}" for name, message in failed.items()]
    if len(runs) > 1:
        lines += ["", comparison_artifact(runs)]
    create_markdown_artifact("\n".join(lines), key=artifact_key(config.name, "sweep"), description=f"sweep of {config.name}")
    if ranking:
        get_run_logger().info(f"best: {ranking[0][0]} ({metric} {ranking[0][1]:.4g})")
    if failed:
        raise LoraflowError(f"{len(failed)} of {len(configs)} variants failed ({', '.join(failed)}); the others finished. "
                            "Run the sweep again to retry the failed ones alone")
    return results


def _run_variants(overrides: list[dict], configs: list, parallel: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Fine-tune the variants, `parallel` at a time: (records of those that finished, failure of those that did not)."""
    logger = get_run_logger()
    if parallel > 1 and (local := [variant.name for variant in configs if not variant.train.pool]):
        raise LoraflowError(f"parallel {parallel} runs variants at once, but {', '.join(local)} would train in this process, "
                            "side by side on one device: set train.pool (the pool's concurrency limit decides how many "
                            "train at once), or parallel: 1")
    for settings, variant in zip(overrides, configs):
        logger.info(f"variant {variant.name}: {describe(settings)}")
    results, failed = {}, {}
    # Each variant's fine-tune is a flow run nested in a task of its own, so that several can run at once (a flow
    # called directly here would block until it finished).
    with ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(fine_tune_variant, parameters={"variant": variant}) for variant in configs]
        for settings, variant, future in zip(overrides, configs, futures):
            future.wait()
            if future.state.is_completed():
                results[variant.name] = future.result()
            else:
                failed[variant.name] = future.state.message or future.state.name
                logger.error(f"variant {variant.name} ({describe(settings)}) failed: {failed[variant.name]}; "
                             "run the sweep again to retry it (the finished variants are reused)")
    return results, failed


def _search(config, space: dict[str, Any], trials: int, metric: str, higher_is_better: bool, parallel: int):
    """Optuna's ask-and-tell: `parallel` trials at a time, each a variant fine-tuned like a grid's; a failed one (or one
    without the metric) is told as failed. Seeded, so running the search again asks for the same variants (the
    finished ones come back from the cache) as long as the earlier ones score the same."""
    distributions = search_distributions(space)  # (says how to install Optuna when it is missing)
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if higher_is_better else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=config.train.seed))
    overrides, configs, results, failed = [], [], {}, {}
    while len(configs) < trials:
        asked = [study.ask(distributions) for _ in range(min(parallel, trials - len(configs)))]
        batch = [dict(trial.params) for trial in asked]
        variants = variant_configs(config, batch, first=len(configs) + 1)
        finished, broken = _run_variants(batch, variants, parallel)
        for trial, variant in zip(asked, variants):
            value = metric_value(finished.get(variant.name), metric)
            if value is None:  # failed, or finished without the metric
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
        overrides, configs, results, failed = overrides + batch, configs + variants, results | finished, failed | broken
    return overrides, configs, results, failed


@task(task_run_name="{variant.name}", cache_policy=NONE)  # (the variant's own stages are cached; this only starts them)
def fine_tune_variant(variant: AnyFinetuneConfig) -> dict:
    """One variant's fine-tune: the SFT or DPO flow, as a flow run nested in this task; its work in this process one
    variant at a time, its training (a pool job with parallel > 1) beside the others'."""
    with local_work_one_at_a_time():
        return finetune_flow(variant.objective)(variant)


def rank_variants(results: dict[str, dict], metric: str, higher_is_better: bool) -> list[tuple[str, float]]:
    """(variant, value) best first, for the variants that report the metric."""
    scored = [(name, value) for name, records in results.items() if (value := metric_value(records, metric)) is not None]
    return sorted(scored, key=lambda item: item[1], reverse=higher_is_better)


def metric_value(records: dict | None, metric: str) -> float | None:
    """A finished variant's metric: from its training summary or its evaluation stage; None if it has none."""
    if not records:
        return None
    found = {**records["train"].metrics, **(records[EVALUATION.name].metrics if EVALUATION.name in records else {})}
    value = found.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

"""Merge-only: fold an exported adapter from the store into its full-precision base.

For an adapter trained with `merge.enabled: false`, or to merge again in another dtype. The merged
model is checked against base + adapter on validation rows, like the SFT flow's merge.
"""

from __future__ import annotations

from prefect import flow

from loraflow.objectives import AnyFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.registry import ADAPTER
from loraflow.stages import check_token_ids, with_data_shape
from loraflow.storage import ArtifactStore, StageRecord
from tasks.common import prepare_flow_process, stage_options
from tasks.data import prepare_dataset
from tasks.env import check_env, inspect_sources
from tasks.export import merge_adapter

prepare_flow_process()


@flow(name="loraflow-merge", description="Merge an exported adapter into its base and verify the merged model's logits.")
def merge_only(config: AnyFinetuneConfig, adapter_uri: str) -> StageRecord:
    """Merge the adapter at adapter_uri into config.model.base.

    Args:
        config: The fine-tune that produced the adapter (its base, data for the logit check, store, merge dtype).
        adapter_uri: The exported adapter folder, e.g. <store>/runs/<run>/adapter.
    """
    config = config.for_run()
    store = ArtifactStore(config.storage)
    manifest = store.manifest(adapter_uri.rstrip("/"))
    if manifest is None or manifest.get("stage") != ADAPTER.name:
        raise LoraflowError(f"{adapter_uri}: no committed adapter there; give the adapter/ folder of a run (see `loraflow runs`)")
    adapter = StageRecord(stage=ADAPTER.name, key=manifest["key"], uri=adapter_uri.rstrip("/"), metrics=manifest.get("metrics", {}), reused=True)
    env = check_env(config)
    sources = inspect_sources(config)
    config = with_data_shape(config, sources)
    dataset = prepare_dataset.with_options(**stage_options(config.storage))(config, sources)
    check_token_ids(dataset, sources)
    return merge_adapter(config, env, sources, dataset, adapter)

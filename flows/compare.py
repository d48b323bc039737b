"""Publishing a comparison of runs (`loraflow compare`) on the Prefect server's Artifacts page.

A flow of its own because Prefect 3.8 deprecates creating an artifact outside a flow or task run; the flow run,
named after the artifact's key, also says when the comparison was made.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.common import prepare_flow_process

prepare_flow_process()


@flow(name="loraflow-compare", flow_run_name="{key}", description="Publish a comparison of finished runs as a markdown artifact.")
def publish_comparison(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown, key=key, description=description)

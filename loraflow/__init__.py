"""loraflow: QLoRA/LoRA fine-tuning as cached, retryable stages. This package never imports Prefect
(except inside loraflow.cli's commands); the Prefect layer lives in flows/ and tasks/."""

__version__ = "0.1.0"

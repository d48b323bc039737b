"""The data half of loraflow: dataset files → tokenized training examples.

- shapes: the registry of data shapes (SFT and preference): detection, row validation, rendering, template rules;
- formats: reading files (JSON, JSONL, parquet; local or fsspec, compressed) and the SFT shapes' formatters;
- pairs: the preference shapes' row readers; templates: prompt and conversation templates;
- stage: the dataset stage both objectives share (read → resolve → examples → split → parquet + stats);
- sft / preference: each objective's examples; tokenize, split, packing: their building blocks.

This package's own namespace stays empty: loraflow.config reads the shape registry (its format
choices), and importing the stage here would load numpy, pyarrow and the tokenizer with every config (~0.3 s).
"""

from __future__ import annotations


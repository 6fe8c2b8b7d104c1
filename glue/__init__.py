"""GLUE harness for ``sparse_lowrank_peft``.

Fine-tunes sequence-classification models on the GLUE tasks (or on a custom CSV/TSV/JSONL task) with full
fine-tuning, PEFT's LoRA, or any tuner of this library, from a YAML recipe:

    python -m glue.run recipes/minilm/lora-sst2.yaml key=value ...

Modules:

- :mod:`glue.tasks`  -- the task table (columns, label sets) and the metrics (scikit-learn / scipy).
- :mod:`glue.data`   -- reading a local ``glue_data`` folder exactly, the hub fallback, custom tasks.
- :mod:`glue.run`    -- the recipe schema and the ``transformers.Trainer`` runner (``slpeft-glue``).
- :mod:`glue.report` -- results JSONs to a markdown table and PNG plots.
"""

from glue.errors import GlueError

__all__ = ["GlueError"]

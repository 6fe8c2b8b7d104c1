"""GLUE harness for ``sparse_lowrank_peft``.

Fine-tunes sequence-classification models on the GLUE tasks (or on a custom CSV/TSV/JSONL task) with full
fine-tuning, PEFT's LoRA, or any tuner of this library, from a YAML recipe:

    python -m glue.run recipes/minilm/lora-sst2.yaml key=value ...

Modules:

- :mod:`glue.config`  -- the recipe schema (:class:`~glue.config.RunConfig`, an OmegaConf structured config), the
  recipe and override merge, validation before anything is loaded, the command line's parsing.
- :mod:`glue.tasks`   -- the task table (columns, label sets) and the metrics (scikit-learn / scipy).
- :mod:`glue.data`    -- reading a local ``glue_data`` folder exactly, the hub fallback, custom tasks, a run's
  subsets and tokenisation.
- :mod:`glue.model`   -- the methods, the model and tokenizer, the PEFT config, 4-bit bases, LQ init, initial adapters.
- :mod:`glue.train`   -- the output folder and checkpoints (``--resume``), the ``transformers.Trainer`` and its
  callbacks, saving, the method's extras after training (DyLoRA, SoRA, LoRA-Squeeze).
- :mod:`glue.results` -- provenance (git, versions, device, memory, time) and the results JSON.
- :mod:`glue.run`     -- ``run()`` (the recipe's steps) and the command line (``slpeft-glue``).
- :mod:`glue.report`  -- results JSONs to a markdown table and PNG plots.
"""

from glue.errors import GlueError

__all__ = ["GlueError"]

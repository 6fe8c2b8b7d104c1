"""Causal-LM fine-tuning runner for ``sparse_lowrank_peft``: a YAML recipe -> an adapter on an LLM.

    python -m causal_lm.run recipes/llm/sltrain-qlora.yaml model=meta-llama/Llama-3.2-1B train_file=corpus.txt

It shares the GLUE harness's recipe machinery (:mod:`glue.config`: the OmegaConf merge, overrides, errors), its
method registry (:mod:`glue.model`) and its Trainer pieces (:mod:`glue.train`); what is its own:

- :mod:`causal_lm.config` -- the recipe schema (:class:`~causal_lm.config.LMRunConfig`) and its validation.
- :mod:`causal_lm.data`   -- text files to blocks of token ids.
- :mod:`causal_lm.model`  -- the base (4-bit or LQ-split), the adapter on every linear but ``lm_head``.
- :mod:`causal_lm.run`    -- ``run()`` (the recipe's steps) and the command line (``slpeft-lm``).
"""

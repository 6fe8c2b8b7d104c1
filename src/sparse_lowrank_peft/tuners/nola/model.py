"""NolaModel: injects :class:`NolaLayer` into the targeted linear layers and checks NOLA checkpoints when loaded."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ...delta import basis_record
from ...delta.tuner import DeltaModel
from .layer import KEY_FIELDS, NolaLayer


#: basis-record fields a config sets: checked against the saved record before loading (``delta.basis_record``)
_CONFIG_FIELDS = {name: (name, 1) for name in ("basis_seed", "r", "num_basis_A", "num_basis_B")}


class NolaModel(DeltaModel):
    """NOLA adapters for a transformers or plain PyTorch model.

    Use through PEFT::

        from peft import get_peft_model
        import sparse_lowrank_peft  # registers the method
        from sparse_lowrank_peft.tuners.nola import NolaConfig
        model = get_peft_model(base, NolaConfig(r=8, num_basis_A=256, num_basis_B=256, target_modules=["query", "value"]))
    """

    prefix: str = "nola_"
    tuner_layer_cls = NolaLayer

    # ------------------------------------------------------------------ coefficients stored in 4 or 8 bits
    #: checkpoint suffixes of a quantized coefficient vector ``<layer>.nola_alpha``: its codes and absmax (its length
    #: is the config's num_basis_A / num_basis_B; every tensor more costs ~100 bytes of safetensors header)
    QUANTIZED_SUFFIXES = ("_codes", "_absmax")

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection; with ``coefficient_bits`` each ``α`` / ``β`` is replaced by its codes, absmax and length
        (``delta.quant.quantize_vector``)."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        bits = getattr(config, "coefficient_bits", None)
        if bits is None:
            return out
        from ...delta.quant import quantize_vector

        for key in [k for k in out if k.endswith((f"nola_alpha.{adapter_name}", f"nola_beta.{adapter_name}"))]:
            values = out.pop(key)
            stem = key[: -len(f".{adapter_name}")]
            codes, absmax = quantize_vector(values, bits)
            out[f"{stem}_codes.{adapter_name}"] = codes
            out[f"{stem}_absmax.{adapter_name}"] = absmax
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Dequantize coefficients stored in 4 or 8 bits back to ``<layer>.nola_alpha`` / ``nola_beta``, then PEFT's
        remapping and the checks of ``_validate_checkpoint``."""
        state_dict = cls._dequantize_coefficients(dict(state_dict), config)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _dequantize_coefficients(cls, state_dict: dict, config) -> dict:
        bits = getattr(config, "coefficient_bits", None)
        stems = sorted({k[: -len("_codes")] for k in state_dict if k.endswith(("nola_alpha_codes", "nola_beta_codes"))})
        if stems and bits is None:
            raise ValueError(
                f"The checkpoint stores NOLA coefficients quantized ({stems[0]}_codes, ...) but its config has "
                "coefficient_bits=None, so their bit width is unknown. The adapter_config.json does not belong to these "
                "weights (or was edited). Fix: set coefficient_bits to the value it was saved with (4 or 8)."
            )
        from ...delta.quant import dequantize_vector

        for stem in stems:
            parts = [state_dict.pop(stem + suffix, None) for suffix in cls.QUANTIZED_SUFFIXES]
            if any(p is None for p in parts):
                raise ValueError(
                    f"The checkpoint has {stem}_codes but not all of {[stem + s for s in cls.QUANTIZED_SUFFIXES]}: it "
                    "is corrupted. Fix: re-save it from the trained model."
                )
            codes, absmax = parts
            numel = config.num_basis_A if stem.endswith("nola_alpha") else config.num_basis_B
            per_byte = 2 if bits == 4 else 1
            if codes.numel() != -(-numel // per_byte):
                raise ValueError(
                    f"{stem}: the checkpoint has {codes.numel()} bytes of {bits}-bit codes, but the config's "
                    f"{'num_basis_A' if stem.endswith('nola_alpha') else 'num_basis_B'}={numel} needs "
                    f"{-(-numel // per_byte)}. The config and the weights come from different adapters. Fix: load it "
                    "with the adapter_config.json it was saved with."
                )
            state_dict[stem] = dequantize_vector(codes, absmax, bits, numel)
        return state_dict

    @classmethod
    def _validate_checkpoint(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> None:
        """Before anything is loaded: the checkpoint's coefficients must fit the config, and the bases the config
        regenerates must be the ones the coefficients were trained with (seed, rank, layer shape, checksum)."""
        for name, module in model.named_modules():
            if not isinstance(module, NolaLayer) or not module.has_adapter(adapter_name):
                continue
            prefix = f"{name}." if name else ""
            layer = name.removeprefix("base_model.model.")
            for attr, field_name, k in (
                ("nola_alpha", "num_basis_A", config.num_basis_A),
                ("nola_beta", "num_basis_B", config.num_basis_B),
            ):
                coef = state_dict.get(f"{prefix}{attr}.{adapter_name}")
                if coef is not None and tuple(coef.shape) != (k,):
                    raise ValueError(
                        f"layer '{layer}': the checkpoint has {tuple(coef.shape)} {attr} coefficients but "
                        f"NolaConfig.{field_name}={k} in the adapter's config. The config and the weights come from "
                        f"different adapters (or {field_name} was edited). Fix: load it with the adapter_config.json it "
                        f"was saved with ({field_name}={coef.shape[0] if coef.dim() == 1 else '?'})."
                    )
            got = basis_record.read_record(
                state_dict, f"{prefix}nola_basis_key.{adapter_name}", "nola_basis_key", KEY_FIELDS, layer,
                "seed, rank, shape and checksum of the random bases its coefficients were trained on")
            want = dict(zip(KEY_FIELDS, (int(v) for v in module.expected_basis_key(adapter_name))))
            basis_record.check_record(layer, got, want, _CONFIG_FIELDS, "NolaConfig", "coefficients")
            if got["checksum"] != want["checksum"]:
                cls._check_stored_bases(layer, got, want, config, state_dict, prefix, adapter_name)
        super()._validate_checkpoint(model, config, adapter_name, state_dict)

    @staticmethod
    def _check_stored_bases(layer, got, want, config, state_dict, prefix, adapter_name) -> None:
        """A checksum mismatch is fine only when the checkpoint carries the bases it was trained on (``save_basis``)
        and they are the ones its record names."""
        stored_A = state_dict.get(f"{prefix}nola_basis_A.{adapter_name}")
        stored_B = state_dict.get(f"{prefix}nola_basis_B.{adapter_name}")
        if config.save_basis and stored_A is not None and stored_B is not None:
            # The checkpoint carries its own bases; they are used as saved. Check they are the ones recorded (the
            # record is of float32 bases; bases saved from a model cast to another dtype cannot be checked).
            if stored_A.dtype != torch.float32 or stored_B.dtype != torch.float32:
                return
            checksum = zlib.crc32(
                zlib.crc32(stored_B.to("cpu", torch.float32).contiguous().numpy()).to_bytes(4, "little"),
                zlib.crc32(stored_A.to("cpu", torch.float32).contiguous().numpy()),
            )
            if checksum == got["checksum"]:
                return
            raise ValueError(
                f"layer '{layer}': the bases stored in the checkpoint do not match its basis record (checksum "
                f"{checksum} vs {got['checksum']}). The checkpoint is corrupted: re-save it from the trained model."
            )
        raise basis_record.bases_differ(layer, got, want, "load it with the torch it was trained with and re-save it "
                                        "with save_basis=True, which stores the bases in the checkpoint.")

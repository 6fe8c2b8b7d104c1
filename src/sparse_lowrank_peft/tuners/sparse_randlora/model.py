"""SparseRandLoraModel: injects :class:`SparseRandLoraLayer` into the targeted linear layers; checks checkpoints."""

from __future__ import annotations

from torch import nn

from ...delta import basis_record
from ...delta.tuner import DeltaModel
from .bases import num_bases
from .layer import KEY_FIELDS, SparseRandLoraLayer


#: basis-record field -> (config field, scale of the saved integer): checked before loading (``delta.basis_record``)
_CONFIG_FIELDS = {"basis_seed": ("basis_seed", 1), "r": ("r", 1), "basis_density_ppm": ("basis_density", 1e6)}


class SparseRandLoraModel(DeltaModel):
    """RandLoRA adapters with sparse random bases run through the sparse-delta kernels.

    Use through PEFT::

        from peft import get_peft_model
        import sparse_lowrank_peft  # registers the method
        from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig
        model = get_peft_model(base, SparseRandLoraConfig(r=32, basis_density=0.1, target_modules=["query", "value"]))
    """

    prefix: str = "sparse_randlora_"
    tuner_layer_cls = SparseRandLoraLayer

    @classmethod
    def _validate_checkpoint(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> None:
        """Before anything is loaded: λ and γ must have the shapes the config's ``r`` gives, and the bases the
        config regenerates must be the ones they were trained with (seed, r, density, layer shape, checksum)."""
        for name, module in model.named_modules():
            if not isinstance(module, SparseRandLoraLayer) or not module.has_adapter(adapter_name):
                continue
            prefix = f"{name}." if name else ""
            layer = name.removeprefix("base_model.model.")
            N = num_bases(module.min_dim, config.r)
            for attr, shape in (("sparse_randlora_lambda", (config.r, N)), ("sparse_randlora_gamma", (N, module.min_dim))):
                value = state_dict.get(f"{prefix}{attr}.{adapter_name}")
                if value is not None and tuple(value.shape) != shape:
                    raise ValueError(
                        f"layer '{layer}': the checkpoint's {attr} has shape {tuple(value.shape)} but "
                        f"SparseRandLoraConfig.r={config.r} on this {module.out_features}x{module.in_features} layer "
                        f"implies {shape} (N = ceil({module.min_dim} / r) = {N} bases). The config and the weights come "
                        "from different adapters (r edited?) or the base model differs. Fix: load it with the "
                        "adapter_config.json it was saved with, on the base model it was trained on."
                    )
            got = basis_record.read_record(
                state_dict, f"{prefix}sparse_randlora_basis_key.{adapter_name}", "sparse_randlora_basis_key",
                KEY_FIELDS, layer, "seed, r, density, shape and checksum of the random bases it was trained on")
            want = dict(zip(KEY_FIELDS, (int(v) for v in module.expected_basis_key(adapter_name))))
            basis_record.check_record(layer, got, want, _CONFIG_FIELDS, "SparseRandLoraConfig", "scalings")
            if got["checksum"] != want["checksum"]:
                raise basis_record.bases_differ(layer, got, want, "load it with the torch version it was trained with.")
        super()._validate_checkpoint(model, config, adapter_name, state_dict)

"""SparseRandLoraModel: injects :class:`SparseRandLoraLayer` into the targeted linear layers; checks checkpoints."""

from __future__ import annotations

from torch import nn

from ...delta.tuner import DeltaModel
from .bases import num_bases
from .layer import KEY_FIELDS, SparseRandLoraLayer


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
            saved = state_dict.get(f"{prefix}sparse_randlora_basis_key.{adapter_name}")
            if saved is None:
                raise ValueError(
                    f"layer '{layer}': the checkpoint has no basis record 'sparse_randlora_basis_key' (seed, r, density, "
                    "shape and checksum of the random bases it was trained on). It was not written by this version of "
                    "sparse_lowrank_peft or was edited. Fix: re-save it from the trained model."
                )
            if tuple(saved.shape) != (len(KEY_FIELDS),) or saved.dtype.is_floating_point:
                raise ValueError(
                    f"layer '{layer}': the checkpoint's sparse_randlora_basis_key has shape {tuple(saved.shape)} and "
                    f"dtype {saved.dtype}; expected {len(KEY_FIELDS)} integers {KEY_FIELDS}. The checkpoint is "
                    "corrupted: re-save it from the trained model."
                )
            got = dict(zip(KEY_FIELDS, (int(v) for v in saved)))
            want = dict(zip(KEY_FIELDS, (int(v) for v in module.expected_basis_key(adapter_name))))
            shown = {"basis_seed": "basis_seed", "r": "r", "basis_density_ppm": "basis_density"}
            for field_name, config_name in shown.items():
                if got[field_name] != want[field_name]:
                    g, w = got[field_name], want[field_name]
                    if field_name == "basis_density_ppm":
                        g, w = g / 1e6, w / 1e6
                    raise ValueError(
                        f"layer '{layer}': the checkpoint was trained on the random bases of {config_name}={g}, but "
                        f"its config says SparseRandLoraConfig.{config_name}={w}: its scalings would be applied to "
                        f"other bases and give wrong outputs. Fix: set {config_name}={g} in adapter_config.json (or "
                        "load it with the config it was saved with)."
                    )
            if (got["out_features"], got["in_features"]) != (want["out_features"], want["in_features"]):
                raise ValueError(
                    f"layer '{layer}': the checkpoint was trained on a {got['out_features']}x{got['in_features']} "
                    f"layer, but this model's layer is {want['out_features']}x{want['in_features']}. Fix: load the "
                    "adapter on the base model it was trained on."
                )
            if got["checksum"] != want["checksum"]:
                raise ValueError(
                    f"layer '{layer}': the random bases regenerated from basis_seed={want['basis_seed']} differ from "
                    f"the ones the adapter was trained with (checksum {want['checksum']} vs {got['checksum']}): this "
                    "torch draws other numbers from the same seed, or the checkpoint was edited. Fix: load it with "
                    "the torch version it was trained with."
                )
        super()._validate_checkpoint(model, config, adapter_name, state_dict)

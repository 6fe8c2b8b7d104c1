"""DeltaLayer: the one tuner-layer base every method of this package builds on.

A wrapped layer computes, for the active adapters ``a``::

    y = base(x) + Σ_a [ lowrank_a(dropout_a(x)) + x · S_aᵀ ]

where ``lowrank_a`` is the method's own parametrisation (SLTrain's ``(α/r)·B·A``, SoRA's gated factors, ...) and
``S_a`` is an optional sparse term on a fixed support, applied either by :func:`sparse_delta` (SpMM, no ``(out, in)``
tensor at all) or folded into the base GEMM as a transient ``W0 + Σ S_a`` (``delta.fused``, never kept), as the
dispatcher ``delta.ops.resolve_sparse_path`` chooses per call from measured costs. This class owns everything that is the same for every method: forward composition, merge and
unmerge (through PEFT's quantization backend for quantized bases), ``get_delta_weight``, the sparse term's storage
and its support cache, dtype handling and Conv1D's transposed weight. A method subclass provides:

* ``adapter_layer_names`` / ``other_param_names`` (every name starts with the method's prefix),
* ``update_layer(adapter_name, config, key)`` to create the adapter's tensors,
* ``lowrank_forward(x, adapter_name)`` (scaled low-rank output, or ``None``) and
  ``lowrank_delta(adapter_name)`` (the dense ``(out, in)`` low-rank delta in ``merge_dtype``, for merge only, or ``None``),
* ``sparse_values_attr`` / ``support_attr`` (names of the sparse containers) if it has a sparse term.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._peft_compat import (
    BaseTunerLayer,
    BufferDict,
    check_adapters_to_merge,
    get_in_out_features,
    resolve_quantization_backend,
)
from . import custom_ops
from .ops import plain_sparse_path, resolve_sddmm, sparse_delta
from .support import SparseSupport, layer_seed, support_nnz

__all__ = ["DeltaLayer", "ParameterDict", "is_supported_base_layer"]


class ParameterDict(nn.ParameterDict):
    """``nn.ParameterDict`` whose lookup reads the registered parameter directly.

    Every layer call looks up each adapter tensor by name (four lookups per SoRA call). ``nn.ParameterDict``'s
    lookup goes through the Python ``Module.__getattr__``; this one reads ``_parameters``, where that lookup ends
    anyway. It is part of the per-call work that made SoRA's unmerged decoding step cost more than LoRA's
    (``bench/results/decode-cpu-before-7df2620.json`` against ``decode-cpu.json``). Everything else (registration,
    state dict, ``.to()``, FSDP's swaps of ``_parameters``) is ``nn.ParameterDict``'s.
    """

    def __getitem__(self, key: str) -> Any:
        param = self._parameters.get(key) if isinstance(key, str) else None
        return param if param is not None else super().__getitem__(key)


def is_supported_base_layer(module: nn.Module) -> bool:
    """Whether ``module`` can be wrapped: ``nn.Linear``, transformers' ``Conv1D``, or a quantized linear PEFT knows."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and getattr(backend, "layer_type", None) == "linear"


class DeltaLayer(nn.Module, BaseTunerLayer):
    """Shared base of the tuner layers: ``y = base(x) + Σ_a [lowrank_a(dropout(x)) + x·S_aᵀ]`` (see module doc)."""

    #: name of the ParameterDict holding the sparse values (``(nnz,)`` per adapter), or None for no sparse term
    sparse_values_attr: str | None = None
    #: name of the BufferDict holding the support (``(2, nnz)`` int32 per adapter), saved in the checkpoint
    support_attr: str | None = None

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not is_supported_base_layer(base):
            raise TypeError(
                f"{type(self).__name__} cannot wrap a {type(base).__name__}: only torch.nn.Linear, "
                "transformers' Conv1D and bitsandbytes/PEFT-quantized linear layers are supported. "
                "Fix: narrow `target_modules` to the linear layers (e.g. ['query', 'value'])."
            )
        self.quantization_backend = resolve_quantization_backend(base)
        in_features, out_features = get_in_out_features(base)
        self.in_features, self.out_features = int(in_features), int(out_features)
        # Conv1D stores its weight as (in, out); the deltas are (out, in) and are transposed when merged.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.lora_dropout_modules = None  # subclasses that use dropout keep their own ModuleDict
        if self.sparse_values_attr is not None:
            setattr(self, self.sparse_values_attr, ParameterDict({}))
            setattr(self, self.support_attr, BufferDict({}, persistent=True))
        self._support_cache: dict[str, tuple[tuple, SparseSupport]] = {}
        self._inference_cache: dict[str, tuple] = {}

    # ------------------------------------------------------------------ method hooks
    def update_layer(self, adapter_name: str, config, key: str = "", **kwargs) -> None:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement update_layer")

    def lowrank_forward(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """The method's low-rank term for input ``x`` (``(..., in)`` -> ``(..., out)``), scaled; None if it has none."""
        return None

    def lowrank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The method's low-rank delta as a dense ``(out, in)`` matrix in :meth:`merge_dtype` (merge only); None if
        it has none."""
        return None

    def lowrank_factors(
        self, adapter_name: str, rank: Optional[int] = None, **kwargs
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, A)`` with the low-rank delta exactly ``B @ A`` (``(out, k)``, ``(k, in)``, scale folded in), for
        export to plain LoRA; None if the method's low-rank term is not such a product (then export needs a rank)."""
        return None

    # ------------------------------------------------------------------ LQ-LoRA initialisation
    def lq_init(self, adapter_name: str, config, rank: int, scaling: float, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """LQ-LoRA: decompose the full-precision base weight ``W ≈ Q + L`` (``delta.quant.lq_decompose``), replace the
        base layer by a 4-bit ``Linear4bit`` holding ``Q``, and return ``(B, A)`` with ``scaling · B · A = L``.

        Needs a full-precision ``nn.Linear`` base (LQ quantizes it itself); the decomposition is weighted by the
        Fisher weights ``config.lq_fisher`` holds for this layer (recorded from ``use_fisher`` by the tuner, or read
        back from the adapter folder).
        """
        from . import quant
        from .fisher import recorded_fisher
        from .lq_checks import plan_choice

        base = self.get_base_layer()
        if self.quantization_backend is not None or not isinstance(base, nn.Linear):
            raise ValueError(
                f"init_weights='lq' needs a full-precision nn.Linear base, but '{key}' is a {type(base).__name__}"
                + (" (already quantized)" if self.quantization_backend is not None else "")
                + ". LQ-LoRA computes the quantized base itself from the full-precision weights. Fix: load the model "
                "without BitsAndBytesConfig and target only nn.Linear layers, or use init_weights=True."
            )
        if self.merged_adapters or len(self._main_container) > 0:
            raise ValueError(
                f"init_weights='lq' replaces the base weight of '{key}' by its quantized part, so it can only be used "
                "for the first adapter of a layer. Fix: add further adapters with init_weights=True."
            )
        self.base_layer, result = quant.lq_quantize(
            base, rank, config.lq_quant_type, config.lq_max_iter, fisher=recorded_fisher(config, key),
            choice=plan_choice(getattr(config, "lq_plan", None), key), svd=getattr(config, "lq_svd", "auto"),
        )
        self.quantization_backend = resolve_quantization_backend(self.base_layer)
        self._keep_4bit_layout(self.base_layer)
        self.lq_errors = result.summary()
        quant.record_lq_offset(self, result)
        root = scaling**0.5
        return result.B / root, result.A / root

    # ------------------------------------------------------------------ bookkeeping
    @property
    def _main_container(self) -> nn.Module:
        return getattr(self, self.adapter_layer_names[0])

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._main_container

    def _base_weight_shape_ok(self) -> None:
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"{type(self).__name__}: base layer has no features ({self.out_features}x{self.in_features}).")

    def check_unmerged(self, adapter_name: str, action: str) -> None:
        """Refuse ``action``, which changes the adapter's ΔW, while the adapter is merged into this layer's base
        weight: ``unmerge`` subtracts the ΔW of the moment, so the base would no longer be restored."""
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"{action} changes the delta of adapter '{adapter_name}', which is merged into the base weights; "
                "unmerging afterwards would subtract another delta than was added and corrupt the base model. Fix: "
                f"model.unmerge_adapter() first, then {action}, then merge again."
            )

    def _finish_update(self, adapter_name: str, config) -> None:
        """Move the new adapter's tensors to the base layer's device and (re)activate adapters; call at the end of
        ``update_layer``."""
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=getattr(config, "inference_mode", False))

    # ------------------------------------------------------------------ sparse term
    def init_sparse(self, adapter_name: str, density: float, seed: int, key: str, init_zero: bool) -> None:
        """Draw the adapter's support (seeded per layer from ``seed`` and the module name ``key``) and its values.

        Values start at zero (``init_zero``: the wrapped model equals the base at step 0) or, for tests, small normal
        values from the same seed.
        """
        shape = (self.out_features, self.in_features)
        support = SparseSupport.random(shape, density, layer_seed(seed, key))
        if init_zero:
            values = torch.zeros(support.nnz)
        else:
            gen = torch.Generator().manual_seed(layer_seed(seed + 1, key))
            values = torch.randn(support.nnz, generator=gen) * 0.1
        getattr(self, self.support_attr)[adapter_name] = support.indices
        getattr(self, self.sparse_values_attr)[adapter_name] = nn.Parameter(values)
        self._support_cache.pop(adapter_name, None)

    def has_sparse(self, adapter_name: str) -> bool:
        return self.sparse_values_attr is not None and adapter_name in getattr(self, self.sparse_values_attr)

    def get_support(self, adapter_name: str) -> SparseSupport:
        """The adapter's support, its derived layouts cached until the buffer is moved or overwritten (e.g. loaded)."""
        buf = getattr(self, self.support_attr)[adapter_name]
        key = (buf.data_ptr(), buf._version, buf.device, tuple(buf.shape))
        cached = self._support_cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        support = SparseSupport(buf, (self.out_features, self.in_features), validate=False)
        self._support_cache[adapter_name] = (key, support)
        return support

    def inference_cached(self, adapter_name: str, inputs: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        """``compute()`` (a function of ``inputs`` only), built once and reused in inference: in eval mode while
        autograd records nothing (``torch.no_grad`` / ``inference_mode``, as ``generate`` and evaluation run) and
        not in a ``torch.compile`` trace. A change of any input recomputes it: another tensor, its storage moved
        (``.to``), or written in place (its ``_version``: an optimizer step, ``load_state_dict``). ``train()`` and
        ``eval()`` clear the cache, which is the way to refresh it after writing an input without a new version:
        through ``.data``, or by ``torch.distributed.broadcast`` (checked: ``all_gather_into_tensor``, which FSDP
        unshards with, versions its output; ``broadcast`` does not).

        For terms rebuilt from their parameters on every call (NOLA's ``A = Σ αᵢAᵢ`` reads k bases, 8 MB at
        k = 256, r = 8, in = 1024: more than the base weight itself), this took NOLA's unmerged decoding step from
        2.69x PEFT LoRA's (``bench/results/decode-cpu-before-0813f38.json``) to 1.12x (``decode-cpu.json`` as committed
        in 8c9152f; the per-call changes after it brought it to 0.98x, the file as it is now)."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        state = tuple((t.data_ptr(), t._version) for t in inputs) + (torch.is_inference_mode_enabled(),)
        hit = self._inference_cache.get(adapter_name)
        if hit is not None and hit[1] == state and len(hit[0]) == len(inputs) and all(
                a is b for a, b in zip(hit[0], inputs)):
            return hit[2]
        value = compute()
        self._inference_cache[adapter_name] = (inputs, state, value)
        return value

    def train(self, mode: bool = True):
        self._inference_cache.clear()
        return super().train(mode)

    def expected_nnz(self, density: float) -> int:
        return support_nnz((self.out_features, self.in_features), density)

    # ------------------------------------------------------------------ forward
    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        container = self._main_container[adapter_name]
        if isinstance(container, torch.Tensor):
            return container.dtype
        return next(container.parameters()).dtype

    def adapter_forward(self, x: torch.Tensor, adapter_name: str, sparse: bool = True) -> torch.Tensor:
        """The adapter's whole contribution ``lowrank(dropout(x)) + x·Sᵀ`` for ``x`` of shape ``(..., in)``
        (without the sparse term when ``sparse`` is False: the fused path computed it with the base)."""
        x = self._cast_input_dtype(x, self.adapter_dtype(adapter_name))
        out = self.lowrank_forward(x, adapter_name)
        if sparse and self.has_sparse(adapter_name):
            values = getattr(self, self.sparse_values_attr)[adapter_name]
            if torch.compiler.is_compiling():  # the traced twin of sparse_delta (delta.custom_ops)
                indices = getattr(self, self.support_attr)[adapter_name]
                shape = (self.out_features, self.in_features)
                sparse_out = custom_ops.sparse_delta(x.to(values.dtype), indices, values, shape)
                return sparse_out if out is None else out + sparse_out
            # Added in place into the low-rank output (which no autograd node saved): one activation-sized temporary
            # less than ``out + sparse_out``. bench/sparse_delta.py, 4096 tokens x 1024 x 1024, density 0.01:
            # 16.8 MB peak above LoRA out of place, 0.0 MB in place, same time.
            add_to = out if out is not None and out.dtype == values.dtype else None
            sparse_out = sparse_delta(x.to(values.dtype), self.get_support(adapter_name), values, add_to=add_to)
            out = sparse_out if out is None or add_to is not None else out + sparse_out
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)`` in the base layer's output dtype."""
        if torch.compiler.is_compiling() and not self.traceable():
            return self._eager_forward(x, *args, **kwargs)
        return self._forward(x, *args, **kwargs)

    def traceable(self) -> bool:
        """Whether ``torch.compile`` traces this layer's forward into its graph: yes, with its sparse term as the
        custom ops of ``delta.custom_ops``, unless a sparse term is active on a base whose weight is not a plain
        float tensor (4-bit / 8-bit bitsandbytes, HQQ, offloaded), which the fused op cannot read."""
        if not any(self.has_sparse(name) for name in self.active_adapters):
            return True
        return self._plain_weight() is not None

    def _plain_weight(self) -> Optional[torch.Tensor]:
        """The base's float ``nn.Linear`` / ``Conv1D`` weight, or None for any other base (bitsandbytes' layers
        subclass ``nn.Linear``, hence the exact type; written so that Dynamo traces it)."""
        base = self.base_layer
        if type(base) not in (nn.Linear, Conv1D) or hasattr(base, "_hf_hook"):
            return None
        return base.weight if base.weight.is_floating_point() else None

    @torch.compiler.disable
    def _eager_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """:meth:`_forward` outside ``torch.compile``'s graphs, for a layer that is not :meth:`traceable`. The eager
        sparse ops cache their layouts on Python objects and run torch.sparse CPU kernels or Triton launchers, which
        Dynamo cannot trace: breaking inside them, it made 65 graphs of a tiny LLaMA with SLTrain on every linear,
        with a recompile warning (``bench/results/compile-cpu-before-6bc1bf5.json``). Run eagerly here, each such
        layer costs one graph break, and the rest of the model compiles."""
        return self._forward(x, *args, **kwargs)

    def _forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus every active adapter's term (the fused-weight path where it pays); with
        ``adapter_names`` (one per row of the batch) each row gets its own adapter (``delta.mixed_batch``)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if adapter_names is not None:
            from .mixed_batch import mixed_batch_forward

            return mixed_batch_forward(self, x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_forward(x, *args, **kwargs)
        fused = self._fused_adapters(x) if not (args or kwargs) else {}
        result = self._fused_forward(x, fused) if fused else self.base_forward(x, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if not self.has_adapter(adapter_name) or (adapter_name in fused and self.fused_covers_lowrank):
                continue
            delta = self.adapter_forward(x, adapter_name, sparse=adapter_name not in fused)
            if delta is not None:
                result = result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))
        return result

    # ------------------------------------------------------------------ fused-weight path of the sparse term
    def _compute_dtype(self) -> torch.dtype:
        base = self.base_layer
        weight = getattr(base, "weight", None)
        if weight is None or hasattr(weight, "quant_state"):  # 4-bit bitsandbytes, HQQ (no .weight)
            return getattr(base, "compute_dtype", None) or torch.float32
        return weight.dtype

    def fused_operands(self, adapter_name: str):
        """``(support, factor)`` of the adapter's weight-shaped term the fused path can fold into W0, or None.

        Default: the sparse term ``S`` (``factor`` None, ``ΔW = S``). A method whose whole low-rank part is a
        factored sparse product (sparse RandLoRA's ``scale · B·T``) returns its :class:`~.fused.FrozenFactor` and sets
        ``fused_covers_lowrank``; it returns None when the fused path cannot compute it (e.g. dropout in training).
        """
        if not self.has_sparse(adapter_name):
            return None
        return self.get_support(adapter_name), None

    def fused_values(self, adapter_name: str) -> torch.Tensor:
        """The trainable values on the ``fused_operands`` support (differentiable)."""
        return getattr(self, self.sparse_values_attr)[adapter_name]

    #: True when ``fused_operands`` is the adapter's whole contribution (its ``lowrank_forward`` is then skipped)
    fused_covers_lowrank: bool = False

    def _fused_adapters(self, x: torch.Tensor) -> dict[str, tuple]:
        """The active adapters whose term the dispatcher folds into the base GEMM for this input, with their
        ``(support, factor)``; empty when :meth:`terms_may_fold` keeps the SpMM path or the base cannot be read as a
        dense weight."""
        if not self.terms_may_fold(x):
            return {}  # no term to fold, or the measured choice keeps SpMM (every decoding step): nothing built
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(self.base_layer, BaseTunerLayer) or weight is None or weight.requires_grad:
            return {}  # HQQ and other bases without a readable weight; the fused GEMM reads W0 detached
        if self._fused_dtype(x) is None:
            return {}  # an input the base refuses gets its own error there
        if torch.compiler.is_compiling():
            return self._traced_fused_adapters()
        operands = {}
        for name in self.active_adapters:
            found = self.fused_operands(name) if self.has_adapter(name) else None
            if found is not None:
                operands[name] = found
        from .fused import weight_source

        return operands if operands and weight_source(self.base_layer, self._compute_dtype()) is not None else {}

    def terms_may_fold(self, x: torch.Tensor) -> bool:
        """The dispatcher's choice for input ``x`` (``delta.ops.resolve_sparse_path``'s measured rule), made from
        sizes alone so that nothing is built for a call that keeps the SpMM path. Here for plain sparse terms
        (``ΔW = S``, ``plain_sparse_path``): the token count and the first active term's density, read off its index
        buffer's size (False for a method without a sparse term). A layer with a factored term overrides it."""
        names = [n for n in self.active_adapters if self.has_sparse(n)]
        if not names:
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        density = getattr(self, self.support_attr)[names[0]].shape[1] / (self.out_features * self.in_features)
        return plain_sparse_path(tokens, density, x.device) == "fused"

    def _traced_fused_adapters(self) -> dict[str, tuple]:
        """:meth:`_fused_adapters` in a ``torch.compile`` trace (a :meth:`traceable` layer: plain terms on a float
        weight), with each adapter's index buffer in place of its support (no layout is built inside the trace)."""
        buffers = getattr(self, self.support_attr)
        return {name: (buffers[name], None) for name in self.active_adapters if self.has_sparse(name)}

    def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the base layer computes ``x`` in, which the fused GEMM uses too: under ``torch.autocast`` a
        float base computes in the autocast dtype; a 4-bit base in its compute dtype; otherwise the weight's dtype,
        and an input of another dtype (which ``F.linear`` refuses) gets None."""
        dtype = self._compute_dtype()
        if self._is_4bit_base():
            return dtype
        if torch.is_autocast_enabled(x.device.type) and dtype in (torch.float32, torch.float16, torch.bfloat16):
            return torch.get_autocast_dtype(x.device.type)
        return dtype if x.dtype == dtype else None

    def _fused_forward(self, x: torch.Tensor, operands: dict[str, tuple]) -> torch.Tensor:
        """``base(x) + Σ x·ΔW_aᵀ`` as one GEMM with the transient ``W0 + Σ ΔW_a`` (``delta.fused``), computed and
        returned in the dtypes the base layer itself would use (the output in the input's dtype for a 4-bit base,
        as bitsandbytes returns it), so the dispatcher's choice never changes the output dtype."""
        from .fused import fused_sparse_linear, weight_source

        dtype = self._fused_dtype(x)
        out_dtype = x.dtype if self._is_4bit_base() else dtype
        base = self.base_layer
        supports = [support for support, _ in operands.values()]
        factors = [factor for _, factor in operands.values()]
        values = [self.fused_values(n) for n in operands]
        bias = base.bias.to(dtype) if getattr(base, "bias", None) is not None else None
        with torch.autocast(x.device.type, enabled=False):  # computed in ``dtype`` exactly, forward and backward
            if torch.compiler.is_compiling():  # the traced twin (delta.custom_ops); ``supports`` are index buffers
                shape = (self.out_features, self.in_features)
                y = custom_ops.fused_linear(x.to(dtype), base.weight, bias, supports, values, shape,
                                            isinstance(base, Conv1D))
            else:
                sddmm = [resolve_sddmm(s, x.device, f) for s, f in zip(supports, factors)]
                y = fused_sparse_linear(x.to(dtype), weight_source(base, dtype), bias, supports, values, sddmm,
                                        factors)
        return y.to(out_dtype)

    # ------------------------------------------------------------------ 4-bit bases
    @staticmethod
    def _keep_4bit_layout(base: nn.Module) -> None:
        """A base LQ initialisation created keeps bitsandbytes' standard layout, like every 4-bit layer of a model
        an adapter of ours is injected into (``DeltaModel._prepare_quantized_model``; ``delta.quant.keep_standard_layout``
        says why the AVX-512-BF16 CPU repack is turned off), and keeps it after unload: it is this package's layer."""
        if hasattr(base, "support_avx512bf16_for_cpu"):
            from .quant import keep_standard_layout

            keep_standard_layout(base, give_back=False)

    def _is_4bit_base(self) -> bool:
        return self.quantization_backend is not None and hasattr(getattr(self.base_layer, "weight", None), "quant_state")

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output. A 4-bit base on the CPU is computed by ``delta.quant.linear4bit_forward`` (the
        same math as bitsandbytes' CPU path, exact on every shape); everything else by the base layer itself
        (including a base with accelerate hooks, which may need to move its weights first)."""
        if self._is_4bit_base() and x.device.type == "cpu" and not hasattr(self.base_layer, "_hf_hook"):
            from .quant import linear4bit_forward

            return linear4bit_forward(self.base_layer, x)
        return self.base_layer(x, *args, **kwargs)

    def get_base_weight(self) -> torch.Tensor:
        """The base weight in full precision (4-bit bases: read by ``delta.quant.dequantize_4bit``, exact whatever
        the layout and CPU; other quantized bases: PEFT's quantization backend)."""
        if self._is_4bit_base():
            from .quant import dequantize_weight

            base = self.get_base_layer()
            dtype = getattr(base.weight.quant_state, "dtype", None) or torch.float32  # what bitsandbytes returns
            return dequantize_weight(base).to(dtype)
        return super().get_base_weight()

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ΔW of ``adapter_name`` in the base weight's layout and dtype (``(in, out)`` for Conv1D).

        Computed in :meth:`merge_dtype` (fp32, or fp64 for a float64 model), then cast. Besides the fused path's
        transient ``W0 + S`` (``delta.fused``), this and merge are the only places that build an ``(out, in)`` matrix.
        """
        device = self._main_device(adapter_name)
        dtype = self.merge_dtype(adapter_name)
        delta = self.lowrank_delta(adapter_name)
        if delta is None:
            delta = torch.zeros(self.out_features, self.in_features, device=device, dtype=dtype)
        else:
            delta = delta.to(dtype)
        if self.has_sparse(adapter_name):
            support = self.get_support(adapter_name)
            values = getattr(self, self.sparse_values_attr)[adapter_name].to(dtype)
            delta = delta.index_put((support.rows(delta.device), support.cols(delta.device)), values, accumulate=True)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self._base_dtype())

    def merge_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype merges and ``lowrank_delta`` compute in: fp64 when the base weight or the adapter is fp64 (a
        float64 model merges and unmerges to fp64 rounding, not fp32's), else fp32 (exact enough for fp32 and half
        precision bases, whose weights are rounded to their own dtype afterwards)."""
        if torch.float64 in (self._base_dtype(), self.adapter_dtype(adapter_name)):
            return torch.float64
        return torch.float32

    def _main_device(self, adapter_name: str) -> torch.device:
        container = self._main_container[adapter_name]
        if isinstance(container, torch.Tensor):
            return container.device
        return next(container.parameters()).device

    def _base_dtype(self) -> torch.dtype:
        base = self.get_base_layer()
        if self.quantization_backend is not None:
            return getattr(base, "compute_dtype", None) or torch.float32
        return base.weight.dtype

    @torch.no_grad()  # merging builds no graph: ΔW comes from trainable factors, W + ΔW is a dense out×in
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters' ΔW into the base weight: ``W ← W + ΔW`` (quantized bases: dequantize, add, requantize).

        Args:
            safe_merge: compute the merged weight in a copy and refuse (``ValueError``) if it is not finite.
            adapter_names: adapters to merge (default: the active ones).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter_name in adapter_names:
            if not self.has_adapter(adapter_name):
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter_name)
            dtype = self.merge_dtype(adapter_name)
            merged = (weight.to(dtype) + delta.to(dtype).to(weight.device)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weight of adapter '{adapter_name}' "
                    f"({type(self).__name__} on a {self.out_features}x{self.in_features} layer): the adapter "
                    "weights are broken (diverged training?). The base weight was left unchanged."
                )
            self._set_merged_weight(merged)
            self.merged_adapters.append(adapter_name)
            if self.quantization_backend is not None:
                stored = self.get_base_weight().to(torch.float32)
                err = float((stored - merged.to(torch.float32)).norm() / merged.to(torch.float32).norm().clamp_min(1e-30))
                warnings.warn(
                    f"Merging adapter '{adapter_name}' into a quantized base ({type(self.get_base_layer()).__name__}) "
                    f"re-quantizes the weight: measured relative rounding error {err:.2e} (‖W_q − (W + ΔW)‖/‖W + ΔW‖), "
                    "so merged outputs differ from unmerged ones by about that much. For an exact full-precision "
                    "merge use merge_and_unload(dequantize=True).",
                    stacklevel=3,  # the caller of merge (one frame more: torch.no_grad's wrapper)
                )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, newest adapter first: ``W ← W − ΔW``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if not self.has_adapter(adapter_name):
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter_name)
            dtype = self.merge_dtype(adapter_name)
            self._set_merged_weight((weight.to(dtype) - delta.to(dtype).to(weight.device)).to(weight.dtype))

    def dequantize_base(self) -> None:
        """Replace a quantized base layer by an ``nn.Linear`` holding its dequantized weight (its compute dtype)."""
        if self.quantization_backend is None:
            return
        from .quant import dequantize_weight

        base = self.get_base_layer()
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        weight = dequantize_weight(base).to(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.to(dtype))
        linear.requires_grad_(False)
        self.base_layer = linear
        self.quantization_backend = None

    def _set_merged_weight(self, weight: torch.Tensor) -> None:
        """Write the merged weight: in place, or for a quantized base through PEFT's backend, which re-quantizes.
        PEFT's HQQ backend builds a new ``HQQLinear`` without the old layer's bias (its LoRA merges lose it too:
        outputs moved 12.8% on a 36-wide test layer), so the bias is carried over here."""
        if self.quantization_backend is None:
            self.get_base_layer().weight.data = weight
            return
        bias = getattr(self.get_base_layer(), "bias", None)
        self.set_base_weight(weight)
        if bias is not None and getattr(self.get_base_layer(), "bias", None) is None:
            self.get_base_layer().bias = bias

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__.lower().replace('layer', '')}.{super().__repr__()}"

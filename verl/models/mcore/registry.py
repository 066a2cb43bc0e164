"""Registry of the Hugging Face architectures the Megatron backend can build and convert.

Each entry, keyed by the HF ``architectures[0]`` name (``Qwen2ForCausalLM``, ``LlamaForCausalLM``,
``MixtralForCausalLM``), gives

* ``config_converter(hf_config, dtype=..., parallel=..., override_transformer_config=..., **extra) -> dict``: the
  ``TransformerConfig`` kwargs (:func:`verl.models.mcore.config_converter.hf_to_mcore_config_dense` for dense
  decoders);
* ``weight_converter_cls(hf_config, layout)``: a
  :class:`~verl.models.mcore.weight_converter.DenseDecoderWeightConverter` (or subclass) that maps state dicts both
  ways;
* ``model_kwargs_fn(hf_config, layout) -> dict``: the extra ``GPTModel`` kwargs (vocabulary, RoPE, tied embeddings).

Other architectures join with :func:`register_mcore_model` (also usable as a decorator on the config converter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from verl.models.mcore.config_converter import (hf_to_gpt_model_kwargs, hf_to_mcore_config_dense,
                                                hf_to_mcore_config_mixtral)
from verl.models.mcore.mixtral import MixtralWeightConverter
from verl.models.mcore.weight_converter import DenseDecoderWeightConverter, McoreLayout, _cfg

__all__ = [
    "McoreModelEntry",
    "register_mcore_model",
    "get_mcore_model_entry",
    "supported_architectures",
    "get_architecture",
    "hf_to_mcore_config",
    "get_weight_converter",
    "get_gpt_model_kwargs",
]


@dataclass(frozen=True)
class McoreModelEntry:
    """What the Megatron backend needs to know about one HF architecture."""

    architecture: str
    config_converter: Callable[..., dict[str, Any]]
    weight_converter_cls: type = DenseDecoderWeightConverter
    model_kwargs_fn: Callable[[Any, McoreLayout], dict[str, Any]] = hf_to_gpt_model_kwargs


_REGISTRY: dict[str, McoreModelEntry] = {}


def register_mcore_model(architecture: str,
                         config_converter: Optional[Callable[..., dict[str, Any]]] = None,
                         weight_converter_cls: type = DenseDecoderWeightConverter,
                         model_kwargs_fn: Callable[[Any, McoreLayout], dict[str, Any]] = hf_to_gpt_model_kwargs,
                         overwrite: bool = False) -> Any:
    """Register ``architecture`` (an HF ``architectures`` entry). Without ``config_converter`` it returns a decorator
    that registers the decorated function as the config converter. Registering a name twice needs ``overwrite``."""

    def _register(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if architecture in _REGISTRY and not overwrite:
            raise ValueError(f"Megatron architecture {architecture!r} is already registered; pass overwrite=True to "
                             "replace it")
        _REGISTRY[architecture] = McoreModelEntry(architecture, fn, weight_converter_cls, model_kwargs_fn)
        return fn

    if config_converter is None:
        return _register
    _register(config_converter)
    return _REGISTRY[architecture]


def supported_architectures() -> list[str]:
    """Registered HF architecture names."""
    return sorted(_REGISTRY)


def get_architecture(hf_config: Any) -> str:
    """``architectures[0]`` of an HF config (object or dict)."""
    archs = _cfg(hf_config, "architectures", default=None) or []
    if not archs:
        raise ValueError("the HF config has no `architectures` entry, so no Megatron model can be chosen; set "
                         f"architectures=[...] in config.json (supported: {supported_architectures()})")
    return str(archs[0])


def get_mcore_model_entry(hf_config_or_arch: Any) -> McoreModelEntry:
    """The registry entry for an HF config or architecture name; a clear error names the supported ones."""
    arch = hf_config_or_arch if isinstance(hf_config_or_arch, str) else get_architecture(hf_config_or_arch)
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise NotImplementedError(f"the Megatron backend does not support architecture {arch!r}; supported: "
                                  f"{supported_architectures()}. Register it with "
                                  "verl.models.mcore.register_mcore_model") from None


def hf_to_mcore_config(hf_config: Any, **kwargs: Any) -> dict[str, Any]:
    """``TransformerConfig`` kwargs for ``hf_config`` (keywords: ``dtype``, ``parallel``,
    ``override_transformer_config``, any other ``TransformerConfig`` field)."""
    return get_mcore_model_entry(hf_config).config_converter(hf_config, **kwargs)


def get_weight_converter(hf_config: Any, layout: Optional[McoreLayout] = None) -> DenseDecoderWeightConverter:
    """The weight converter of ``hf_config``'s architecture for ``layout`` (default: no parallelism)."""
    return get_mcore_model_entry(hf_config).weight_converter_cls(hf_config, layout or McoreLayout())


def get_gpt_model_kwargs(hf_config: Any, layout: Optional[McoreLayout] = None) -> dict[str, Any]:
    """Extra ``GPTModel`` kwargs for ``hf_config`` (vocabulary padded for ``layout``, RoPE, tied embeddings)."""
    return get_mcore_model_entry(hf_config).model_kwargs_fn(hf_config, layout or McoreLayout())


register_mcore_model("LlamaForCausalLM", hf_to_mcore_config_dense)
register_mcore_model("Qwen2ForCausalLM", hf_to_mcore_config_dense)
register_mcore_model("MixtralForCausalLM", hf_to_mcore_config_mixtral, weight_converter_cls=MixtralWeightConverter)

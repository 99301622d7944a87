"""Build a transformers causal LM from its config with every parameter on the meta device (no weights read, no init run)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import UnsupportedModelError


@contextmanager
def params_on_meta():
    """Create parameters on the meta device while buffers (rotary inv_freq, ...) are computed for real.

    Buffers are tiny and some are not in any checkpoint, so they must come from the constructors.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextmanager
def _no_init_weights():
    # Every parameter is on meta and filled from the checkpoint: transformers' weight initialisation
    # would only walk the modules (0.5 s on a 24-layer MoE). Buffers are computed in __init__, and
    # init_weights still ties the weights (only initialize_weights is skipped).
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__.get("initialize_weights")
    # torch's own layers initialise themselves in __init__ (nn.Linear.reset_parameters): on meta tensors that
    # is work with no result (0.06 s of a 24-layer MoE's meta model on the CI box); real tensors are untouched
    inits = {name: getattr(nn.init, name) for name in _TORCH_INITS if hasattr(nn.init, name)}
    for name, fn in inits.items():
        setattr(nn.init, name, _skip_on_meta(fn))
    if original is not None:
        PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        for name, fn in inits.items():
            setattr(nn.init, name, fn)
        if original is not None:
            PreTrainedModel.initialize_weights = original


_TORCH_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


def _skip_on_meta(fn):
    def init(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)

    return init


def build_meta_model(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        with params_on_meta(), _no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        # a text model saved from a multimodal family (model_type 'emu3_text_model', 'mllama_text_model') is in no
        # auto mapping: its config.json's `architectures` names the transformers class that wrote it
        cls = _causal_lm_class(config)
        if cls is None:
            raise UnsupportedModelError(f"model_type '{config.model_type}': no causal LM class in transformers ({str(e).splitlines()[0]})") from None
        with params_on_meta(), _no_init_weights():
            model = cls._from_config(config, dtype=dtype)
    return model.eval()


def _causal_lm_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None) if name.endswith("ForCausalLM") else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and isinstance(config, cls.config_class):
            return cls
    return None

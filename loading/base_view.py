"""A PeftModel's base as a module tree of its own, without the adapter layers.

A base shared with adapters is a PeftModel: a call for the base goes through PEFT's model wrapper and,
in every wrapped layer, through the LoRA layer's forward (switched off) before it reaches the base
layer. On a small model that Python is a cost of its own: a 16-row decode step of the tiny LLM took
0.61-0.65 ms with its adapter switched off against 0.55-0.59 ms for the same model without PEFT, and
its decode loop ~12% more CPU per request (bench/PAIRED.md, "Two A/Bs").

`base_view` builds, once, a shallow copy of the base's module tree in which each adapter layer is
replaced by the layer it wraps. The copy holds the same parameters and buffers (no memory, no weight
copy), so it computes exactly what the PeftModel computes with its adapters off. Adapters attached
later wrap the same base layers, so the view stays valid; a merged adapter (its weights added into the
base layer) or a wrapper whose base it cannot tell makes `base_view` return None for good, and the
caller uses the PeftModel with its adapters off, as before. modelfleet itself never merges adapters.
"""

from __future__ import annotations

import copy
from typing import Any

_VIEW = "_modelfleet_base_view"  # the built view (or False: none can be built), kept on the PeftModel


class _NoView(Exception):
    pass


def base_view(model: Any) -> Any | None:
    """The base of PeftModel `model` without its adapter layers (built on first use), or None."""
    view = model.__dict__.get(_VIEW)
    if view is None:
        try:
            view = _strip(model.get_base_model())
        except _NoView:
            view = False
        model.__dict__[_VIEW] = view  # the module's __dict__: not a submodule, never in its state dict
    return view or None


def _strip(module: Any) -> Any:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, BaseTunerLayer):
        if getattr(module, "merged", False):  # the base layer's weights include an adapter's
            raise _NoView
        module = module.get_base_layer()
    elif isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    if type(module).__module__.startswith("peft.") or "forward" in vars(module):
        # a PEFT wrapper of another kind, or a forward set on the instance (accelerate's device hooks):
        # which layer computes the base is not certain
        raise _NoView
    clone = copy.copy(module)  # shares _parameters and _buffers: the same tensors
    for name, value in vars(clone).items():
        if "hooks" in name and isinstance(value, dict):
            # hooks of its own: transformers installs its output-capturing hooks (hidden states) lazily on
            # the tree that is called, and in shared dicts each tree would fire the other's too
            clone.__dict__[name] = type(value)(value)
    clone._modules = {name: None if child is None else _strip(child) for name, child in module._modules.items()}
    return clone

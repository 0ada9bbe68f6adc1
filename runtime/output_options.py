"""The forward options every transformers model takes and no spec needs to know about:
`output_hidden_states`, `output_attentions`, `return_dict` and `inputs_embeds`. They are applied around
the generated forward (hooks on the backbone, its embedding table and its layer stack), so generated
code stays the spec's dataflow."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .errors import ArgumentError
from .moe import Router, load_balancing_loss

OPTIONS = frozenset(
    {"output_hidden_states", "output_attentions", "output_router_logits", "return_dict", "inputs_embeds"}
)


def backbone_of(model: nn.Module) -> nn.Module:
    """The base model inside a head model (the model itself when it is one)."""
    inner = [m for m in model.modules() if hasattr(m, "config_class") and m is not model]
    return inner[0] if inner else model


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The backbone's repeated layers: its first ModuleList."""
    stack = next((m for m in backbone_of(model).modules() if isinstance(m, nn.ModuleList)), None)
    if stack is None:
        raise ArgumentError(f"{type(model).__name__} has no repeated layers to report hidden states of")
    return stack


def call_with_options(model: nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    config = model.config  # type: ignore[attr-defined]
    hidden = kwargs.pop("output_hidden_states", None)
    hidden = bool(getattr(config, "output_hidden_states", False) if hidden is None else hidden)
    attentions = bool(kwargs.pop("output_attentions", None))
    return_dict = kwargs.pop("return_dict", None)
    embeds = kwargs.pop("inputs_embeds", None)
    routing = kwargs.pop("output_router_logits", None)
    routers = (
        _routers(model)
        if routing or (routing is None and getattr(config, "output_router_logits", False))
        else []
    )
    if attentions and model.attn_implementation != "eager":  # type: ignore[attr-defined]
        raise ArgumentError(
            f"output_attentions needs attn_implementation='eager': `{model.attn_implementation}` never forms "  # type: ignore[attr-defined]
            "the attention weights; load with attn_implementation='eager' or call model.set_attention('eager')"
        )
    hooks = []
    states: list[torch.Tensor] = []
    final: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    try:
        for router in routers:
            router.recorded = logits
        if embeds is not None:
            _feed_embeddings(model, embeds, args, kwargs, hooks)
        if hidden:
            for layer in layer_stack(model):
                hooks.append(layer.register_forward_pre_hook(lambda _, inputs: states.append(inputs[0])))
            hooks.append(
                backbone_of(model).register_forward_hook(lambda *io: final.append(io[2].last_hidden_state))
            )
        from .attention import recording_attention

        with recording_attention() if attentions else nullcontext() as weights:
            out = call(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for router in routers:
            router.recorded = None
    if hidden:  # the stack's input, each layer's output but the last, then the backbone's result
        out.hidden_states = (*states, final[-1])
    if attentions:
        out.attentions = tuple(weights)
    if routers:
        _add_router_outputs(model, out, tuple(logits), routers[0].top_k, kwargs)
    return out.to_tuple() if return_dict is False else out


def _routers(model: nn.Module) -> list[Router]:
    """The model's routers, unless an outer call is already recording them (a head calling its backbone)."""
    found = [m for m in model.modules() if isinstance(m, Router)]
    return [] if any(r.recorded is not None for r in found) else found


def _add_router_outputs(
    model: nn.Module, out: Any, logits: tuple[torch.Tensor, ...], top_k: int, kwargs: dict[str, Any]
) -> None:
    """`router_logits`, and for a causal LM the load-balancing loss (`aux_loss`), added to the loss times
    `router_aux_loss_coef` when there are labels, as transformers does."""
    out.router_logits = logits
    if not hasattr(out, "aux_loss") or not logits:
        return
    out.aux_loss = load_balancing_loss(logits, top_k, kwargs.get("attention_mask"))
    if out.loss is not None:
        coefficient = getattr(model.config, "router_aux_loss_coef", 0.0)  # type: ignore[attr-defined]
        out.loss = out.loss + coefficient * out.aux_loss.to(out.loss.device)


def _feed_embeddings(model: nn.Module, embeds: torch.Tensor, args: tuple, kwargs: dict, hooks: list) -> None:
    """`inputs_embeds`: vectors in place of what the token embedding returns (a scaled table's scale
    included, as `get_input_embeddings()(ids)` gives them); positions, masks and the rest of the
    embedding block run as for ids."""
    if args or kwargs.get("input_ids") is not None:
        raise ArgumentError("pass input_ids or inputs_embeds, not both")
    table = model.get_input_embeddings()  # type: ignore[attr-defined]
    kwargs["input_ids"] = torch.zeros(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
    hooks.append(table.register_forward_hook(lambda *_: embeds))

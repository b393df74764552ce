"""A model split by layers over several processes (machines), each streaming only its own.

mlx-lm's models that carry `pipeline()` (`PipelineMixin`) run a share of their layers per
rank of an `mx.distributed` group: rank size-1 the first layers, rank 0 the last; each layer
boundary is mlx-lm's `send` / `recv_like`, and the last hidden state reaches every rank
through `all_gather`, so that every rank samples the same token. This module splits a flash
model that way (before anything is read), gives the default model's class (llama, which has
no `pipeline()` in mlx-lm) the same one, and shows the engine only its rank's layers: a
`RankView` of the bundle, whose record segments of other layers are empty and whose config
counts only its layers (the memory plan's KV cache and caches, the stats' FFN bytes).
No transport of our own: MLX's distributed backends (ring, MPI, JACCL, NCCL) carry it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import UnsupportedModel
from .memory import arrays_loaded_bytes

LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # as mlx-lm's sharded_load matches them


def pipelined_types() -> list[str]:
    """Model types whose mlx-lm class has `pipeline()`, and llama (given one here). Read from
    mlx-lm's sources, not imported: importing every model module takes seconds."""
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    found = {p.stem for p in folder.glob("*.py")
             if p.stem != "pipeline" and "PipelineMixin" in p.read_text(errors="ignore")}
    return sorted(found | {"llama"})


@dataclass
class Stage:
    """One rank's share of a pipelined model: layers [start, end) of `layers`."""

    rank: int
    size: int
    start: int
    end: int
    layers: int

    def text(self) -> str:
        return f"rank {self.rank} of {self.size}, layers {self.start}-{self.end - 1} of " \
               f"{self.layers}"

    def owns(self, name: str) -> bool:
        """Whether this rank loads weight `name`: its layers', and what is in no layer (the
        embeddings, the final norm, the head: every rank computes them, as in mlx-lm)."""
        found = LAYER_NAME.search(name)
        return found is None or self.start <= int(found.group(1)) < self.end


def budget_split(group: Any, budget: int, layers: int) -> list[int]:
    """Layers per rank (rank 0 first) in proportion to each rank's budget: every rank gives
    its own, they meet in an all_gather."""
    budgets = mx.distributed.all_gather(mx.array([float(budget)]), group=group,
                                        stream=mx.cpu)
    return proportional_split([float(b) for b in budgets.tolist()], layers)


def proportional_split(weights: list[float], layers: int) -> list[int]:
    """`layers` shared in proportion to `weights`, at least one each (largest remainders
    first), e.g. [3e9, 1e9] over 8 layers: [6, 2]."""
    if not 0 < len(weights) <= layers:
        raise ValueError(f"{len(weights)} ranks cannot share {layers} layers")
    total = sum(weights)
    shares = [layers * w / total for w in weights]
    split = [max(1, int(s)) for s in shares]
    while sum(split) < layers:  # to the largest remainder
        split[max(range(len(split)), key=lambda r: shares[r] - split[r])] += 1
    while sum(split) > layers:  # from the largest excess, never below one
        split[max((r for r in range(len(split)) if split[r] > 1),
                  key=lambda r: split[r] - shares[r])] -= 1
    return split


def split_model(model: nn.Module, group: Any, split: list[int] | str | None = None,
                budget: int = 0) -> Stage:
    """Split `model` (mlx-lm's, before its weights are loaded) over `group` as mlx-lm's
    `pipeline()` does: even by default, `split` layers per rank (rank 0 first), or "budget":
    in proportion to each rank's `budget` (`budget_split`). A model without `pipeline()` in
    mlx-lm: UnsupportedModel, naming the model types that have one."""
    inner = getattr(model, "model", None)
    if inner is not None and not hasattr(inner, "pipeline") and _is_llama(model):
        _give_llama_a_pipeline(model)
    if inner is None or not hasattr(inner, "pipeline"):
        kind = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
        raise UnsupportedModel(f"{kind} cannot be pipelined: its mlx-lm class has no "
                               f"pipeline(); these do: {', '.join(pipelined_types())}")
    layers = len(inner.layers)
    if split == "budget":
        split = budget_split(group, budget, layers)
    inner.pipeline(group, split)
    return Stage(inner.pipeline_rank, inner.pipeline_size, inner.start_idx, inner.end_idx,
                 layers)


def _is_llama(model: nn.Module) -> bool:
    from mlx_lm.models import llama

    return type(model) is llama.Model and type(model.model) is llama.LlamaModel


def _give_llama_a_pipeline(model: nn.Module) -> None:
    """mlx-lm's llama (the default model's class) has no `pipeline()`: give this instance
    qwen2's, whose forward it shares (llama's sliding-window layers kept)."""
    model.model.__class__ = PipelinedLlamaModel
    model.__class__ = PipelinedLlama
    model.model.pipeline_rank, model.model.pipeline_size = 0, 1
    model.model.start_idx, model.model.end_idx = 0, None


def _llama_classes() -> tuple[type, type]:
    from mlx_lm.models import llama
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.pipeline import PipelineMixin

    class PipelinedLlamaModel(PipelineMixin, llama.LlamaModel):
        """mlx-lm's LlamaModel with qwen2's pipelined forward (mlx_lm/models/qwen2.py)."""

        def __call__(self, inputs: mx.array, cache: list | None = None,
                     input_embeddings: mx.array | None = None) -> mx.array:
            h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
            layers = self.pipeline_layers
            cache = cache or [None] * len(layers)
            masks = {}
            for layer, c in zip(layers, cache, strict=True):
                if layer.use_sliding not in masks:
                    masks[layer.use_sliding] = create_attention_mask(
                        h, c, window_size=self.sliding_window if layer.use_sliding else None)
            if self.pipeline_rank < self.pipeline_size - 1:  # from the previous rank
                h = mx.distributed.recv_like(h, self.pipeline_rank + 1)
            for layer, c in zip(layers, cache, strict=True):
                h = layer(h, masks[layer.use_sliding], cache=c)
            if self.pipeline_rank != 0:  # to the next rank
                h = mx.distributed.send(h, (self.pipeline_rank - 1) % self.pipeline_size)
                if cache[-1] is not None:
                    cache[-1].keys = mx.depends(cache[-1].keys, h)
            if self.pipeline_size > 1:  # every rank gets rank 0's output, in the graph
                h = mx.distributed.all_gather(h)[: h.shape[0]]
            return self.norm(h)

    class PipelinedLlama(llama.Model):
        """llama's Model whose `layers` are this rank's (mlx-lm's make_prompt_cache)."""

        @property
        def layers(self) -> list[nn.Module]:
            return self.model.pipeline_layers

    return PipelinedLlamaModel, PipelinedLlama


PipelinedLlamaModel, PipelinedLlama = _llama_classes()


class RankView:
    """A bundle (or an MoE source) as one rank's engine sees it: the record segments of
    other ranks' layers empty, a config of only its layers (the KV cache the plan counts),
    resident bytes of only the weights it loads; all else is the bundle's. The view of a
    `SourceModel` is one (the engine reads such a model's pieces with a PieceReader)."""

    def __new__(cls, bundle: Any, stage: Stage) -> RankView:
        from .expert_index import SourceModel

        if isinstance(bundle, SourceModel) and cls is RankView:
            return super().__new__(SourceRankView)
        return super().__new__(cls)

    def __init__(self, bundle: Any, stage: Stage):
        self.inner, self.stage = bundle, stage
        self.families = {name: dataclasses.replace(fam, segments=tuple(
            seg if stage.start <= i < stage.end else (seg[0], 0)
            for i, seg in enumerate(fam.segments))) for name, fam in bundle.families.items()}
        self.config = {**bundle.config, "num_hidden_layers": stage.end - stage.start}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def ffn_bytes(self) -> int:
        fam = self.families.get("neuron") or next(iter(self.families.values()))
        return sum(n for _, n in fam.segments)

    def resident_weights(self) -> dict[str, mx.array]:
        """This rank's resident weights, unread (MLX loads lazily)."""
        path = getattr(self.inner, "resident_path", None)
        weights = mx.load(str(path)) if path is not None and hasattr(self.inner, "manifest") \
            else self.inner.load_resident()
        return {k: v for k, v in weights.items() if self.stage.owns(k)}

    def loaded_resident_bytes(self, itemsize: int) -> int:
        """Memory this rank's resident weights take once loaded (`memory.plan_memory` and
        `memory.expert_plan` count these, not the bundle's)."""
        return arrays_loaded_bytes(self.resident_weights().values(), itemsize)

    def load_resident(self) -> dict[str, mx.array]:
        """The bundle's resident weights (checked as it checks them), this rank's only."""
        return {k: v for k, v in self.inner.load_resident().items() if self.stage.owns(k)}


def _source_rank_view() -> type:
    from .expert_index import SourceModel

    class SourceRankView(RankView, SourceModel):
        """A rank's view of an MoE model streamed from its own files."""

    return SourceRankView


SourceRankView = _source_rank_view()


def place_capacities(plan: Any, stage: Stage) -> None:
    """A plan made for a rank's layers alone (`RankView`'s config) lists their caches from
    0: put them at the rank's layer numbers, other layers without caches."""
    for key, per_layer in plan.capacity.items():
        plan.capacity[key] = [0] * stage.start + list(per_layer) \
            + [0] * (stage.layers - stage.end)


def attach_engine(model: nn.Module, engine: Any) -> None:
    """Give every flash module of the model's layers (a rank's: the others are gone) its
    engine."""
    for _, module in model.named_modules():
        if hasattr(module, "engine") and hasattr(module, "layer"):
            module.engine = engine


def init_group() -> Any:
    """The distributed group of this process (mlx.launch's environment says which); a
    single process is a group of one (a pipeline of one rank: all layers)."""
    return mx.distributed.init()


def synchronize(group: Any) -> None:
    """Wait until every rank has loaded (mlx-lm's sharded_load does the same: a slow rank's
    first send would otherwise time out on the others)."""
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))

"""Gauss-Newton (GGN) curvature products of the mean cross-entropy: ``G v = J^T H_L J v``.

``J`` is the Jacobian of the logits with respect to the selected parameters, ``H_L`` the Hessian
of the loss with respect to the logits: for softmax cross-entropy, ``diag(p) - p p^T`` per example
(divided by the examples of the chunk: the loss is their mean), whatever the labels. ``G`` is
positive semi-definite, equals the Hessian wherever the logits are linear in the parameters,
and needs no second derivative of the network: ``J v`` is one forward-mode pass
(`torch.func.jvp`: the forward carrying the tangent ``v``), ``J^T u`` one backward through the
chunk's kept forward graph. A Hessian-vector product instead backpropagates through a backward
graph; the GGN product measured 0.6-0.7x its time on a CPU (`benchmarks/sharpness.py`). (Forming
``J v`` by the double-vjp trick, a backward through the graph of ``u -> J^T u``, cost as much as
the Hessian's product there.)

Only the cross-entropy loss has this ``H_L``: `GGN` refuses any other ``loss_fn``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vmap

from samtune.sharpness.hvp import FlatLoss, SavedBytes, available_bytes, chunks


def is_cross_entropy(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is the mean softmax cross-entropy (``F.cross_entropy``, or an
    ``nn.CrossEntropyLoss`` with no class weights and mean reduction).

    >>> is_cross_entropy(F.cross_entropy), is_cross_entropy(nn.CrossEntropyLoss())
    (True, True)
    >>> is_cross_entropy(F.mse_loss), is_cross_entropy(nn.CrossEntropyLoss(reduction="sum"))
    (False, False)
    """
    if loss_fn is F.cross_entropy:
        return True
    return isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean"


def _softmax_hessian_times(p: Tensor, u: Tensor) -> Tensor:
    """``(diag(p) - p p^T) u`` for each example (row), for rows of probes ``[k, c, classes]``."""
    return p * u - p * (p * u).sum(-1, keepdim=True)


class _ChunkGraph:
    """One chunk's logits ``z(w)`` with their graph kept (for ``J^T u``) and its probabilities."""

    def __init__(self, f: FlatLoss, leaf: Tensor, x: Tensor):
        with torch.enable_grad():
            self.z = f.output(leaf, x)
        # Probabilities in at least single precision, even under half-precision logits.
        z = self.z.detach()
        self.p = torch.softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1).to(z.dtype)
        self.f, self.x, self.leaf = f, x, leaf

    def _jv(self, v: Tensor) -> Tensor:
        """``J v``: the logits' directional derivative, by forward-mode differentiation."""
        return jvp(lambda flat: self.f.output(flat, self.x), (self.leaf.detach(),), (v,))[1]

    def products(self, vs: Tensor, batched: bool) -> Tensor:
        """``J^T H_L J v`` (the loss summed over the chunk) for each row of ``vs``."""
        if not batched:
            return torch.stack([self._one(v) for v in vs])
        hu = _softmax_hessian_times(self.p, vmap(self._jv)(vs))
        (out,) = torch.autograd.grad(self.z, self.leaf, hu, retain_graph=True, is_grads_batched=True)
        return out

    def _one(self, v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(self.z, self.leaf, _softmax_hessian_times(self.p, self._jv(v)), retain_graph=True)
        return out


class GGN:
    """GGN-vector products of the mean cross-entropy over (x, y), chunked like `HVP`.

    ``mode``: ``"graph"`` keeps every chunk's forward graph for the whole measurement (a product
    is then a forward-mode pass and a backward per chunk); ``"chunk"`` rebuilds one chunk's graphs per call
    (memory of one chunk, a forward and a backward more per product); ``"auto"`` keeps them when
    they fit in half of ``memory_share`` of the free memory, counted on the first chunk.
    Raises ValueError for a loss other than cross-entropy or an unknown mode.
    """

    def __init__(
        self,
        f: FlatLoss,
        x: Tensor,
        y: Tensor,
        batch: int = 512,
        mode: str = "auto",
        probe_batch: int = 1,
        memory_share: float = 1.0,
    ):
        if not is_cross_entropy(f.loss_fn):
            raise ValueError(
                "the GGN measures are defined for the cross-entropy loss (the trial's "
                f"F.cross_entropy), got {f.loss_fn!r}"
            )
        if mode not in ("auto", "graph", "chunk"):
            raise ValueError(f"ggn mode must be 'auto', 'graph' or 'chunk', got {mode!r}")
        if batch < 1 or probe_batch < 1 or not 0 < memory_share <= 1:
            raise ValueError(
                f"need batch >= 1, probe_batch >= 1, 0 < memory_share <= 1; got {batch}, {probe_batch}, {memory_share}"
            )
        self.f, self.x = f, x
        self.parts = chunks(len(y), batch)
        # Each chunk's graph gives the summed loss's GGN: 1/len(y) makes it the mean's.
        self.scale = 1.0 / len(y)
        self.probe_batch, self.memory_share = probe_batch, memory_share
        self.leaf = f.w.detach().requires_grad_(True)
        self.graphs: list[_ChunkGraph] | None = None
        if mode != "chunk":
            self._keep_graphs(required=mode == "graph")
        self.mode = "graph" if self.graphs is not None else "chunk"

    def _keep_graphs(self, required: bool) -> None:
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            first = _ChunkGraph(self.f, self.leaf, self.x[self.parts[0]])
        share = int(available_bytes(self.f.w.device) * self.memory_share)
        # Every chunk's graphs kept, plus one chunk's worth in flight during a product.
        if not required and max(counter.total, 1) * (len(self.parts) + 1) > share // 2:
            return
        self.graphs = [first] + [_ChunkGraph(self.f, self.leaf, self.x[p]) for p in self.parts[1:]]

    def _chunk_products(self, graph: _ChunkGraph, vs: Tensor) -> Tensor:
        out = torch.empty_like(vs)
        for i in range(0, len(vs), self.probe_batch):
            block = vs[i : i + self.probe_batch]
            try:
                out[i : i + len(block)] = graph.products(block, batched=len(block) > 1)
            except RuntimeError:  # an op without a batching rule: one probe at a time
                out[i : i + len(block)] = graph.products(block, batched=False)
        return out

    def __call__(self, vs: Tensor) -> Tensor:
        """G @ v for each row of ``vs`` ([k, n] -> [k, n])."""
        out = torch.zeros_like(vs)
        for i, part in enumerate(self.parts):
            graph = self.graphs[i] if self.graphs is not None else _ChunkGraph(self.f, self.leaf, self.x[part])
            out += self._chunk_products(graph, vs)
        return out * self.scale

"""EVA (init_lora_weights: eva): explained-variance adaptation (Paischer et al., 2024).

Before the first step, the inputs of every adapted layer over the run's first training
batches are fed to an incremental SVD (PCA); each layer's A becomes the top right-singular
vectors of its inputs (B stays 0: a fresh adapter changes nothing, the base is untouched).
The rank budget (r per layer, rank_pattern counted) is then handed out across layers by
explained variance ratio, a layer getting at most round(rho·r); a layer given 0 loses its
adapter. Batches are read until every component a layer needs is stable (cosine similarity
to the previous batch's ≥ tau), or MAX_BATCHES.

This follows PEFT's `initialize_lora_eva_weights` (peft/tuners/lora/eva.py) step for step,
so that the same model and batches give the same A (up to each component's sign) and the
same ranks: the incremental PCA (peft/utils/incremental_pca.py, after scikit-learn: a
randomized SVD with q = 2k, 4 iterations, seed 42), the positions used (attention mask, and
labels ≠ label_mask_value), layers with equal inputs (q/k/v) sharing one SVD, and the order
in which ties of explained variance are broken. PEFT whitens with an in-place division on a
view, so layers sharing an SVD are divided once per such layer; here each once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from loratune.adapters.base_inits import InitSpec, register_init
from loratune.adapters.host import adapted_layers
from loratune.adapters.inject import disable_adapters, mark_trainable, new_layer_adapter
from loratune.adapters.peft_format import canonical_path
from loratune.adapters.registry import AdapterError, TrainingHooks
from loratune.models.modules import set_submodule

MAX_BATCHES = 1000  # PEFT cycles the data until convergence, without a bound
SEED = 42  # PEFT's lowrank_seed


class InputPCA:
    """Incremental PCA of one layer's inputs: `components` [k, in], `ratio` [k] (explained
    variance ratio), `converged` [k]. PEFT's IncrementalPCA(lowrank=True, lowrank_seed=42)."""

    def __init__(self, k: int, tau: float):
        self.k, self.tau = k, tau
        self.seen: torch.Tensor | None = None  # rows seen so far, a [1] tensor on x's device
        self.mean = self.var = self.components = self.singular = self.ratio = None
        self.converged = torch.zeros(k, dtype=torch.bool)

    def fit(self, x: torch.Tensor) -> None:
        """One batch of inputs [n, in]; fewer rows than components: skipped, as PEFT does."""
        if x.shape[0] < self.k:
            return
        previous = None if self.components is None else self.components.clone()
        self._partial_fit(x.float().clone())
        if previous is not None:
            sim = torch.nn.functional.cosine_similarity(self.components, previous)
            self.converged = sim >= self.tau

    def _partial_fit(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if self.seen is None:
            self.seen = torch.tensor([0], device=x.device)
        mean, var, total = _mean_and_var(x, self.mean, self.var, self.seen)
        if self.components is None:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt((self.seen.double() / total) * n) * (self.mean - batch_mean)
            x = torch.vstack((self.singular.view(-1, 1) * self.components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            u, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=4)
        vt = v.mH
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        vt *= signs.view(-1, 1)  # scikit-learn's svd_flip on V
        self.ratio = (s ** 2 / torch.sum(var * total))[:self.k]
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular = vt[:self.k], s[:self.k]


def _mean_and_var(x, last_mean, last_var, last_count):
    """Running column mean and variance in float64 (scikit-learn's _incremental_mean_and_var)."""
    count = torch.tensor([x.shape[0]], device=x.device)
    total = last_count + count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
        else last_mean * last_count
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / total
    centred = x - new_sum / count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_unnormalized = centred.square().sum(dim=0, dtype=torch.float64) - correction / count
    if last_var is None:
        return mean, new_unnormalized / total, total
    ratio = last_count.double() / count
    unnormalized = (last_var * last_count + new_unnormalized
                    + ratio / total * (last_sum / ratio - new_sum).square())
    return mean, unnormalized / total, total


def used_positions(batch: dict, options) -> torch.Tensor:
    """[batch, tokens] bool: the positions whose inputs the SVD sees."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if options.use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != options.label_mask_value)
    return mask


class _Inputs:
    """Forward hooks that keep each adapted layer's inputs at the used positions."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.mask: torch.Tensor | None = None
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._keeper(p)) for p, m in layers.items()]

    def _keeper(self, path: str):
        def keep(module, args, output):
            x = args[0]
            self.seen[path] = x[self.mask.to(x.device)].detach().float()
        return keep

    def run(self, model: nn.Module, batch: dict, options) -> dict[str, torch.Tensor]:
        self.seen, self.mask = {}, used_positions(batch, options)
        device = next(model.parameters()).device
        model(**{k: v.to(device) for k, v in batch.items()
                 if k in ("input_ids", "attention_mask", "position_ids")})
        return self.seen

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def eva_components(model: nn.Module, name: str, config, batches: Iterator[dict]
                   ) -> dict[str, torch.Tensor]:
    """module path -> A [rank, in] (rank 0 for a layer that gets none), PEFT's get_eva_state_dict
    on the model with adapter `name`'s layers as targets."""
    options = config.eva_config
    layers = {p: l for p, l in adapted_layers(model) if name in l.adapters}
    ranks = {p: l.adapters[name].r for p, l in layers.items()}
    rho = _bounded_rho(model, options.rho, config.r)
    most = {p: round(r * rho) for p, r in ranks.items()}
    training = model.training
    model.eval()
    hooks = _Inputs(layers)
    try:
        with torch.no_grad(), disable_adapters(model):
            first = next(batches)
            equal = _equal_inputs(hooks.run(model, first, options))
            pcas = _fit_until_stable(model, hooks, first, batches, options, most, equal, ranks)
    finally:
        hooks.remove()
        model.train(training)
    return _chosen(pcas, equal, ranks, most, options)


def _bounded_rho(model: nn.Module, rho: float, r: int) -> float:
    """PEFT's bound on a very high rho (above 1000): at most the largest dimension over r."""
    if rho <= 1000:
        return rho
    return min(rho, max(max(p.shape) for p in model.parameters()) // r)


def _equal_inputs(seen: dict[str, torch.Tensor]) -> dict[str, str]:
    """path -> the first layer (in model order) whose input equals its own (q/k/v share one)."""
    firsts: list[str] = []
    equal = {}
    for path, x in seen.items():
        same = next((f for f in firsts if torch.equal(seen[f], x)), None)
        if same is None:
            firsts.append(path)
        else:
            equal[path] = same
    # grouped as PEFT lists them (by the group's first layer): ties of explained variance
    # between equal layers are broken in this order
    return {p: f for f in firsts for p, s in equal.items() if s == f}


def _fit_until_stable(model, hooks: _Inputs, first: dict, batches, options, most, equal,
                      ranks) -> dict[str, InputPCA]:
    for path, same in equal.items():  # layers sharing an input share the largest k
        group = [p for p, s in equal.items() if s == same] + [same]
        most[path] = most[same] = max(most[p] for p in group)
    pcas = {p: InputPCA(most[p], options.tau) for p in most if p not in equal}
    budget = sum(ranks.values())
    dist = dict(most)
    fitting = dict.fromkeys(pcas, True)
    stream = _first_again(first, batches)
    for _ in range(MAX_BATCHES):
        batch = next(stream)
        for path, pca in pcas.items():
            fitting[path] = not bool(torch.all(pca.converged[:dist[path]]))
        if not any(fitting.values()):
            return pcas
        seen = hooks.run(model, batch, options)
        for path, pca in pcas.items():
            if fitting[path]:
                pca.fit(seen[path])
        if all(pca.components is not None for pca in pcas.values()):
            dist = _rank_distribution(pcas, equal, budget, most)
    raise AdapterError(f"init_lora_weights: eva: the layers' input SVDs did not settle within "
                       f"{MAX_BATCHES} batches (eva_config.tau={options.tau}); lower tau")


def _first_again(first: dict, batches: Iterator[dict]) -> Iterator[dict]:
    """PEFT hashes the inputs on the first batch, then starts the SVD from it again."""
    yield first
    yield from batches


def _rank_distribution(pcas: dict[str, InputPCA], equal: dict[str, str], budget: int,
                       most: dict[str, int]) -> dict[str, int]:
    """path -> rank: the `budget` components of highest explained variance ratio over all
    layers (a layer's first most[path]); of layers sharing an input, the one fitted gets the
    largest count."""
    owner = {**{p: p for p in pcas}, **equal}
    keys, values = zip(*[(p, c) for p, src in owner.items() for c in pcas[src].ratio[:most[p]]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    counts = {p: counts.get(p, 0) for p in owner}
    for path, src in equal.items():
        if counts[src] < counts[path]:
            counts[src], counts[path] = counts[path], counts[src]
    return counts


def _chosen(pcas, equal, ranks, most, options) -> dict[str, torch.Tensor]:
    budget = sum(ranks.values())
    dist = _rank_distribution(pcas, equal, budget, most)
    out = {}
    for path, rank in dist.items():
        pca = pcas[equal.get(path, path)]
        a = pca.components[:rank].clone()
        if options.whiten:
            a /= pca.singular[:rank].sqrt().reshape(-1, 1)
        out[path] = a
    return out


def apply_components(model: nn.Module, name: str, config, found: dict[str, torch.Tensor]
                     ) -> None:
    """Each layer's adapter rebuilt at its new rank with A = its components and B = 0 (alpha
    scaled by new/old rank with adjust_scaling_factors); a layer given rank 0 loses it."""
    layers = dict(adapted_layers(model))
    for path, a in found.items():
        layer = layers[path]
        old = layer.adapters[name]
        if a.shape[0] == 0:
            del layer.adapters[name]
            if not layer.adapters:
                set_submodule(model, path, layer.unwrap())
            continue
        alpha = old.alpha
        if a.shape[0] != old.r and config.eva_config.adjust_scaling_factors:
            alpha *= a.shape[0] / old.r
        new = new_layer_adapter(config, path, old.lora_A.shape[1], old.lora_B.shape[0],
                                r=a.shape[0], alpha=alpha, device=old.lora_A.device,
                                dtype=old.lora_A.dtype)
        with torch.no_grad():
            new.lora_A.copy_(a)
            new.lora_B.zero_()
        layer.adapters[name] = new
    mark_trainable(model, name)


class EvaHooks(TrainingHooks):
    """Fits the adapter to the run's first micro-batches before the optimizer is built."""

    def __init__(self, model: nn.Module, config, name: str):
        self.model, self.config, self.name = model, config, name
        self.ranks: dict[str, int] = {}

    def before_training(self, batches: Iterator[dict]) -> None:
        found = eva_components(self.model, self.name, self.config, batches)
        apply_components(self.model, self.name, self.config, found)
        self.ranks = {p: a.shape[0] for p, a in found.items()}

    def summary(self) -> dict:
        return {"eva_ranks": self.ranks} if self.ranks else {}


def eva_peft_fields(model: nn.Module, name: str, config) -> dict:
    """eva_config, and target_modules as the exact paths adapted: a layer EVA gave rank 0 has
    no adapter, and a leaf name (q_proj) would name it again (PEFT writes the paths too)."""
    paths = [canonical_path(p) for p, l in adapted_layers(model) if name in l.adapters]
    return {"eva_config": config.eva_config.model_dump(), "target_modules": sorted(paths)}


register_init(InitSpec("eva", peft_fields=eva_peft_fields, unused_fields={"eva_config": None},
                       hooks=lambda model, config, name, total: EvaHooks(model, config, name)))

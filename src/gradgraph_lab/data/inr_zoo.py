"""A zoo of SIRENs fit to scikit-learn's digits, their dilated targets, and editing gradients.

One item is one of the 1797 digit images of :func:`sklearn.datasets.load_digits`:

* **image** — the 8×8 digit scaled to ``[0, 1]`` and upsampled bilinearly to ``R × R``
  (``R = 16`` by default) on the pixel-centre grid ``linspace(-1, 1, R)²`` (corners
  aligned). Upsampling gives the 3×3 dilation room to act: on the native 8×8 grid it turns
  most digits into blobs.
* **INR** — a SIREN ``2 -> 32 -> 32 -> 1`` (``Linear -> Sine(ω₀) -> Linear -> Sine(ω₀) ->
  Linear``) with the usual initialisation (Sitzmann et al. 2020: first layer
  ``U(−1/in, 1/in)``, later layers ``U(−√(6/in)/ω₀, √(6/in)/ω₀)``, biases
  ``U(−1/√in, 1/√in)``, ``ω₀ = 30``), fit to the image by full-batch Adam on all ``R²``
  pixels. All networks of a shard are fit at once as stacked tensors (Adam is elementwise
  and the loss a sum over networks, so each network follows its own optimisation).
* **target** — :func:`dilate`: grey dilation of the image with a 3×3 window.
* **gradient inputs** — ``to_graph(inr, x_64, I_edited(x_64), loss_fn=(f − y)²)`` at
  64 fixed pixel centres drawn once (the same for every INR; pixel centres so that
  ``I_edited(x)`` is exact): the rank-1 factors of ``∇θ (f_θ(x_i) − I_edited(x_i))²``.

Everything is stacked (one architecture): ``weight [M, E]`` and ``bias [M, N]`` in graph
order, ``act``/``grad`` ``[M, N, 64]``; :class:`~gradgraph_lab.data.curvature.GraphBatcher`
builds PyG batches of them without a loop. The zoo is cached by
:class:`~gradgraph_lab.data.cache.ShardedCache`: resumable, never read as complete after an
interrupted build.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.convert import to_graph
from gradgraph_lab.data.cache import ShardedCache, default_cache_root
from gradgraph_lab.distributed import DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.modules import Sine

__all__ = [
    "InrLayout",
    "InrZoo",
    "InrZooConfig",
    "coordinate_grid",
    "dilate",
    "digit_images",
    "editing_graph",
    "editing_loss",
    "fit_sirens",
    "load_inr_zoo",
    "make_inr",
    "probe_indices",
    "psnr",
    "render",
    "siren_init",
]

NUM_DIGITS = 1797


@dataclass(frozen=True)
class InrZooConfig:
    """What the INR zoo holds. Every field is part of the cache key.

    Attributes:
        num_images: how many digits (the first ``num_images`` of the 1797).
        resolution: ``R``, side of the pixel grid the INRs are fit on (8 = native).
        hidden: hidden widths of every SIREN.
        w0: the sine frequency ``ω₀`` of every Sine layer.
        fit_steps: full-batch Adam steps per INR.
        fit_lr: Adam learning rate of the fit.
        num_probe_points: fixed random pixel centres the gradient inputs are taken at.
        seed: zoo seed; network ``i`` depends only on ``(seed, i)`` and the probe points on ``seed``.
        shard_size: networks per cache shard (the unit of resumption and of batched fitting).
    """

    num_images: int = NUM_DIGITS
    resolution: int = 16
    hidden: tuple[int, ...] = (32, 32)
    w0: float = 30.0
    fit_steps: int = 150
    fit_lr: float = 1e-3
    num_probe_points: int = 64
    seed: int = 0
    shard_size: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.num_images <= NUM_DIGITS:
            raise GradGraphError(f"InrZooConfig.num_images must lie in [1, {NUM_DIGITS}], got {self.num_images}")
        if self.resolution < 4:
            raise GradGraphError(f"InrZooConfig.resolution must be >= 4, got {self.resolution}")
        if not 1 <= self.num_probe_points <= self.resolution**2:
            raise GradGraphError(
                f"InrZooConfig.num_probe_points must lie in [1, resolution² = {self.resolution**2}], "
                f"got {self.num_probe_points}"
            )
        for name in ("fit_steps", "shard_size"):
            if getattr(self, name) < 1:
                raise GradGraphError(f"InrZooConfig.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "hidden", tuple(int(width) for width in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise GradGraphError(f"InrZooConfig.hidden needs widths >= 1, got {self.hidden}")

    def cache_key_fields(self) -> dict[str, Any]:
        """The JSON-able configuration hashed into the cache key (includes a format version)."""
        fields = dataclasses.asdict(self)
        fields["hidden"] = list(self.hidden)
        fields["format"] = 1
        return fields


# ----------------------------------------------------------------------------- images
def coordinate_grid(resolution: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """``[R², 2]`` pixel centres ``(row, col)`` of an ``R × R`` grid on ``[-1, 1]²``, row-major."""
    axis = torch.linspace(-1.0, 1.0, resolution, dtype=dtype, device=device)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def digit_images(num_images: int = NUM_DIGITS, resolution: int = 8) -> Tensor:
    """``[num_images, R, R]`` scikit-learn's digits in ``[0, 1]``, bilinearly upsampled to ``R``
    (corners aligned with the 8×8 grid; ``R = 8`` returns the originals)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:num_images], dtype=torch.float32) / 16.0
    if resolution == 8:
        return images
    upsampled = F.interpolate(images[:, None], size=(resolution, resolution), mode="bilinear", align_corners=True)
    return upsampled[:, 0].clamp(0.0, 1.0)


def dilate(images: Tensor, size: int = 3) -> Tensor:
    """Grey dilation with a ``size × size`` window: ``out[p] = max_{q ∈ window(p)} image[q]``.

    Pixels outside the image are ignored (max-pooling pads with −∞), the same as
    ``scipy.ndimage.grey_dilation(image, size=(size, size))``.

    Shapes: ``[..., R, R] -> [..., R, R]``.
    """
    if size < 1 or size % 2 == 0:
        raise GradGraphError(f"dilate: the window must be odd and >= 1, got {size}")
    if images.dim() < 2:
        raise GradGraphError(f"dilate: images must be [..., R, R], got {list(images.shape)}")
    leading = images.shape[:-2]
    flat = images.reshape(-1, 1, *images.shape[-2:])
    out = F.max_pool2d(flat, kernel_size=size, stride=1, padding=size // 2)
    return out.reshape(*leading, *images.shape[-2:])


def psnr(prediction: Tensor, target: Tensor, peak: float = 1.0) -> Tensor:
    """``[...]`` peak signal-to-noise ratio in dB over the last axis: ``10 log10(peak² / MSE)``."""
    mse = (prediction - target).square().mean(dim=-1).clamp_min(1e-20)
    return 10.0 * torch.log10(peak**2 / mse)


def probe_indices(config: InrZooConfig) -> Tensor:
    """``[num_probe_points]`` flat pixel indices of the fixed random probe points (sorted)."""
    generator = torch.Generator().manual_seed(config.seed * 7919 + 17)
    return torch.randperm(config.resolution**2, generator=generator)[: config.num_probe_points].sort().values


# ----------------------------------------------------------------------------- SIRENs
def make_inr(hidden: tuple[int, ...] = (32, 32), w0: float = 30.0, *, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """An (uninitialised-by-us) SIREN ``2 -> hidden -> 1``: ``Linear, Sine(w0), ..., Linear``.

    Its parameter names are ``"{2l}.weight"`` / ``"{2l}.bias"`` for layer ``l``.
    """
    widths = [2, *hidden, 1]
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(d_in, d_out, dtype=dtype))
        if index < len(widths) - 2:
            layers.append(Sine(w0))
    return nn.Sequential(*layers)


def siren_init(widths: list[int], w0: float, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """SIREN initialisation (Sitzmann et al. 2020) of one network: ``[(W [out, in], b [out])]`` per layer, float32."""
    params = []
    for index, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        bound = 1.0 / d_in if index == 0 else math.sqrt(6.0 / d_in) / w0
        weight = (torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        bias_bound = 1.0 / math.sqrt(d_in)
        bias = (torch.rand(d_out, generator=generator, dtype=torch.float64) * 2 - 1) * bias_bound
        params.append((weight.float(), bias.float()))
    return params


def render(layers: list[tuple[Tensor, Tensor]], coords: Tensor, w0: float) -> Tensor:
    """Batched SIREN forward: ``layers`` ``[(W [G, out, in], b [G, out])]``, ``coords [R², 2]`` -> ``[G, R²]``.

    The same function as :func:`make_inr`'s module with those parameters, for ``G``
    networks at once.
    """
    h = coords.expand(layers[0][0].shape[0], *coords.shape)
    for index, (weight, bias) in enumerate(layers):
        h = torch.einsum("gpi,goi->gpo", h, weight) + bias[:, None, :]
        if index < len(layers) - 1:
            h = torch.sin(w0 * h)
    return h[..., 0]


def fit_sirens(
    images: Tensor,
    config: InrZooConfig,
    generators: list[torch.Generator],
    advance: Callable[[int], Any] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Fit one SIREN per image, all at once (stacked parameters, full-batch Adam).

    Args:
        images: ``[M, R, R]`` images in ``[0, 1]``.
        config: architecture and fit settings.
        generators: one random source per network (its initialisation).
        advance: called with the (fractional) number of networks finished since its last
            call, ``M`` in all (progress bars).

    Returns:
        ``[(W [M, out, in], b [M, out])]`` per layer, float32.
    """
    widths = [2, *config.hidden, 1]
    inits = [siren_init(widths, config.w0, generator) for generator in generators]
    layers = [
        (torch.stack([net[layer][0] for net in inits]).requires_grad_(True),
         torch.stack([net[layer][1] for net in inits]).requires_grad_(True))
        for layer in range(len(widths) - 1)
    ]
    coords = coordinate_grid(config.resolution)
    pixels = images.reshape(images.shape[0], -1)
    optimizer = torch.optim.Adam([tensor for layer in layers for tensor in layer], lr=config.fit_lr)
    # The bar counts networks; fitting is most of the work, so it moves during the fit.
    report_every = max(1, config.fit_steps // 10)
    reported = 0.0
    with torch.enable_grad():
        for step in range(1, config.fit_steps + 1):
            # A sum over networks: each network's gradient is its own MSE's gradient.
            loss = (render(layers, coords, config.w0) - pixels).square().mean(dim=1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if advance is not None and (step % report_every == 0 or step == config.fit_steps):
                done = images.shape[0] * step / config.fit_steps
                advance(done - reported)
                reported = done
    return [(weight.detach(), bias.detach()) for weight, bias in layers]


def editing_loss(output: Tensor, target: Tensor) -> Tensor:
    """``[b]`` ``(f(x_i) − I_edited(x_i))²`` per point: the per-datapoint loss of the gradient inputs."""
    return (output - target).square().reshape(-1)


def editing_graph(inr: nn.Module, coords: Tensor, targets: Tensor) -> GradGraph:
    """``to_graph`` in loss mode: factors of ``∇θ (f(x_i) − y_i)²`` at ``coords [b, 2]``, ``targets [b]``."""
    return to_graph(inr, coords, targets[:, None], loss_fn=editing_loss)


def _module_from(layers: list[tuple[Tensor, Tensor]], index: int, config: InrZooConfig) -> nn.Sequential:
    inr = make_inr(config.hidden, config.w0, dtype=layers[0][0].dtype)
    linears = [module for module in inr if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, layers):
            linear.weight.copy_(weight[index])
            linear.bias.copy_(bias[index])
    return inr


# ----------------------------------------------------------------------------- layout
class InrLayout:
    """How the stacked per-edge / per-node values of the zoo's graphs map to SIREN layers.

    Built from one template graph: for each parameter of the SIREN, the edges (weights) or
    nodes (biases) that hold it, in the parameter's flat order — the batched form of
    :meth:`GradGraph.to_parameters` (and so of :func:`gradgraph.nn.outputs_to_parameters`).

    Args:
        template: a graph of the architecture.
        w0: the SIRENs' ``ω₀`` (for :meth:`render`).
    """

    def __init__(self, template: GradGraph, w0: float) -> None:
        self.w0 = w0
        self.names = list(template.param_names)
        self.shapes = [tuple(shape) for shape in template.param_shapes]
        self.gathers: list[tuple[str, Tensor]] = []  # per parameter: ("edge"|"node", indices in flat order)
        for index, name in enumerate(self.names):
            for kind, param, pos in (("edge", template.edge_param, template.edge_param_pos),
                                     ("node", template.node_param, template.node_param_pos)):
                rows = torch.nonzero(param == index).reshape(-1)
                if rows.numel():
                    order = rows[pos[rows].argsort()]
                    if order.numel() != math.prod(self.shapes[index]):
                        raise GradGraphError(f"InrLayout: parameter {name!r} is not covered by the graph's {kind}s")
                    self.gathers.append((kind, order))
                    break
            else:
                raise GradGraphError(f"InrLayout: parameter {name!r} has no edge or node in the graph")
        if len(self.names) % 2 or any(not name.endswith(("weight", "bias")) for name in self.names):
            raise GradGraphError(f"InrLayout: expected weight/bias pairs, got {self.names}")

    def to(self, device: Any) -> "InrLayout":
        """The same layout with its index tensors on ``device``."""
        self.gathers = [(kind, index.to(device)) for kind, index in self.gathers]
        return self

    def parameters(self, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
        """``{name: [G, *shape]}`` from ``weight [G, E]`` and ``bias [G, N]``."""
        result = {}
        for name, shape, (kind, index) in zip(self.names, self.shapes, self.gathers):
            values = weight if kind == "edge" else bias
            result[name] = values[:, index].reshape(values.shape[0], *shape)
        return result

    def layers(self, weight: Tensor, bias: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(W [G, out, in], b [G, out])]`` per SIREN layer."""
        params = self.parameters(weight, bias)
        return [(params[self.names[i]], params[self.names[i + 1]]) for i in range(0, len(self.names), 2)]

    def render(self, weight: Tensor, bias: Tensor, coords: Tensor) -> Tensor:
        """``[G, R²]`` the SIRENs with these graph values, evaluated at ``coords [R², 2]``."""
        return render(self.layers(weight, bias), coords, self.w0)


# ----------------------------------------------------------------------------- zoo
@dataclass
class InrZoo:
    """The zoo as stacked tensors (``M`` INRs, ``N`` nodes, ``E`` edges, ``B`` probe points, ``R²`` pixels).

    Attributes:
        config: what it was built from.
        template: one graph of the shared architecture; its slots are valid for every item.
        weight: ``[M, E]``; bias: ``[M, N]`` (0 for input nodes).
        act, grad: ``[M, N, B]`` loss-mode factors of ``∇θ (f(x_i) − I_edited(x_i))²``.
        image: ``[M, R²]`` the (upsampled) digit; target: ``[M, R²]`` its dilation.
        psnr: ``[M]`` fit quality of every INR against its image, dB.
        label: ``[M]`` the digit class (for pictures only).
    """

    config: InrZooConfig
    template: GradGraph
    weight: Tensor
    bias: Tensor
    act: Tensor
    grad: Tensor
    image: Tensor
    target: Tensor
    psnr: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.weight.shape[0])

    @property
    def coords(self) -> Tensor:
        """``[R², 2]`` the full pixel grid."""
        return coordinate_grid(self.config.resolution, device=self.weight.device)

    @property
    def probes(self) -> Tensor:
        """``[B]`` flat pixel indices of the probe points."""
        return probe_indices(self.config).to(self.weight.device)

    def layout(self) -> InrLayout:
        """The :class:`InrLayout` of the zoo's architecture."""
        return InrLayout(self.template, self.config.w0).to(self.weight.device)

    def inr(self, index: int) -> nn.Sequential:
        """INR ``index`` as an ``nn.Sequential`` (float32)."""
        layers = self.layout().layers(self.weight[index : index + 1], self.bias[index : index + 1])
        return _module_from(layers, 0, self.config)


_STACKED = ("weight", "bias", "act", "grad", "image", "target", "psnr", "label")


def template_graph(config: InrZooConfig) -> GradGraph:
    """A float32 graph of the zoo's architecture (zero values); the slots every item shares."""
    inr = make_inr(config.hidden, config.w0)
    return editing_graph(inr, torch.zeros(config.num_probe_points, 2), torch.zeros(config.num_probe_points))


def build_shard(config: InrZooConfig, indices: range, advance: Callable[[int], Any] | None = None) -> dict[str, Tensor]:
    """Fit and convert INRs ``indices`` of the zoo: ``{field: Tensor[len(indices), ...]}``."""
    from sklearn.datasets import load_digits

    images = digit_images(indices.stop, config.resolution)[indices.start : indices.stop]
    labels = torch.tensor(load_digits().target[indices.start : indices.stop], dtype=torch.long)
    targets = dilate(images)
    generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + index) for index in indices]
    # Fitting counts as 90% of an INR on the progress bar, conversion the other 10%.
    layers = fit_sirens(images, config, generators, None if advance is None else (lambda k: advance(0.9 * k)))
    coords = coordinate_grid(config.resolution)
    probes = probe_indices(config)
    pixels, target_pixels = images.reshape(len(indices), -1), targets.reshape(len(indices), -1)
    with torch.no_grad():
        fit_psnr = psnr(render(layers, coords, config.w0), pixels)
    rows: dict[str, list[Tensor]] = {"weight": [], "bias": [], "act": [], "grad": []}
    for item in range(len(indices)):
        graph = editing_graph(_module_from(layers, item, config), coords[probes], target_pixels[item, probes])
        rows["weight"].append(graph.weight)
        rows["bias"].append(graph.bias)
        rows["act"].append(graph.act)
        rows["grad"].append(graph.grad)
        if advance is not None:
            advance(0.1)
    shard = {key: torch.stack(values).float() for key, values in rows.items()}
    shard.update(image=pixels, target=target_pixels, psnr=fit_psnr, label=labels)
    return shard


def load_inr_zoo(config: InrZooConfig, *, cache_root: Path | str | None = None, progress: bool = True,
                 context: DistributedContext | None = None) -> InrZoo:
    """The INR zoo of ``config``, from the cache if it is complete, else built (resuming).

    Args:
        config: the zoo configuration (its hash keys the cache directory).
        cache_root: where caches live; default ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``.
        progress: tqdm bar over INRs while building.
        context: the processes sharing the cache (missing shards are split across ranks);
            default one process.

    Returns:
        An :class:`InrZoo` with ``config.num_images`` INRs, float32, on the CPU.
    """
    cache = ShardedCache(
        default_cache_root() if cache_root is None else cache_root,
        "inr-digits",
        config.cache_key_fields(),
        config.num_images,
        config.shard_size,
    )

    def make_shard(indices: range, advance: Callable[[int], Any]) -> dict[str, Tensor]:
        return build_shard(config, indices, advance)

    with torch.inference_mode(False):
        stacked = cache.load_or_build(make_shard, progress=progress, description="INR zoo (fit + gradients)",
                                     context=context)
    return InrZoo(config=config, template=template_graph(config), **{name: stacked[name] for name in _STACKED})

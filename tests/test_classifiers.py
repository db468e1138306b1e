"""Classifier loading: the packaged EfficientNet-Lite0 key mapping, a real cat photo, error paths."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from zsl_utils.classifiers import (
    load_classifier,
    map_lite0_keys,
    packaged_lite0_weights,
)
from zsl_utils.data.images import to_rgb
from zsl_utils.data.wnids import wnid_lemmas
from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

# The five domestic-cat classes of ImageNet-1K: tabby, tiger cat, Persian, Siamese, Egyptian cat.
DOMESTIC_CATS = {"n02123045", "n02123159", "n02123394", "n02123597", "n02124075"}


@pytest.fixture(scope="module")
def lite0():
    return load_classifier()


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(packaged_lite0_weights(), map_location="cpu", weights_only=True)


def test_key_mapping_is_a_bijection_onto_timm(checkpoint):
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    mapping = map_lite0_keys(checkpoint.keys(), model)
    target = model.state_dict()
    assert len(mapping) == len(checkpoint) == len(target) == 296
    assert set(mapping.values()) == set(target)
    assert all(checkpoint[k].shape == target[v].shape for k, v in mapping.items())
    # Spot checks of the nesting: flat block 1 is stage 1 block 0; block 15 is stage 6 block 0.
    assert mapping["_blocks.1._project_conv.weight"] == "blocks.1.0.conv_pwl.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.15._expand_conv.weight"] == "blocks.6.0.conv_pw.weight"
    assert mapping["_fc.bias"] == "classifier.bias"


def test_every_tensor_arrives(lite0, checkpoint):
    assert lite0.fingerprint["tensors_loaded"] == 296
    state = lite0.model.state_dict()
    mapping = map_lite0_keys(checkpoint.keys(), lite0.model)
    assert all(torch.equal(state[mapping[k]].cpu(), v) for k, v in checkpoint.items())


def test_fingerprint_names_weights_and_preprocessing(lite0):
    digest = hashlib.sha256(packaged_lite0_weights().read_bytes()).hexdigest()
    assert lite0.fingerprint["weights"]["sha256"] == digest
    assert lite0.fingerprint["preprocess"]["input_size"] == [3, 224, 224]
    assert lite0.wnids[0] == "n01440764" and len(lite0.wnids) == 1000


def test_chelsea_is_a_domestic_cat(lite0):
    batch = lite0.preprocess_images([Image.fromarray(data.chelsea())])
    probs = lite0.probabilities(batch)[0]
    top1 = lite0.wnids[int(probs.argmax())]
    assert top1 in DOMESTIC_CATS, wnid_lemmas([top1])
    cat_mass = sum(float(probs[lite0.wnids.index(w)]) for w in DOMESTIC_CATS)
    assert cat_mass > 0.5
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_pooled_features_feed_the_classifier(lite0):
    batch = lite0.preprocess_images([Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())])
    features = lite0.pooled_features(batch)
    assert features.shape == (2, 1280)
    with torch.inference_mode():
        relogits = lite0.model.classifier(features)
    torch.testing.assert_close(relogits, lite0.logits(batch), rtol=1e-4, atol=1e-4)


def test_probabilities_on_paths_and_transparent_png(lite0, tmp_path):
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    rgba.save(tmp_path / "stamp.png")
    probs = lite0.probabilities(lite0.preprocess_images([tmp_path / "stamp.png", Image.fromarray(data.chelsea())]))
    assert probs.shape == (2, 1000) and probs.dtype == torch.float32
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, atol=1e-5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataLayoutError, match="broken.png"):
        lite0.preprocess_images([tmp_path / "broken.png"])
    with pytest.raises(ParameterError, match=r"\[B, 3, H, W\]"):
        lite0.logits(torch.zeros(3, 224, 224))


def test_unknown_names_list_accepted_forms():
    with pytest.raises(ParameterError, match="Accepted forms: 'efficientnet_lite0'"):
        load_classifier("no_such_net")
    with pytest.raises(ParameterError, match="torchvision"):
        load_classifier("torchvision:no_such_net")
    with pytest.raises(AssetUnavailableError, match="no such file"):
        load_classifier(weights="/nonexistent/weights.pth")


def test_local_timm_checkpoint(tmp_path):
    torch.manual_seed(0)
    ten_class = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(ten_class.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DataLayoutError, match="does not fit architecture"):
        load_classifier("timm:resnet18", weights=tmp_path / "r18.pth")  # 1000 outputs expected
    wnids = sorted(DOMESTIC_CATS) + [f"n0000000{i}" for i in range(5)]
    loaded = load_classifier("timm:resnet18", weights=tmp_path / "r18.pth", wnids=wnids)
    assert loaded.wnids == wnids and loaded.pooled_features(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(DataLayoutError, match="pass wnids"):  # 3 WNIDs -> a 3-way head, checkpoint has 10
        load_classifier("timm:resnet18", weights=tmp_path / "r18.pth", wnids=wnids[:3])

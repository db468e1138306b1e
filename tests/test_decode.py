"""Faster extraction paths (issue 15): each decoder's cached outputs against the exact PIL path, channels_last in
float32, undecodable JPEGs skipped on the device path, and the out-of-memory back-off."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from zsl_utils.classifiers import load_classifier
from zsl_utils.data.images import imagenet_sample_photos, load_image_rgb
from zsl_utils import extract
from zsl_utils.errors import ParameterError
from zsl_utils.extract import ExtractionError, cached_outputs, make_encoder, read_for_device
from zsl_utils.scale.extract import ExtractionSpec


@pytest.fixture(scope="module")
def lite0():
    return load_classifier("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def photos(imagenet_sample) -> list[str]:
    return imagenet_sample_photos(imagenet_sample)["path"].tolist()[::125]  # 8 classes spread over the 1K


def probs(paths, classifier, root, decode="pil", **settings):
    outputs = cached_outputs("probs", [str(p) for p in paths], classifier, dataset_id="decode", cache_root=root,
                             batch_size=4, progress=False, decode=decode, **settings)
    return outputs.load().astype(np.float32), outputs


def upscaled(paths, folder, size):
    folder.mkdir(exist_ok=True)
    copies = [folder / f"{i}.jpg" for i in range(len(paths))]
    for path, copy in zip(paths, copies):
        Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(copy, quality=90)
    return copies


def test_from_uint8_equals_the_pil_transform_when_no_resampling_is_needed(lite0):
    # A 256 x 256 image: Resize(256) leaves it as is, so both paths do crop, /255, normalise on the same pixels.
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert lite0.preprocess.resize_size == 256
    assert torch.equal(lite0.preprocess.from_uint8(pil_to_tensor(image)), lite0.preprocess(image))


def test_pil_draft_is_exact_below_twice_the_resize_size(photos, lite0, tmp_path):
    exact, exact_run = probs(photos, lite0, tmp_path)
    draft, draft_run = probs(photos, lite0, tmp_path, decode="pil_draft")
    assert np.array_equal(exact, draft)  # shorter sides of 256 px: no DCT scaling applies
    assert exact_run.cache.directory != draft_run.cache.directory  # never one cache for two decoders


def test_pil_draft_decodes_large_jpegs_at_half_scale_within_tolerance(photos, lite0, tmp_path):
    large = upscaled(photos[:4], tmp_path / "large", (1100, 800))
    assert load_image_rgb(large[0], draft_size=256).size == (550, 400)  # 1/4 would give 275 x 200 < 256
    png = tmp_path / "large.png"
    Image.open(large[0]).save(png)
    assert load_image_rgb(png, draft_size=256).size == (1100, 800)  # not a JPEG: decoded as is
    exact, _ = probs(large, lite0, tmp_path)
    draft, _ = probs(large, lite0, tmp_path, decode="pil_draft")
    assert not np.array_equal(exact, draft)
    assert np.abs(exact - draft).max() < 0.1 and (exact.argmax(1) == draft.argmax(1)).all()


def test_torchvision_decoding_matches_pil_within_tolerance(photos, lite0, tmp_path):
    rgba = Image.new("RGBA", (300, 260), (200, 30, 30, 0))
    rgba.paste((20, 90, 200, 255), (50, 40, 250, 220))
    rgba.save(tmp_path / "stamp.png")  # not a JPEG: PIL decodes it in the loader, alpha on white
    paths = [*photos, tmp_path / "stamp.png"]
    exact, _ = probs(paths, lite0, tmp_path)
    fast, run = probs(paths, lite0, tmp_path, decode="torchvision")
    assert run.ok.all()
    assert np.abs(exact - fast).max() < 0.01 and (exact.argmax(1) == fast.argmax(1)).all()


def test_read_for_device_keeps_jpeg_bytes_and_decodes_the_rest(photos, tmp_path):
    data = read_for_device(photos[0])
    assert data.dtype == torch.uint8 and data.ndim == 1 and data.numpy().tobytes() == open(photos[0], "rb").read()
    Image.open(photos[0]).save(tmp_path / "a.png")
    assert torch.equal(read_for_device(tmp_path / "a.png"), pil_to_tensor(load_image_rgb(tmp_path / "a.png")))


def test_device_decoding_skips_undecodable_jpegs(photos, lite0, tmp_path):
    fake, truncated = tmp_path / "fake.jpg", tmp_path / "truncated.jpg"
    fake.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" + b"\xff\xd9")  # markers right: fails in decode_jpeg
    truncated.write_bytes(open(photos[1], "rb").read()[:3000])  # no end marker: PIL decodes it in the loader, fails
    mixed, run = probs([photos[0], fake, truncated, photos[2]], lite0, tmp_path, decode="torchvision")
    assert run.ok.tolist() == [True, False, False, True]
    reasons = dict(zip(run.skipped["row"], run.skipped["reason"]))
    assert reasons[1].startswith("decode_jpeg: ") and reasons[1].endswith("PIL: UnidentifiedImageError")
    assert reasons[2].startswith("OSError")
    clean, _ = probs([photos[0], photos[2]], lite0, tmp_path, decode="torchvision")
    assert np.array_equal(mixed[[0, 3]], clean) and not mixed[[1, 2]].any()


def test_device_decoding_falls_back_to_pil_for_what_decode_jpeg_refuses(photos, lite0, tmp_path, monkeypatch):
    refused, original, refusals = len(open(photos[1], "rb").read()), extract.decode_jpeg, []

    def decode_jpeg(data, **settings):  # refuses photos[1], as nvJPEG refuses CMYK JPEGs
        if any(len(d) == refused for d in (data if isinstance(data, list) else [data])):
            refusals.append(len(data) if isinstance(data, list) else 1)
            raise RuntimeError("unsupported (simulated)")
        return original(data, **settings)

    expected, _ = probs(photos[:3], lite0, tmp_path / "plain", decode="torchvision")
    monkeypatch.setattr(extract, "decode_jpeg", decode_jpeg)
    fallback, run = probs(photos[:3], lite0, tmp_path / "fallback", decode="torchvision")
    assert refusals == [3, 1] and run.ok.all()  # the batch, then photos[1] alone; PIL decodes it
    assert np.array_equal(fallback[[0, 2]], expected[[0, 2]]) and np.abs(fallback - expected).max() < 1e-2


def test_float32_channels_last_within_float32_kernel_noise(photos, lite0, tmp_path):
    cached, _ = probs(photos, lite0, tmp_path, dtype="float32")
    contiguous = lite0.probabilities(lite0.preprocess_images(photos)).numpy()
    assert np.abs(cached - contiguous).max() < 1e-5  # measured 7e-7, as large as AVX2 vs AVX-512 kernels differ
    weight = next(p for p in lite0.model.parameters() if p.ndim == 4)
    assert weight.dtype == torch.float32 and weight.is_contiguous()  # the caller's model is left as it was


def test_out_of_memory_backoff_halves_the_batch_and_keeps_the_outputs(photos, lite0, monkeypatch):
    encoder = make_encoder("probs", lite0, compute_dtype="float64")
    batch = lite0.preprocess_images(photos[:5])
    expected = encoder(batch)["probs"]
    forward = encoder.forward

    def small_memory(part):
        if len(part) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(part)

    monkeypatch.setattr(encoder, "forward", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = encoder(batch)["probs"]
    assert encoder.max_batch == 2 and "batches of 2" in str(caught[0].message)
    np.testing.assert_allclose(outputs.astype(np.float32), expected.astype(np.float32), atol=1e-3)

    def no_memory(part):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(encoder, "forward", no_memory)
    with pytest.raises(ExtractionError, match="one image does not fit in the memory of cpu"):
        with pytest.warns(UserWarning, match="batches of 1"):
            encoder(batch)


def test_decode_parameter_is_checked(lite0):
    with pytest.raises(ParameterError, match=r"decode='nvjpeg'; choose one of \('pil', 'pil_draft', 'torchvision'\)"):
        make_encoder("probs", lite0, decode="nvjpeg")
    with pytest.raises(ParameterError, match="applies to images"):
        make_encoder("text_features", "tfidf", decode="torchvision")
    with pytest.raises(ParameterError, match="decode='gpu'"):
        ExtractionSpec(kind="probs", images_root="photos", decode="gpu")
    assert "--decode" in make_encoder("probs", lite0, decode="pil_draft").cli_args()

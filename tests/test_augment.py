"""trainer.augment: online presets (shapes, dtype, normalisation from the spec, magnitudes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from edgetune.errors import ConfigError
from edgetune.preprocess import PreprocessSpec
from trainer.augment import PRESETS, build_augment

SPEC = PreprocessSpec(input_size=(32, 32), resize=40)


def _image() -> tuple[np.ndarray, torch.Tensor]:
    """A real photo (scikit-image astronaut) resized by the spec, as HWC numpy and CHW uint8 tensor."""
    img = SPEC.resize_image(skdata.astronaut()[100:300, 150:350])
    return img, torch.from_numpy(img).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_give_normalised_float_tensors_of_the_input_size(preset: str) -> None:
    torch.manual_seed(0)
    img, x = _image()
    aug = build_augment(preset, SPEC, 1.0)
    eval_x = torch.from_numpy(SPEC.normalize(SPEC.center_crop(img)))
    outs = [aug(x) for _ in range(8)]
    for o in outs:
        assert o.shape == (3, 32, 32) and o.dtype == torch.float32 and torch.isfinite(o).all()
    assert x.dtype == torch.uint8  # input untouched
    if preset == "none":
        for o in outs:  # just the centre crop: the evaluation transform
            assert torch.allclose(o, eval_x, atol=1e-5)
    else:
        assert sum(not torch.allclose(o, eval_x, atol=1e-3) for o in outs) >= 6  # augmented
        assert sum(not torch.allclose(outs[0], o, atol=1e-3) for o in outs[1:]) >= 5  # random


def test_normalisation_comes_from_the_spec() -> None:
    grey = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    grey[0] = 200
    for mean, std in (((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        spec = PreprocessSpec(input_size=(32, 32), resize=40, mean=mean, std=std)
        out = build_augment("none", spec)(grey)
        for c, v in enumerate((200, 128, 128)):
            assert torch.allclose(out[c], torch.tensor((v / 255 - mean[c]) / std[c]), atol=1e-5)
    bgr = PreprocessSpec(input_size=(32, 32), resize=40, channel_order="BGR", mean=(0.5,) * 3, std=(0.5,) * 3)
    out = build_augment("graphite", bgr, 0.0)(grey)  # strength 0: centre crop (+ flip, invisible here)
    assert torch.allclose(out[2], torch.tensor(200 / 255 / 0.5 - 1), atol=1e-5)  # red is the last channel


def test_strength_zero_graphite_is_centre_crop_or_its_mirror() -> None:
    img, x = _image()
    eval_x = torch.from_numpy(SPEC.normalize(SPEC.center_crop(img)))
    for _ in range(6):
        o = build_augment("graphite", SPEC, 0.0)(x)
        assert torch.allclose(o, eval_x, atol=1e-5) or torch.allclose(o, eval_x.flip(-1), atol=1e-5)


def test_rock_noise_has_variance_0_01_and_scales_with_strength() -> None:
    torch.manual_seed(1)
    flat = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    unit = PreprocessSpec(input_size=(32, 32), resize=40, mean=(0.0,) * 3, std=(1.0,) * 3)  # output in [0, 1] units

    def centre_std(strength: float) -> float:
        aug = build_augment("rock", unit, strength)
        return float(np.mean([aug(flat)[:, 12:20, 12:20].std().item() for _ in range(30)]))

    s1 = centre_std(1.0)
    assert 0.08 < s1 < 0.12  # sigma = 0.1 -> variance 0.01
    assert centre_std(0.5) < 0.07 and centre_std(0.0) < 1e-6


def test_invalid_presets_and_inputs_are_rejected() -> None:
    with pytest.raises(ConfigError, match="preset must be one of"):
        build_augment("autoaugment", SPEC)
    with pytest.raises(ConfigError, match=r"strength must be a number in \[0, 2\]"):
        build_augment("rock", SPEC, 3.0)
    aug = build_augment("garbage", SPEC)
    with pytest.raises(ConfigError, match="uint8"):
        aug(torch.zeros(3, 40, 40))
    with pytest.raises(ConfigError, match="smaller than the input size"):
        aug(torch.zeros(3, 16, 16, dtype=torch.uint8))

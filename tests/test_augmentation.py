"""The batched training augmentation against torchvision's per-image transforms: each operation exactly (for the
same parameters), and the whole pipeline statistically (same distributions, independent draws per image)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from dwvit.training.augmentation import (
    AugmentationConfig,
    BatchAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    build_train_transform,
    normalize,
    random_resized_crop_boxes,
    resized_crop,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def smooth_images(batch, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (batch, 3, size, size), generator=generator).float()
    return torch.nn.functional.avg_pool2d(noise, 3, 1, 1).round().to(torch.uint8)


@pytest.mark.parametrize("source, scale", [(32, (0.08, 1.0)), (64, (0.3, 1.0))])
def test_resized_crop_equals_torchvision_antialiased_bicubic(source, scale):
    torch.manual_seed(1)
    images = smooth_images(48, source)
    boxes = random_resized_crop_boxes(48, source, source, scale)
    got = resized_crop(images, boxes, (32, 32))
    # torchvision's float path (crop, antialiased bicubic resize, round) is the reference: the same weights,
    # summed in another order, so a value can round the other way only when it lies within float error of .5 ...
    reference = torch.stack([
        TF.resized_crop(images[i].float(), *boxes[i].tolist(), size=[32, 32],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
        for i in range(len(images))
    ]).clamp(0, 255).round().to(torch.uint8)
    difference = (got.int() - reference.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3
    # ... and its uint8 kernel, fixed-point, differs by at most one level.
    uint8_path = torch.stack([
        TF.resized_crop(images[i], *boxes[i].tolist(), size=[32, 32],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
        for i in range(len(images))
    ])
    assert (got.int() - uint8_path.int()).abs().max() <= 1


def test_crop_boxes_follow_random_resized_crop_distribution():
    torch.manual_seed(2)
    count, size = 20000, 32
    boxes = random_resized_crop_boxes(count, size, size, (0.08, 1.0))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= size).all() and (left + width <= size).all()
    reference = v2.RandomResizedCrop(size, scale=(0.08, 1.0))
    image = torch.zeros(3, size, size)
    drawn = torch.tensor([
        [p["top"], p["left"], p["height"], p["width"]]
        for p in (reference.make_params([image]) for _ in range(count))
    ])
    for column in range(4):
        ours, theirs = boxes[:, column].float(), drawn[:, column].float()
        assert abs(ours.mean() - theirs.mean()) < 0.25, column
        for q in (0.1, 0.5, 0.9):
            assert abs(ours.quantile(q) - theirs.quantile(q)) <= 1, (column, q)


@pytest.mark.parametrize("ours, theirs", [
    (adjust_brightness, TF.adjust_brightness),
    (adjust_contrast, TF.adjust_contrast),
    (adjust_saturation, TF.adjust_saturation),
])
def test_color_operations_with_per_image_factors_match_torchvision(ours, theirs):
    images = smooth_images(32, seed=3)
    factors = torch.empty(32).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(4))
    got = ours(images.float(), factors)
    expected = torch.stack([theirs(images[i], float(factors[i])) for i in range(32)])
    difference = (got.int() - expected.int()).abs()
    # Same formulas; a float product can land on the other side of an integer once in a few thousand pixels.
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def test_each_rand_augment_operation_matches_torchvision():
    images = smooth_images(8, seed=5)
    augmentation = BatchAugmentation(32, MEAN, STD)
    reference = v2.RandAugment(num_ops=1, magnitude=9)
    names = list(reference._AUGMENTATION_SPACE)
    ops = augmentation.rand_augment_ops(32, 32)
    assert len(ops) == len(names) == 14
    for (op, signed), name in zip(ops, names):
        magnitudes_fn, reference_signed = reference._AUGMENTATION_SPACE[name]
        assert signed == reference_signed, name
        magnitudes = magnitudes_fn(31, 32, 32)
        for sign in (-1.0, 1.0) if signed else (1.0,):
            magnitude = 0.0 if magnitudes is None else sign * float(magnitudes[9])
            expected = torch.stack([
                reference._apply_image_or_video_transform(image, name, magnitude, InterpolationMode.NEAREST, {})
                for image in images
            ])
            assert torch.equal(op(images, sign), expected), (name, sign)


def test_every_image_draws_its_own_augmentation():
    torch.manual_seed(6)
    one_image = smooth_images(1, seed=7).expand(64, -1, -1, -1).contiguous()
    for config in (
        AugmentationConfig(),
        AugmentationConfig(crop_scale_min=1.0, horizontal_flip_prob=0, color_jitter=0, random_erasing_prob=0),
        AugmentationConfig(crop_scale_min=1.0, horizontal_flip_prob=0, rand_augment=False, random_erasing_prob=0),
    ):
        out = BatchAugmentation(32, MEAN, STD, config)(one_image)
        distinct = len({tuple(row.flatten()[::97].tolist()) for row in out})
        assert distinct > 32, (config, distinct)


def test_random_erasing_rate_and_area_follow_torchvision():
    torch.manual_seed(8)
    augmentation = BatchAugmentation(32, MEAN, STD, AugmentationConfig(random_erasing_prob=0.25))
    images = torch.ones(4000, 3, 32, 32)
    erased = augmentation.random_erasing(images)
    zero_fraction = (erased[:, 0] == 0).float().mean(dim=(1, 2))
    rate = (zero_fraction > 0).float().mean().item()
    assert abs(rate - 0.25) < 0.03
    areas = zero_fraction[zero_fraction > 0]
    reference = v2.RandomErasing(p=1.0, value=0)
    expected = torch.stack([(reference(torch.ones(3, 32, 32))[0] == 0).float().mean() for _ in range(2000)])
    expected = expected[expected > 0]
    assert areas.min() >= 0.015 and areas.max() <= 0.35
    assert abs(areas.mean() - expected.mean()) < 0.01


def test_whole_pipeline_matches_per_image_torchvision_statistics():
    """Per-image channel means, spreads and erased shares over many draws agree with the per-image reference
    within four standard errors (a two-sample z-test on each statistic)."""
    torch.manual_seed(9)
    images = smooth_images(16, seed=10)
    batch = BatchAugmentation(32, MEAN, STD)
    reference = build_train_transform(32, MEAN, STD)
    draws = 150
    ours = torch.cat([batch(images) for _ in range(draws)])
    theirs = torch.stack([reference(image) for _ in range(draws) for image in images])
    statistics = {
        "channel mean": lambda x: x.mean(dim=(2, 3)),
        "channel spread": lambda x: x.std(dim=(2, 3)),
        "erased share": lambda x: (x == 0).all(dim=1).float().mean(dim=(1, 2))[:, None],
    }
    for name, statistic in statistics.items():
        a, b = statistic(ours), statistic(theirs)
        standard_error = torch.sqrt(a.var(dim=0) / len(a) + b.var(dim=0) / len(b))
        z = (a.mean(dim=0) - b.mean(dim=0)).abs() / standard_error
        assert (z < 4).all(), (name, z)


def test_normalize_matches_to_dtype_and_normalize():
    images = smooth_images(4, seed=11)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(MEAN), list(STD))
    torch.testing.assert_close(normalize(images, MEAN, STD), expected, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_expected_dtype():
    with pytest.raises(ValueError, match="uint8"):
        BatchAugmentation(32, MEAN, STD)(torch.zeros(2, 3, 32, 32))

"""The paper's training augmentation, applied to whole batches with independent draws per image.

torchvision's transforms draw their parameters and dispatch their kernels once per image; on 32x32 images that
per-call overhead, not the pixel work, is most of the cost (about 2 ms an image here, a third of a CPU training
step). `BatchAugmentation` draws every image's parameters as tensors and applies each operation to the batch at
once, with the same distributions as the per-image `torchvision.transforms.v2` pipeline of
`build_train_transform`, which stays as the reference (and the per-sample path for images of mixed sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF


@dataclass
class AugmentationConfig:
    """The paper's training augmentation (its defaults); each part can be turned off."""

    crop_scale_min: float = 0.08
    horizontal_flip_prob: float = 0.5
    rand_augment: bool = True
    rand_augment_num_ops: int = 2
    rand_augment_magnitude: int = 9
    color_jitter: float = 0.4
    random_erasing_prob: float = 0.25


CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)
RAND_AUGMENT_BINS = 31


def build_train_transform(image_size, image_mean, image_std, augmentation: AugmentationConfig | None = None):
    """Per-image reference pipeline: RandomResizedCrop, flip, RandAugment, color jitter, normalise, erasing."""
    augmentation = augmentation or AugmentationConfig()
    steps = [v2.ToImage(), *sample_crop_steps(image_size, augmentation)]
    if augmentation.rand_augment:
        steps.append(
            v2.RandAugment(num_ops=augmentation.rand_augment_num_ops, magnitude=augmentation.rand_augment_magnitude)
        )
    if augmentation.color_jitter > 0:
        strength = augmentation.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(image_mean), list(image_std))]
    if augmentation.random_erasing_prob > 0:
        steps.append(v2.RandomErasing(p=augmentation.random_erasing_prob, value=0))
    return v2.Compose(steps)


def sample_crop_steps(image_size, augmentation: AugmentationConfig) -> list:
    """RandomResizedCrop (or resize) and flip: the per-image part for datasets whose images differ in size."""
    size = size_pair(image_size)
    if augmentation.crop_scale_min < 1.0:
        steps = [
            v2.RandomResizedCrop(
                size, scale=(augmentation.crop_scale_min, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        ]
    else:
        steps = [v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if augmentation.horizontal_flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(augmentation.horizontal_flip_prob))
    return steps


def build_eval_transform(image_size, crop_ratio: float = 0.875):
    """Resize to `size / crop_ratio` (bicubic) and center-crop `size` (the paper's 256 -> 224); uint8 out."""
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"eval_crop_ratio must lie in (0, 1]; got {crop_ratio}.")
    size = size_pair(image_size)
    resized = tuple(int(math.floor(side / crop_ratio + 0.5)) for side in size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resized, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )


def size_pair(image_size) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 `(B, C, H, W)` -> float32 scaled to [0, 1] and normalised per channel."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return (images.float() - 255.0 * mean) * scale


def _uniform(batch: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(batch).uniform_(low, high)


def _randint_below(high: torch.Tensor) -> torch.Tensor:
    """One integer in `[0, high)` per entry (`high >= 1`)."""
    return (torch.rand(high.shape) * high).floor().long().clamp_(max=high - 1)


def _first_valid_attempt(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(found, attempt)` per image: whether any of the attempts (dim 1) was valid, and the first that was."""
    found = valid.any(dim=1)
    attempt = torch.where(found, valid.float().argmax(dim=1), torch.zeros_like(found, dtype=torch.long))
    return found, attempt


def random_resized_crop_boxes(batch: int, height: int, width: int, scale, ratio=CROP_RATIO) -> torch.Tensor:
    """`(top, left, crop_height, crop_width)` per image, drawn as `v2.RandomResizedCrop` does: up to ten tries of
    area and log-uniform aspect ratio, else the centred crop of the clamped aspect ratio."""
    attempts = 10
    area = height * width
    target_area = area * torch.empty(batch, attempts).uniform_(scale[0], scale[1])
    aspect = torch.exp(torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    found, attempt = _first_valid_attempt(valid)
    crop_w = crop_w.gather(1, attempt[:, None]).squeeze(1).long()
    crop_h = crop_h.gather(1, attempt[:, None]).squeeze(1).long()
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)
    top = torch.where(found, _randint_below(height - crop_h + 1), (height - crop_h) // 2)
    left = torch.where(found, _randint_below(width - crop_w + 1), (width - crop_w) // 2)
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic convolution kernel of PIL and of `interpolate(..., antialias=True)` (a = -0.5)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def antialiased_bicubic_weights(start: torch.Tensor, length: torch.Tensor, input_size: int, output_size: int):
    """`(B, output_size, input_size)` matrices that resize the span `[start, start + length)` of each row to
    `output_size` samples exactly as antialiased bicubic interpolation of the cropped span does: the kernel is
    widened by the downscaling factor, taps outside the span are dropped and each row's weights sum to one."""
    length = length.double()[:, None, None]
    scale = length / output_size
    support_scale = scale.clamp(min=1.0)
    centre = (torch.arange(output_size, dtype=torch.float64)[None, :, None] + 0.5) * scale
    position = torch.arange(input_size, dtype=torch.float64)[None, None, :] - start.double()[:, None, None]
    weights = _cubic((position - centre + 0.5) / support_scale)
    weights = torch.where((position >= 0) & (position < length), weights, torch.zeros_like(weights))
    return (weights / weights.sum(dim=-1, keepdim=True)).float()


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each uint8 image to its `(top, left, height, width)` box and resize it to `size` (antialiased bicubic),
    as two batched matrix products: one per axis, the way the separable kernel works."""
    rows = antialiased_bicubic_weights(boxes[:, 0], boxes[:, 2], images.shape[-2], size[0])
    cols = antialiased_bicubic_weights(boxes[:, 1], boxes[:, 3], images.shape[-1], size[1])
    resized = rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.unbind(dim=-3)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).floor_().unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = ratio.view(-1, 1, 1, 1)
    return (images * ratio + other * (1.0 - ratio)).clamp_(0, 255).to(torch.uint8)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def _rand_augment_ops(height: int, width: int, magnitude_index: int) -> list:
    """RandAugment's fourteen operations at one magnitude, each `(function(images, sign), signed)`, with the
    magnitudes of `v2.RandAugment`; geometric operations use nearest sampling and fill 0 as it does."""

    def bin_value(low, high):
        return float(torch.linspace(low, high, RAND_AUGMENT_BINS)[magnitude_index])

    shear = math.degrees(math.atan(bin_value(0.0, 0.3)))
    translate_x, translate_y = bin_value(0.0, 150.0 / 331.0 * width), bin_value(0.0, 150.0 / 331.0 * height)
    rotate, enhance = bin_value(0.0, 30.0), bin_value(0.0, 0.9)
    bits = int((8 - (torch.arange(RAND_AUGMENT_BINS) / ((RAND_AUGMENT_BINS - 1) / 4))).round().int()[magnitude_index])
    threshold = 255.0 * bin_value(1.0, 0.0)
    nearest = InterpolationMode.NEAREST

    def affine(images, sign, translate=(0, 0), shear_xy=(0.0, 0.0), center=None):
        return TF.affine(images, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear_xy),
                         interpolation=nearest, fill=None, center=center)

    return [
        (lambda images, sign: images, False),
        (lambda images, sign: affine(images, sign, shear_xy=(sign * shear, 0.0), center=[0, 0]), True),
        (lambda images, sign: affine(images, sign, shear_xy=(0.0, sign * shear), center=[0, 0]), True),
        (lambda images, sign: affine(images, sign, translate=(int(sign * translate_x), 0)), True),
        (lambda images, sign: affine(images, sign, translate=(0, int(sign * translate_y))), True),
        (lambda images, sign: TF.rotate(images, angle=sign * rotate, interpolation=nearest, fill=None), True),
        (lambda images, sign: TF.adjust_brightness(images, 1.0 + sign * enhance), True),
        (lambda images, sign: TF.adjust_saturation(images, 1.0 + sign * enhance), True),
        (lambda images, sign: TF.adjust_contrast(images, 1.0 + sign * enhance), True),
        (lambda images, sign: TF.adjust_sharpness(images, 1.0 + sign * enhance), True),
        (lambda images, sign: TF.posterize(images, bits=bits), False),
        (lambda images, sign: TF.solarize(images, threshold=threshold), False),
        (lambda images, sign: TF.autocontrast(images), False),
        (lambda images, sign: TF.equalize(images), False),
    ]


class BatchAugmentation:
    """The paper's training augmentation on a uint8 batch `(B, 3, H, W)`, each image with its own draws.

    Order and distributions follow `build_train_transform`: RandomResizedCrop (antialiased bicubic), horizontal
    flip, RandAugment, color jitter in a random order per image, scaling and normalisation, random erasing.
    Draws come from the global torch generator, so the caller seeds it. `crop=False` leaves out the crop and flip
    (images of mixed sizes were already cropped per sample).
    """

    def __init__(self, image_size, image_mean, image_std, config: AugmentationConfig | None = None, crop: bool = True):
        self.size = size_pair(image_size)
        self.mean, self.std = tuple(image_mean), tuple(image_std)
        self.config = config or AugmentationConfig()
        self.crop = crop
        self._ops_cache: dict = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"BatchAugmentation expects uint8 images (B, C, H, W); got {images.dtype} {tuple(images.shape)}.")
        config = self.config
        if self.crop:
            images = self.crop_and_flip(images)
        elif tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"Images are {tuple(images.shape[-2:])}; expected the cropped size {self.size}.")
        if config.rand_augment:
            images = self.rand_augment(images)
        if config.color_jitter > 0:
            images = self.color_jitter(images)
        output = normalize(images, self.mean, self.std)
        if config.random_erasing_prob > 0:
            output = self.random_erasing(output)
        return output

    def crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        if self.config.crop_scale_min < 1.0:
            boxes = random_resized_crop_boxes(batch, height, width, (self.config.crop_scale_min, 1.0))
            images = resized_crop(images, boxes, self.size)
        elif (height, width) != self.size:
            images = TF.resize(images, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.config.horizontal_flip_prob > 0:
            flip = torch.rand(batch) < self.config.horizontal_flip_prob
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return images

    def rand_augment_ops(self, height: int, width: int) -> list:
        """RandAugment's operations for this image size, `(function(images, sign), signed)` in torchvision's order."""
        key = (height, width, self.config.rand_augment_magnitude)
        if key not in self._ops_cache:
            self._ops_cache[key] = _rand_augment_ops(height, width, self.config.rand_augment_magnitude)
        return self._ops_cache[key]

    def rand_augment(self, images: torch.Tensor) -> torch.Tensor:
        """Each image draws its operations (uniformly of 14) and signs; images sharing an (operation, sign) pair
        go through torchvision's kernel together, since the magnitude is fixed."""
        batch, _, height, width = images.shape
        ops = self.rand_augment_ops(height, width)
        for _ in range(self.config.rand_augment_num_ops):
            choice = torch.randint(len(ops), (batch,))
            negative = torch.rand(batch) <= 0.5
            output = images.clone()
            for index, (op, signed) in enumerate(ops):
                for sign in ((-1.0, 1.0) if signed else (1.0,)):
                    selected = choice == index
                    if signed:
                        selected &= negative if sign < 0 else ~negative
                    rows = selected.nonzero().squeeze(1)
                    if len(rows):
                        output[rows] = op(images[rows], sign)
            images = output
        return images

    def color_jitter(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation factors uniform in `[1 - s, 1 + s]`, applied in a random order per
        image (the fourth slot of `v2.ColorJitter`'s permutation, hue, is off)."""
        batch = images.shape[0]
        strength = self.config.color_jitter
        low = max(0.0, 1.0 - strength)
        order = torch.rand(batch, 4).argsort(dim=1)
        factors = [_uniform(batch, low, 1.0 + strength) for _ in range(3)]
        adjust = (adjust_brightness, adjust_contrast, adjust_saturation)
        for slot in range(4):
            output = images.clone()
            for op in range(3):
                rows = (order[:, slot] == op).nonzero().squeeze(1)
                if len(rows):
                    output[rows] = adjust[op](images[rows].float(), factors[op][rows])
            images = output
        return images

    def random_erasing(self, images: torch.Tensor) -> torch.Tensor:
        """Zero one rectangle per image with the configured probability, drawn as `v2.RandomErasing` does."""
        batch, _, height, width = images.shape
        attempts = 10
        apply = torch.rand(batch) < self.config.random_erasing_prob
        erase_area = height * width * torch.empty(batch, attempts).uniform_(*ERASING_SCALE)
        aspect = torch.exp(torch.empty(batch, attempts).uniform_(math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])))
        box_h = torch.round(torch.sqrt(erase_area * aspect))
        box_w = torch.round(torch.sqrt(erase_area / aspect))
        found, attempt = _first_valid_attempt((box_h < height) & (box_w < width))
        box_h = box_h.gather(1, attempt[:, None]).squeeze(1).long()
        box_w = box_w.gather(1, attempt[:, None]).squeeze(1).long()
        top = _randint_below((height - box_h + 1).clamp(min=1))
        left = _randint_below((width - box_w + 1).clamp(min=1))
        rows = torch.arange(height)[None, :]
        cols = torch.arange(width)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
        mask = (in_rows[:, :, None] & in_cols[:, None, :]) & (apply & found)[:, None, None]
        return images.masked_fill(mask[:, None], 0.0)


class ImageBatchCollator:
    """Stack uint8 samples into a batch; training batches are augmented and mixed, evaluation batches normalised.

    Training batches are recognised by their per-sample seeds (see `ImageClassificationDataset`), from which the
    batch's own seed is made: augmentation, Mixup/CutMix and label smoothing are as reproducible as the data
    order. Training labels become soft (mixed and smoothed) probabilities; evaluation keeps integer labels.
    """

    def __init__(self, num_labels: int, image_mean, image_std, augmentation: BatchAugmentation | None = None,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1):
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off); got {value}.")
        for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]; got {value}.")
        self.num_labels = num_labels
        self.mean, self.std = tuple(image_mean), tuple(image_std)
        self.augmentation = augmentation
        self.prob = prob
        self.label_smoothing = label_smoothing
        mixers, weights = [], []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mixer = v2.RandomChoice(mixers, p=weights) if mixers and prob > 0 else None

    @property
    def mixes(self) -> bool:
        return self.mixer is not None

    def __call__(self, samples: list[dict]) -> dict:
        pixels = torch.stack([sample["pixel_values"] for sample in samples])
        labels = torch.tensor([sample["labels"] for sample in samples], dtype=torch.long)
        if pixels.dtype != torch.uint8:
            raise ValueError(f"ImageBatchCollator expects uint8 pixel_values; got {pixels.dtype}.")
        if "sample_seed" not in samples[0]:
            if (labels < 0).any():  # unlabelled images (-1), only ever predicted: the model gets no labels
                return {"pixel_values": normalize(pixels, self.mean, self.std)}
            return {"pixel_values": normalize(pixels, self.mean, self.std), "labels": labels}
        batch_seed = hash(tuple(sample["sample_seed"] for sample in samples)) % (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(batch_seed)
            if self.augmentation is not None:
                pixel_values = self.augmentation(pixels)
            else:
                pixel_values = normalize(pixels, self.mean, self.std)
            if self.mixer is None and self.label_smoothing == 0:
                return {"pixel_values": pixel_values, "labels": labels}
            if self.mixer is not None and torch.rand(()).item() < self.prob:
                pixel_values, soft = self.mixer(pixel_values, labels)
            else:
                soft = torch.nn.functional.one_hot(labels, self.num_labels).float()
        soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_labels
        return {"pixel_values": pixel_values, "labels": soft}


__all__ = [
    "AugmentationConfig",
    "BatchAugmentation",
    "ImageBatchCollator",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "antialiased_bicubic_weights",
    "build_eval_transform",
    "build_train_transform",
    "normalize",
    "random_resized_crop_boxes",
    "resized_crop",
    "sample_crop_steps",
]

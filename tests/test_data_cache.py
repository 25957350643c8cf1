"""Decoding once: `scan_images` finds unreadable images, keeps decoded images of one size, and a second run with
the same data answers from its cache without decoding anything."""

from __future__ import annotations

import io
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import dwvit.training.data as data
from dwvit.training.data import ImageClassificationDataset, apply_unreadable_policy, decode_image, scan_images, without_decoding


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def on_disk_dataset(tmp_path, sizes, broken=()):
    """A dataset stored on disk (so it has a fingerprint and cache files), images in the Hub's schema."""
    rng = np.random.default_rng(0)
    cells, labels = [], []
    for index, size in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        cells.append({"bytes": b"not an image" if index in broken else png(pixels), "path": f"img{index}.png"})
        labels.append(index % 3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features).save_to_disk(tmp_path / "ds")
    return without_decoding(datasets.load_from_disk(tmp_path / "ds"), "image")


def test_images_of_one_size_are_kept_decoded_and_unreadable_ones_listed(tmp_path):
    dataset = on_disk_dataset(tmp_path, [8] * 6, broken={2})
    scan = scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    assert [index for index, _, _ in scan.unreadable] == [2]
    assert scan.unreadable[0][1] == "img2.png"
    assert scan.images is not None and scan.images.shape == (6, 8, 8, 3) and not scan.from_cache
    for index in (0, 1, 3, 5):
        expected = torch.from_numpy(np.array(decode_image(dataset[index]["image"]))).permute(2, 0, 1)
        assert torch.equal(scan.images[index], expected)
    assert apply_unreadable_policy(scan, len(dataset), "train", "skip") == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="1 unreadable image.*img2.png"):
        apply_unreadable_policy(scan, len(dataset), "train", "error")


def test_a_second_scan_answers_from_the_cache_without_decoding(tmp_path, monkeypatch):
    dataset = on_disk_dataset(tmp_path, [8] * 5, broken={4})
    first = scan_images(dataset, "image", cache_dir=tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache could answer")

    monkeypatch.setattr(data, "decode_image", refuse)
    second = scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    assert second.from_cache and second.unreadable == first.unreadable
    assert torch.equal(second.images[3], first.images[3])


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    dataset = on_disk_dataset(tmp_path, [8] * 4)
    scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    (stored,) = (tmp_path / "cache").glob("*.u8")
    with open(stored, "r+b") as handle:
        handle.truncate(10)  # as if a run was killed while another one rewrote it
    (tmp_path / "cache" / "leftover.u8.tmp-123").write_bytes(b"partial")
    again = scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    assert not again.from_cache and again.images.shape == (4, 8, 8, 3)
    assert os.path.getsize(stored) == 4 * 8 * 8 * 3


def test_mixed_sizes_keep_only_the_unreadable_list(tmp_path):
    dataset = on_disk_dataset(tmp_path, [8, 8, 12, 8], broken={1})
    scan = scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    assert scan.images is None and [index for index, _, _ in scan.unreadable] == [1]
    assert scan_images(dataset, "image", cache_dir=tmp_path / "cache").from_cache


def test_dataset_serves_the_same_pixels_from_the_store_or_by_decoding(tmp_path):
    dataset = on_disk_dataset(tmp_path, [8] * 5, broken={1})
    scan = scan_images(dataset, "image", cache_dir=tmp_path / "cache")
    keep = scan.readable_indices(len(dataset))
    stored = ImageClassificationDataset(dataset, "image", "label", images=scan.images, indices=keep, seed=3)
    decoded = ImageClassificationDataset(dataset, "image", "label", indices=keep, seed=3)
    assert len(stored) == len(decoded) == 4
    for index in range(4):
        a, b = stored[index], decoded[index]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["pixel_values"].dtype == torch.uint8
        assert a["labels"] == b["labels"] == keep[index] % 3
        assert a["sample_seed"] == b["sample_seed"]


def test_decoded_store_pickles_without_its_pixels(tmp_path):
    import pickle

    dataset = on_disk_dataset(tmp_path, [8] * 3)
    images = scan_images(dataset, "image", cache_dir=tmp_path / "cache").images
    images[0]  # map the file in this process
    clone = pickle.loads(pickle.dumps(images))  # what a DataLoader worker receives
    assert len(pickle.dumps(images)) < 1000
    assert torch.equal(clone[2], images[2])

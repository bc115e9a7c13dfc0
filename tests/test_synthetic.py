"""The synthetic captioned set is deterministic and loadable, and the checker reads it back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sd_distill.toy.checker import ATTRIBUTES, adherence, parse_caption, read_scene
from sd_distill.toy.synthetic import (
    all_scenes,
    held_out_prompts,
    held_out_scenes,
    make_dataset,
    render,
    train_scenes,
    write_imagefolder,
)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = _folder_bytes(write_imagefolder(tmp_path / "a", n=24, seed=0))
    b = _folder_bytes(write_imagefolder(tmp_path / "b", n=24, seed=0))
    c = _folder_bytes(write_imagefolder(tmp_path / "c", n=24, seed=1))
    assert len(a) == 25  # 24 PNGs + metadata.jsonl
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) > 20


def test_imagefolder_loads_with_datasets(tmp_path: Path) -> None:
    from datasets import load_dataset

    folder = write_imagefolder(tmp_path / "set", n=8, seed=0)
    ds = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == 8
    assert set(ds.column_names) == {"image", "text"}
    _, captions = make_dataset(8, seed=0)
    assert sorted(ds["text"]) == sorted(captions)
    assert ds[0]["image"].size == (32, 32)


def test_held_out_prompts_never_appear_in_training_captions() -> None:
    held, train = held_out_scenes(), train_scenes()
    assert len(held) + len(train) == len(all_scenes()) == 360
    assert not {s.caption() for s in held} & {s.caption() for s in train}
    _, captions = make_dataset(2000, seed=0)
    assert not set(held_out_prompts()) & set(captions)
    # Every attribute value is still seen in training, only the combination is new.
    for attr in ("size", "colour", "shape", "position", "background"):
        assert {getattr(s, attr) for s in held} <= {getattr(s, attr) for s in train}


def test_checker_reads_every_combination_exactly() -> None:
    for scene in all_scenes():
        got = read_scene(render(scene))
        assert got == {a: getattr(scene, a) for a in got}, scene.caption()
        assert parse_caption(scene.caption()) == scene


def test_checker_scores_true_captions_high_and_shuffled_low() -> None:
    images, captions = make_dataset(400, seed=3)
    assert adherence(images, captions).score >= 0.95
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    assert adherence(images, shuffled).score <= 0.1


def test_checker_rejects_foreign_text_and_blank_images() -> None:
    import numpy as np

    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")
    blank = np.full((32, 32, 3), 245, dtype=np.uint8)
    report = adherence([blank], ["a small red circle in the center on a white background"])
    assert report.score == 0.0
    assert report.per_attribute["background"] == 1.0


def test_checker_reads_block_averaged_and_speckled_images() -> None:
    """What the toy VAE returns (2x2 means, upsampled) and specks on the background still read right."""
    import numpy as np

    images, captions = make_dataset(300, seed=4)
    x = np.stack(images).astype(np.float64)  # [N, 32, 32, 3]
    blocks = x.reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4)).repeat(2, axis=1).repeat(2, axis=2)
    assert adherence(list(blocks.round().astype(np.uint8)), captions).score >= 0.97

    rng = np.random.default_rng(0)
    specks = rng.random(x.shape[:3]) < 0.05  # 5 % of pixels set to random colours
    speckled = np.where(specks[..., None], rng.integers(0, 256, x.shape), x).astype(np.uint8)
    assert adherence(list(speckled), captions).score >= 0.9


def test_caption_noise_misnames_one_attribute_and_leaves_images_alone() -> None:
    import numpy as np

    images, captions = make_dataset(1000, seed=0)
    noisy_images, noisy = make_dataset(1000, seed=0, caption_noise=0.4)
    assert all(np.array_equal(a, b) for a, b in zip(images, noisy_images))
    assert make_dataset(50, seed=0, caption_noise=0.4)[1] == noisy[:50]
    changed = [(parse_caption(a), parse_caption(b)) for a, b in zip(captions, noisy) if a != b]
    assert 0.35 <= len(changed) / len(captions) <= 0.45
    assert all(sum(getattr(t, a) != getattr(n, a) for a in ATTRIBUTES) == 1 for t, n in changed)
    assert not set(held_out_prompts()) & set(noisy)

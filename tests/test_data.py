"""Data from the places users keep it: parquet with DiffusionDB's schema, csv metadata, saved
datasets, streams; columns detected; images decoded lazily and converted."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_distill.train.config import ConfigError, TrainConfig
from sd_distill.train.data import build_train_data
from sd_distill.train.rows import decode_image


def _png(seed: int, size: int = 40, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def _diffusiondb_parquet(path: Path, n: int = 5) -> Path:
    """A parquet file with DiffusionDB's columns: image (bytes/path struct), prompt, seed, cfg, …"""
    import datasets

    rows = {
        "image": [{"bytes": _png(i), "path": f"{i}.png"} for i in range(n)],
        "prompt": [f"a painting number {i}" for i in range(n)],
        "seed": list(range(n)),
        "step": [50] * n,
        "cfg": [7.0] * n,
        "sampler": ["k_lms"] * n,
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "step": datasets.Value("int64"),
            "cfg": datasets.Value("float32"),
            "sampler": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _config(**kw: object) -> TrainConfig:
    return TrainConfig(resolution=32, **kw)  # type: ignore[arg-type]


def test_diffusiondb_style_parquet_is_detected_and_decoded(tmp_path: Path) -> None:
    parquet = _diffusiondb_parquet(tmp_path / "part-000.parquet")
    data = build_train_data(_config(dataset_name=str(parquet)), show_progress=False)
    assert (data.spec.image_column, data.spec.caption_column) == ("image", "prompt")
    item = data.dataset[2]
    assert item["pixel_values"].shape == (3, 32, 32) and item["caption"] == "a painting number 2"
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0


def test_a_folder_of_parquet_files_and_max_train_samples(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    folder.mkdir()
    _diffusiondb_parquet(folder / "a.parquet", 3), _diffusiondb_parquet(folder / "b.parquet", 3)
    data = build_train_data(_config(dataset_name=str(folder), max_train_samples=4), show_progress=False)
    assert data.num_rows == 4


def test_csv_metadata_and_explicit_columns(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "description", "other"])
        writer.writerows([[f"{i}.png", f"caption {i}", "x"] for i in range(3)])
    data = build_train_data(_config(train_data_dir=str(folder), caption_column="description"), show_progress=False)
    assert data.num_rows == 3 and data.dataset[1]["caption"] == "caption 1"


def test_saved_dataset_folder(tmp_path: Path) -> None:
    import datasets

    parquet = _diffusiondb_parquet(tmp_path / "x.parquet", 3)
    datasets.load_dataset("parquet", data_files=str(parquet))["train"].save_to_disk(str(tmp_path / "saved"))
    data = build_train_data(_config(dataset_name=str(tmp_path / "saved")), show_progress=False)
    assert data.num_rows == 3


def test_streaming_skips_bad_rows_as_it_goes(tmp_path: Path) -> None:
    import datasets

    rows = {"image": [_png(0), b"garbage", _png(2)], "text": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "s.parquet"))
    data = build_train_data(
        _config(dataset_name=str(tmp_path / "s.parquet"), streaming=True, max_train_steps=1, max_bad_fraction=0.5),
        show_progress=False,
    )
    items = list(data.dataset)
    assert [i["caption"] for i in items] == ["a", "c"]
    assert sum(i["bad_rows_before"] for i in items) == 1


def test_missing_image_column_lists_what_there_is(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"picture": ["x"], "text": ["a"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ConfigError, match=r"no image column found.*\['picture', 'text'\].*--image_column"):
        build_train_data(_config(dataset_name=str(tmp_path / "t.parquet")), show_progress=False)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_unusual_image_modes_become_rgb(mode: str) -> None:
    img = Image.new(mode, (8, 8))
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    out = decode_image({"bytes": buf.getvalue(), "path": None})
    assert out is not None and out.mode == "RGB" and out.size == (8, 8)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out is not None and 120 <= np.asarray(out)[0, 0, 0] <= 135


def test_training_from_a_stream(tiny_model_dir: Path, tmp_path: Path) -> None:
    import datasets

    from sd_distill.train import run
    from sd_distill.train.config import parse_args

    rows = {"image": [_png(i) for i in range(4)], "caption": [f"a thing {i}" for i in range(4)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "s.parquet"))
    stats = run(
        parse_args(
            [
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
                "--dataset_name",
                str(tmp_path / "s.parquet"),
                "--streaming",
                "--resolution",
                "32",
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "3",
                "--output_dir",
                str(tmp_path / "out"),
                "--report_to",
                "none",
                "--default_prompt",
                "",
            ]
        )
    )
    assert stats.global_step == 3


def _metadata_folder(folder: Path, suffix: str, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
    if suffix == ".csv":
        text = "file_name,text\n" + "".join(f"{f},{t}\n" for f, t in rows)
    else:
        text = "".join(f'{{"file_name": "{f}", "text": "{t}"}}\n' for f, t in rows)
    (folder / f"metadata{suffix}").write_bytes(text.encode("utf-8").replace(b"BAD", b"\xff"))
    return folder


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_metadata_byte_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    folder = _metadata_folder(tmp_path / "d", suffix, [("0.png", "a"), ("1.png", "cafBAD"), ("2.png", "c")])
    line = 3 if suffix == ".csv" else 2  # the csv has a header line
    with pytest.raises(ConfigError, match=rf"metadata{suffix} line {line}: byte 0xff is not UTF-8"):
        build_train_data(_config(train_data_dir=str(folder)), show_progress=False)


def test_a_file_name_outside_the_folder_is_named(tmp_path: Path) -> None:
    folder = _metadata_folder(tmp_path / "d", ".jsonl", [("0.png", "a"), ("../../etc/passwd", "b")])
    with pytest.raises(ConfigError) as err:
        build_train_data(_config(train_data_dir=str(folder)), show_progress=False)
    assert "'../../etc/passwd'" in str(err.value) and "An error occurred" not in str(err.value)


def test_loader_workers_default_from_the_cpus_and_the_cache(monkeypatch) -> None:
    import torch

    import sd_distill.train.inputs as inputs
    from sd_distill.train.loader import EpochShuffleSampler

    monkeypatch.setattr(inputs, "_cpu_count", lambda: 8)
    uncached = _config(train_data_dir="x", cache_latents=False)
    assert inputs.resolve_workers(uncached, local_processes=2).dataloader_num_workers == 4
    assert inputs.resolve_workers(uncached, local_processes=8).dataloader_num_workers == 1
    assert inputs.resolve_workers(uncached, local_processes=1).dataloader_num_workers == 4  # at most 4
    assert inputs.resolve_workers(uncached, 1, max_workers=1).dataloader_num_workers == 1  # a 1-shard stream
    cached = _config(train_data_dir="x", cache_latents=True)
    assert inputs.resolve_workers(cached, local_processes=1).dataloader_num_workers == 0  # rows are tensors
    given = _config(train_data_dir="x", cache_latents=False, dataloader_num_workers=0)
    assert inputs.resolve_workers(given, local_processes=1).dataloader_num_workers == 0

    two = _config(train_data_dir="x", dataloader_num_workers=2)
    dataset = torch.utils.data.TensorDataset(torch.zeros(4))
    loader = inputs.make_dataloader(two, dataset, EpochShuffleSampler(4, 0), 0, torch.device("cuda"))
    assert loader.persistent_workers and loader.pin_memory  # the epoch travels in the sampler's index
    stream = inputs.make_dataloader(two, dataset, None, 0, torch.device("cpu"))
    assert not stream.persistent_workers and not stream.pin_memory  # a stream's workers restart per epoch

"""Training data from anywhere the ``datasets`` library reads: hub ids, image folders with
metadata, parquet/arrow/json/csv files (e.g. DiffusionDB), streamed or not.

Images are decoded lazily, one row at a time. Rows whose image cannot be decoded are found
before training (map-style sets) or skipped as they stream by, and counted; they never crash a run.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..constants import DATA_BUILDERS, DATA_SUFFIXES
from .config import ConfigError, TrainConfig
from .loader import ImageCaptionDataset, StreamingImageCaptionDataset
from .rows import DataSpec, clean_caption, decode_image
from .shards import gather, my_chunks

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "jpg", "png", "pixel_values", "file_name", "image_path", "path")
CAPTION_COLUMN_CANDIDATES = ("text", "prompt", "caption", "captions", "sentence", "txt", "description")


# ------------------------------------------------------------------------------------------------
# Loading and column resolution
# ------------------------------------------------------------------------------------------------
def load_table(config: TrainConfig) -> Any:
    """The raw ``datasets`` table (``Dataset`` or ``IterableDataset``) named by the config;
    a dataset that cannot be read at all becomes one ConfigError naming it."""
    source = config.train_data_dir or config.dataset_name
    files = [p for p in glob.glob(os.path.expanduser(source or "")) if os.path.isfile(p)]
    if files and all(os.path.getsize(p) == 0 for p in files):
        raise ConfigError(f"the dataset is empty: {source!r} has no rows.")
    try:
        return _load_table(config)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the message, not a stack
        cause = root_cause(err)
        text = f"{err} {cause}".lower()
        empty = ("empty", "at least one data file", "corresponds to no data")
        if isinstance(err, StopIteration) or any(words in text for words in empty):
            raise ConfigError(f"the dataset is empty: {source!r} has no rows (or no images).") from err
        not_utf8 = isinstance(cause, UnicodeDecodeError) or "utf8" in str(cause).lower().replace("-", "")
        where = _bad_utf8_line(source) if not_utf8 else None  # arrow's message names neither file nor line
        raise ConfigError(
            f"could not read the dataset {source!r}: {where or _one_line(cause)}. Give a hub id, a folder of images "
            "with metadata.jsonl/.csv, or .parquet/.arrow/.jsonl/.csv files."
        ) from err


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain: datasets wraps the message that names the row or
    file in a generic "An error occurred while generating the dataset"."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        if str(inner).strip():
            err = inner
    return err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:600]}"


def _bad_utf8_line(source: str | None) -> str | None:
    """``file line N: byte 0x.. is not UTF-8`` for the first text data file of ``source`` that is not UTF-8."""
    root = Path(os.path.expanduser(source or ""))
    files = [root] if root.is_file() else sorted(root.rglob("metadata.*")) if root.is_dir() else []
    files += [Path(p) for p in glob.glob(os.path.expanduser(source or "")) if Path(p) not in files]
    for path in files:
        if path.suffix not in (".jsonl", ".json", ".csv") or not path.is_file():
            continue
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return f"{path} line {number}: byte {line[bad.start]:#04x} is not UTF-8 (save the file as UTF-8)"
    return None


def _load_table(config: TrainConfig) -> Any:
    import datasets

    kw: dict[str, Any] = {"streaming": config.streaming}
    if config.train_data_dir is not None:
        ds = datasets.load_dataset("imagefolder", data_dir=config.train_data_dir, **kw)
    else:
        name = config.dataset_name
        assert name is not None
        path = Path(os.path.expanduser(name))
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
        elif path.is_dir() and not _data_files_in(path):
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), **kw)
        elif path.is_dir():
            files = _data_files_in(path)
            ds = datasets.load_dataset(DATA_BUILDERS[Path(files[0]).suffix], data_files=files, **kw)
        elif "://" in name and Path(name).suffix in DATA_SUFFIXES:  # e.g. hf://datasets/…/*.parquet
            ds = datasets.load_dataset(DATA_BUILDERS[Path(name).suffix], data_files=name, **kw)
        elif Path(name).suffix in DATA_SUFFIXES or glob.glob(os.path.expanduser(name)):
            files = sorted(glob.glob(os.path.expanduser(name)))
            ds = datasets.load_dataset(DATA_BUILDERS[Path(files[0]).suffix], data_files=files, **kw)
        else:
            ds = datasets.load_dataset(name, config.dataset_config_name, **kw)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if config.max_train_samples is not None:
        ds = (
            ds.take(config.max_train_samples)
            if config.streaming
            else ds.select(range(min(config.max_train_samples, len(ds))))
        )
    return ds


def _data_files_in(folder: Path) -> list[str]:
    """Tabular data files directly in ``folder`` (all of the most common suffix), sorted."""
    for suffix in (".parquet", ".arrow"):
        files = sorted(str(p) for p in folder.glob(f"*{suffix}"))
        if files:
            return files
    return []


def resolve_columns(column_names: list[str], image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    """Pick the image and caption columns, or raise one error listing the columns there are."""
    errors = []
    chosen = []
    for given, candidates, what, flag in (
        (image_column, IMAGE_COLUMN_CANDIDATES, "image", "--image_column"),
        (caption_column, CAPTION_COLUMN_CANDIDATES, "caption", "--caption_column"),
    ):
        if given is not None:
            if given not in column_names:
                errors.append(f"{flag} {given!r} is not a column of the dataset; its columns are {column_names}.")
            chosen.append(given)
            continue
        found = next((c for c in candidates if c in column_names), None)
        if found is None:
            errors.append(
                f"no {what} column found (looked for {list(candidates)}); its columns are {column_names}; "
                f"name one with {flag}."
            )
        chosen.append(found or "")
    if errors:
        raise ConfigError("invalid dataset:\n  - " + "\n  - ".join(errors))
    return chosen[0], chosen[1]


def _prepare_image_column(table: Any, image_column: str) -> Any:
    """Turn automatic image decoding off: we decode ourselves so a broken image is one bad row."""
    import datasets

    feature = table.features.get(image_column) if table.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        table = table.cast_column(image_column, datasets.Image(decode=False))
    return table


@dataclass
class ScanReport:
    rows: list[int]  # readable rows, ascending
    bad_images: int
    bad_captions: int
    total: int  # rows looked at

    @classmethod
    def merge(cls, parts: list[ScanReport]) -> ScanReport:
        """One report of the rank's shares (each rank looked at other rows)."""
        return cls(
            sorted(r for p in parts for r in p.rows),
            sum(p.bad_images for p in parts),
            sum(p.bad_captions for p in parts),
            sum(p.total for p in parts),
        )


def scan_rows(table: Any, spec: DataSpec, accelerator: Any = None, show_progress: bool = False) -> ScanReport:
    """Decode every image once (not kept) to find the rows that can be trained on. Each rank decodes
    its share of the rows and all get the same merged report."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    chunks = my_chunks(len(table), accelerator)
    mine = ScanReport([], 0, 0, sum(len(c) for c in chunks))
    for i in tqdm([i for c in chunks for i in c], desc="checking images", disable=not show_progress, leave=False):
        row = table[i]
        if decode_image(row[spec.image_column], spec.root) is None:
            mine.bad_images += 1
            continue
        mine.bad_captions += clean_caption(row[spec.caption_column])[1]
        mine.rows.append(i)
    report = ScanReport.merge(gather(accelerator, mine))
    logger.info("checked %d images in %.1f s (%d on this rank)", report.total, time.perf_counter() - start, mine.total)
    return report


@dataclass
class TrainData:
    dataset: torch.utils.data.Dataset
    spec: DataSpec
    scan: ScanReport | None  # None for streamed data (counted on the fly)
    num_rows: int | None


def open_table(config: TrainConfig) -> tuple[Any, DataSpec]:
    """The table (images not decoded) and how its rows become examples; ConfigError when unusable."""
    table = load_table(config)
    names = list(table.column_names or (table.features.keys() if table.features else []))
    if config.streaming and not names:
        names = list(next(iter(table)).keys())
    image_column, caption_column = resolve_columns(names, config.image_column, config.caption_column)
    table = _prepare_image_column(table, image_column)
    root = config.train_data_dir or (
        config.dataset_name if config.dataset_name and os.path.isdir(config.dataset_name) else None
    )
    spec = DataSpec(
        image_column, caption_column, config.resolution, config.center_crop, config.random_flip, config.seed or 0, root
    )
    if not config.streaming and len(table) == 0:
        raise ConfigError(f"the dataset is empty: {config.train_data_dir or config.dataset_name!r} has no rows.")
    return table, spec


def build_train_data(config: TrainConfig, show_progress: bool = True, accelerator: Any = None) -> TrainData:
    """Load the table, resolve columns, drop unreadable rows; raises ConfigError on bad data."""
    table, spec = open_table(config)
    if config.streaming:
        return stream_data(config, table, spec)
    return train_data(config, table, spec, scan_rows(table, spec, accelerator, show_progress))


def stream_data(config: TrainConfig, table: Any, spec: DataSpec) -> TrainData:
    """A stream: unreadable rows are skipped and judged as they go by."""
    return TrainData(StreamingImageCaptionDataset(table, spec, config.max_bad_fraction), spec, None, None)


def train_data(config: TrainConfig, table: Any, spec: DataSpec, scan: ScanReport, announce: bool = True) -> TrainData:
    """The readable rows of a scanned table; ConfigError when too many are unreadable."""
    fraction = scan.bad_images / scan.total
    if scan.bad_images and announce:
        logger.warning("skipping %d of %d rows whose image cannot be decoded", scan.bad_images, scan.total)
    if scan.bad_captions and announce:
        logger.warning("%d rows have an empty or non-text caption; they train on the empty prompt", scan.bad_captions)
    if not scan.rows or fraction > config.max_bad_fraction:
        raise ConfigError(
            f"{scan.bad_images} of {scan.total} images ({fraction:.0%}) cannot be decoded, more than "
            f"--max_bad_fraction {config.max_bad_fraction}; check --image_column {spec.image_column!r} and the files."
        )
    return TrainData(ImageCaptionDataset(table, scan.rows, spec), spec, scan, len(scan.rows))

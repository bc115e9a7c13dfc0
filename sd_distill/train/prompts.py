"""Prompts without images, for training on guided trajectories: a prompts file (one per line), or
the caption column of any dataset ``datasets`` reads (an image column, if any, is not read)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def read_prompt_lines(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of line 1
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"--prompts_file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8."
        ) from None
    except OSError as err:
        raise ConfigError(f"--prompts_file {str(path)!r} cannot be read: {err.strerror}.") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def load_prompts(config: TrainConfig) -> list[str]:
    """The run's prompts, bad rows (empty or non-text captions) skipped and counted, with the same
    ``--max_bad_fraction`` stop as images; at most ``--max_train_samples``."""
    if config.prompts_file:
        prompts = read_prompt_lines(config.prompts_file)
        if not prompts:
            raise ConfigError(f"--prompts_file {config.prompts_file!r} has no prompts (only blank or # lines).")
    else:
        prompts = _caption_column(config)
    if config.max_train_samples is not None:
        prompts = prompts[: config.max_train_samples]
    return prompts


def _caption_column(config: TrainConfig) -> list[str]:
    from .data import CAPTION_COLUMN_CANDIDATES, load_table
    from .rows import clean_caption

    table = load_table(config)
    names = list(table.column_names or [])
    column = config.caption_column or next((c for c in CAPTION_COLUMN_CANDIDATES if c in names), None)
    if column not in names:
        raise ConfigError(
            f"no caption column found (looked for {config.caption_column or list(CAPTION_COLUMN_CANDIDATES)}); "
            f"its columns are {names}; name one with --caption_column."
        )
    cleaned = [clean_caption(value) for value in table.select_columns([column])[column]]
    prompts = [text for text, bad in cleaned if not bad]
    bad = len(cleaned) - len(prompts)
    if not prompts or bad / max(1, len(cleaned)) > config.max_bad_fraction:
        raise ConfigError(
            f"{bad} of {len(cleaned)} captions in column {column!r} are empty or not text, more than "
            f"--max_bad_fraction {config.max_bad_fraction}; check --caption_column."
        )
    if bad:
        logger.warning("skipping %d of %d rows with an empty or non-text caption", bad, len(cleaned))
    return prompts


def prompts_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha1("\n".join(prompts).encode()).hexdigest()

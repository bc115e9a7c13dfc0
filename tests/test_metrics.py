"""A metric that cannot run here says why once, not once per column and scale."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sd_distill.eval import metrics


def test_an_unavailable_lpips_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(metrics, "lpips", lambda preds, targets: (None, "LPIPS unavailable: test reason"))
    images = [np.zeros((8, 8, 3), dtype=np.uint8)]
    with caplog.at_level(logging.INFO, logger=metrics.__name__):
        for _ in range(3):
            scores = metrics.fidelity(images, images)
    assert scores["lpips"] is None and scores["lpips_reason"] == "LPIPS unavailable: test reason"
    assert [r.getMessage() for r in caplog.records].count("LPIPS unavailable: test reason") == 1

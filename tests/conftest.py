"""Suite-wide fixtures: every test runs as a single process unless it launches its own ranks."""

from __future__ import annotations

import pytest

#: Launcher variables that would make Lightning or torch.distributed join (or wait for) a job.
DIST_ENV = (
    "MASTER_PORT",
    "MASTER_ADDR",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
)


@pytest.fixture(autouse=True)
def clean_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)

"""Shared fixtures: composed configs, one shared cache (tiny model + datasets), a trained tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One cache for the session: the tiny model is built once and shared by every test."""
    d = os.environ.get("SIGIL_TEST_CACHE") or str(tmp_path_factory.mktemp("sigil_cache"))
    os.environ["SIGIL_CACHE_DIR"] = d
    return d


def smoke_cfg(cache_dir: str, *overrides: str):
    from sigil_exp.config import to_object

    return to_object(compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", *overrides))


def run_cli(args: list[str], cache_dir: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m sigil_exp ...` in a subprocess, as a user runs it."""
    env = {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "sigil_exp", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory):
    """One real tiny NF4 run (30 steps), shared by the tests that inspect its results."""
    from omegaconf import OmegaConf

    from sigil_exp.tracking import finish_run, flatten, init_run
    from sigil_exp.train import train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = smoke_cfg(cache_dir, "train.max_steps=30", "train.eval_steps=15", "train.save_steps=15",
                    "train.logging_steps=3")
    run = init_run(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), name="test-run", group="tests",
                   tags=["test"])
    try:
        metrics = train(cfg, run_dir, run)
    finally:
        finish_run(run, failed=False)
    return {"cfg": cfg, "dir": run_dir, "metrics": metrics, "flat": flatten}

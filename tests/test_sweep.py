"""Sweeps on the tiny model, run the way a person runs them: the scripts in multirun_examples/.

Each example's "Smoke form" line is parsed from the file and executed (so the docs cannot rot):
the 2x2 rank x alpha sweep (alpha.sh) and the optuna search (bayes_tpe.sh) in the default suite, the
others (one job per GPU through submitit's local executor, SLURM, two nodes, ...) under `-m slow`
(`make test-slow`). A fast test expands every example's command into its
jobs and composes each job's config, so a renamed key or a quoting mistake fails in seconds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from sigil_exp.config import to_object
from sigil_exp.tracking import read_offline_run, sweep_group
from sigil_exp.validation import validate
from tests.conftest import CONF_DIR, ROOT, run_cli

EXAMPLES = ROOT / "multirun_examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))
# Appended to every smoke command by the tests: 2 short steps, one small eval-loss pass at the end, no
# checkpoints, no Rust evaluation (test_sweep_objective_can_be_a_maximised_eval_rate keeps it).
FAST = ["train.max_steps=2", "train.eval_steps=0", "train.save_steps=100", "train.logging_steps=1",
        "data.val_fraction=0.03", "model.max_seq_len=256", "eval.enabled=false"]
SLOW_EXAMPLES = {"rank", "targets", "lr", "two_phase", "slurm", "slurm_2node", "parallel_gpus"}
FAST_EXAMPLES: set[str] = set()  # every smoke form runs under -m slow (each is a sweep of CLI jobs)


# ------------------------------------------------------------------------------------- helpers
def header(script: Path) -> list[str]:
    lines = script.read_text().splitlines()
    return [ln for ln in lines[1:] if ln.startswith("#")][:40]


def smoke_form(script: Path) -> tuple[dict[str, str], list[str]]:
    """(env, args) of the file's documented smoke command: `[VAR=x ...] bash multirun_examples/<f> args`."""
    lines = script.read_text().splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("# Smoke form"))
    cmd = next(ln[1:].strip() for ln in lines[i + 1:] if f"multirun_examples/{script.name}" in ln)
    words = shlex.split(cmd)
    at = words.index("bash")
    env = dict(w.split("=", 1) for w in words[:at])
    assert words[at + 1] == f"multirun_examples/{script.name}", cmd
    return env, words[at + 2:]


def _env(cache_dir: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true",
            "PYTHON": sys.executable, **extra}


def run_example(script: Path, cache_dir: str, out: Path, *extra: str, timeout: int = 900, returncode: int = 0):
    """Run the example's smoke form into `out` (a sweep folder, or $OUT for two_phase.sh)."""
    env, args = smoke_form(script)
    where = [] if script.stem == "two_phase" else [f"hydra.sweep.dir={out}"]
    proc = subprocess.run(["bash", str(script), *args, *FAST, *where, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_env(cache_dir, OUT=str(out), **env))
    assert proc.returncode == returncode, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def recorded_commands(script: Path, tmp_path: Path, cache_dir: str, smoke: bool = True) -> list[list[str]]:
    """The `python ...` command lines the script runs, captured by a fake python: in its smoke form,
    or (smoke=False) exactly as documented for the real run."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fake, log = tmp_path / "fakepython", tmp_path / "argv.jsonl"
    log.unlink(missing_ok=True)
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env, args = smoke_form(script) if smoke else ({}, [])
    env = _env(cache_dir, OUT=str(tmp_path / "out"), **{"NGPUS": "2", **env})
    env["PYTHON"] = str(fake)
    proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def compose_jobs(commands: list[list[str]]):
    """Every job's typed config (validated), and the launcher/sweeper settings composed too."""
    for argv in commands:
        for job in expand_jobs(argv):
            task = [o for o in job if not o.startswith("hydra")]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                typed = to_object(compose("config", overrides=task))
                if len(task) < len(job):  # slurm / local_gpus / lora_tpe settings
                    compose("config", overrides=job, return_hydra_config=True)
            validate(typed)  # interpolations resolve (alpha = r, 2r) and the combination is legal
            yield typed


def _ends(spec: str) -> tuple:
    """Both ends of an optuna search-space entry: `choice(8, 16, 32)` -> (8, 32), `interval(a, b)` -> (a, b)."""
    value = OverridesParser.create().parse_override(f"k={spec}").value()
    if isinstance(value, ChoiceSweep):
        return value.list[0], value.list[-1]
    if isinstance(value, IntervalSweep):
        return value.start, value.end
    if isinstance(value, RangeSweep):
        return value.start, value.stop - (value.step or 1)
    return value, value


def expand_jobs(argv: list[str]) -> list[list[str]]:
    """`-m sigil_exp [-m] overrides...` -> the overrides of each job the sweep would launch."""
    assert argv[:2] == ["-m", "sigil_exp"], argv
    args = argv[2:]
    multirun = args[:1] == ["-m"]
    args = args[1:] if multirun else args
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(args)
    if not multirun:
        return [args]
    hydra_args = [o.input_line for o in parsed if o.get_key_element().startswith("hydra")]
    if any(o.startswith("hydra/sweeper=") for o in hydra_args):  # optuna: a job at each corner of the space
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=args, return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert cfg.hydra.sweeper.direction in ("minimize", "maximize")
        assert str(cfg.hydra.sweeper.storage).startswith("sqlite:///") and cfg.hydra.sweeper.sampler.seed is not None
        task = [o for o in args if not o.startswith("hydra")]
        return [[*task, *(f"{k}={_ends(v)[end]}" for k, v in params.items())] for end in (0, 1)]
    jobs = BasicSweeper.split_arguments([o for o in parsed if not o.get_key_element().startswith("hydra")], None)[0]
    return [[*hydra_args, *job] for job in jobs]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def report_rows(sweep: Path) -> list[str]:
    md = (sweep / "report.md").read_text().splitlines()
    return [ln for ln in md if ln.startswith("| ") and not ln.startswith("| #")]


def is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- the examples as docs
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_states_question_command_cost_and_composes(script, tmp_path, cache_dir):
    text = "\n".join(header(script))
    assert text.startswith("# Question:"), f"{script.name} must start with the question it answers"
    assert "# Cost:" in text and " x " in text.split("# Cost:")[1].splitlines()[0], "cost as jobs x steps"
    assert f"bash multirun_examples/{script.name}" in text and "# Smoke form" in text
    documented = recorded_commands(script, tmp_path / "full", cache_dir, smoke=False)
    assert documented and any(c[2:3] == ["-m"] for c in documented), "an example runs a sweep (-m)"
    assert len(list(compose_jobs(documented))) >= 2
    smoke = list(compose_jobs(recorded_commands(script, tmp_path / "smoke", cache_dir)))
    assert smoke and all(t.model.name == "tiny" and t.hardware.device == "cpu" for t in smoke), "smoke is small"


def test_tied_alpha_expands_to_r_and_2r(tmp_path, cache_dir):
    (argv,) = recorded_commands(EXAMPLES / "alpha.sh", tmp_path, cache_dir)
    alphas = []
    for job in expand_jobs(argv):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            typed = to_object(compose("config", overrides=job))
        alphas.append((typed.lora.r, typed.lora.alpha))
    assert sorted(alphas) == [(16, 16), (16, 32), (64, 64), (64, 128)]


# ------------------------------------------------------------------------ the 2x2 sweep, for real
@pytest.fixture(scope="module")
def sweep_2x2(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_2x2")
    run_example(EXAMPLES / "alpha.sh", cache_dir, out)
    return out


def test_2x2_sweep_four_jobs_four_runs_one_group(sweep_2x2):
    jobs = job_dirs(sweep_2x2)
    assert len(jobs) == 4
    adapters = [json.loads((j / "adapter" / "adapter_config.json").read_text()) for j in jobs]
    assert sorted((a["r"], a["lora_alpha"]) for a in adapters) == [(16, 16), (16, 32), (64, 64), (64, 128)]
    runs = [read_offline_run(j) for j in jobs]
    assert len({r["run"]["id"] for r in runs}) == 4
    assert {r["run"]["group"] for r in runs} == {sweep_group(sweep_2x2)}
    names = sorted("-".join(r["run"]["name"].split("-")[:3]) for r in runs)  # FAST's overrides follow
    assert names == ["r16-a16-all", "r16-a32-all", "r64-a128-all", "r64-a64-all"]
    for r in runs:
        assert {"sweep:lora.r", "sweep:lora.alpha"} <= set(r["run"]["tags"])
        assert not any(t in r["run"]["tags"] for t in ("sweep:experiment", "sweep:train.max_steps"))
        s = r["summary"]
        assert r["exit_code"] == 0 and s["status"] == "ok"
        assert s["objective_key"] == "eval/loss" and s["objective"] == pytest.approx(s["eval/loss"])
        assert math.isfinite(s["best/eval_loss"]) and s["final/tokens_per_s"] > 0 and s["final/peak_mem_gb"] > 0
        steps = [h["train/global_step"] for h in r["history"] if "train/loss" in h]
        assert steps == [1, 2]  # each run holds only its own steps


def test_2x2_sweep_report(sweep_2x2):
    rows = report_rows(sweep_2x2)
    assert len(rows) == 4 and all("| ok |" in r for r in rows)
    with (sweep_2x2 / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    losses = [float(r["eval/loss"]) for r in table]
    assert losses == sorted(losses), "sorted by the objective (eval/loss, lower first)"
    small, large = sorted({int(r["params/trainable"]) for r in table})
    assert large == 4 * small  # r=64 has 4x the adapter parameters of r=16
    assert all(float(r["train/tokens_per_s"]) > 0 and float(r["time/wall_s"]) > 0 for r in table)
    for png in ("loss_curves.png", "objective_vs_lora.r.png", "objective_vs_lora.alpha.png"):
        assert is_png(sweep_2x2 / png), png
    md = (sweep_2x2 / "report.md").read_text()
    assert "Swept: `lora.r`, `lora.alpha`" in md and "**Best: job" in md and "(=128)" in md
    # ... and the same table as a W&B run of its own in the sweep's group
    report_run = read_offline_run(sweep_2x2 / "wandb")
    assert report_run["run"]["job_type"] == "report" and report_run["run"]["group"] == sweep_group(sweep_2x2)
    assert report_run["summary"]["sweep/report/_type"] == "table-file"
    assert report_run["summary"]["sweep/report/nrows"] == 4 and report_run["summary"]["jobs"] == 4


def test_report_cli_rewrites_the_report(sweep_2x2):
    from sigil_exp import report

    (sweep_2x2 / "report.md").unlink()
    report.main([str(sweep_2x2), "--objective", "train/loss"])
    assert "Sorted by **train/loss**" in (sweep_2x2 / "report.md").read_text()
    report.main([str(sweep_2x2)])  # back to the sweep's own objective


# --------------------------------------------------------------------------- failure isolation
def test_failing_jobs_are_recorded_and_the_sweep_goes_on(cache_dir, tmp_path):
    # job 0 trains; job 1 names a module the model lacks; job 2 is refused by validate(): both fail their checks,
    # before any W&B run, data work or model load; the sweep goes on, writes its report, then exits 1
    proc = run_cli(["-m", "experiment=smoke", "lora.r=4", "lora.target_modules=[q_proj],[nonexistent_proj],[]",
                    *FAST, f"hydra.sweep.dir={tmp_path}"], cache_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = job_dirs(tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"sigil_exp: 2 of 3 sweep jobs did not finish ok (1 ok, 2 failed); their logs: "
                    f"{jobs[1] / 'run.log'}, {jobs[2] / 'run.log'}")
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert [m["status"] for m in metrics] == ["ok", "failed", "failed"]
    assert "nonexistent_proj" in metrics[1]["error"] and "q_proj" in metrics[1]["error"]  # names the real modules
    assert "lora.target_modules is empty" in metrics[2]["error"]
    assert (jobs[0] / "adapter" / "adapter_config.json").is_file()
    assert read_offline_run(jobs[0])["exit_code"] == 0
    for j in jobs[1:]:  # refused before anything ran
        assert not (j / "wandb").exists() and not (j / "data_stats.json").exists() and not (j / "checkpoints").exists()
    md = (tmp_path / "report.md").read_text()
    assert "3 jobs: 1 ok, 2 failed" in md and "## Jobs that did not finish" in md
    failed = md.split("## Jobs that did not finish")[1]
    assert "nonexistent_proj" in failed and "is empty" in failed
    rows = report_rows(tmp_path)
    assert "| ok |" in rows[0] and all("**failed**" in r for r in rows[1:])


# ------------------------------------------------------------------------------ optuna (TPE)
@pytest.fixture(scope="module")
def tpe_sweep(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tpe")
    run_example(EXAMPLES / "bayes_tpe.sh", cache_dir, out)
    return out


def test_optuna_search_writes_best_trial_and_sqlite_study(tpe_sweep):
    best = yaml.safe_load((tpe_sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"lora.r", "lora.alpha", "train.lr", "lora"}
    jobs = job_dirs(tpe_sweep)
    assert len(jobs) == 3 and (tpe_sweep / "optuna.db").is_file()
    losses = [json.loads((j / "metrics.json").read_text())["eval/loss"] for j in jobs]
    assert best["best_value"] == pytest.approx(min(losses))
    assert len(report_rows(tpe_sweep)) == 3
    md = (tpe_sweep / "report.md").read_text()
    assert "Optuna best trial" in md and is_png(tpe_sweep / "objective_vs_train.lr.png")
    tags = read_offline_run(jobs[0])["run"]["tags"]
    assert {"sweep:lora.r", "sweep:lora.alpha", "sweep:train.lr", "sweep:lora"} <= set(tags)


@pytest.mark.slow
def test_optuna_search_continues_from_its_sqlite_study(tpe_sweep, cache_dir):
    import optuna

    # lora.r=0 fails in a second, which is all this needs: one more trial in the same study (the sweep exits 1)
    run_example(EXAMPLES / "bayes_tpe.sh", cache_dir, tpe_sweep, "hydra.sweeper.n_trials=1", "lora.r=0", returncode=1)
    study = optuna.load_study(study_name="sigil_lora", storage=f"sqlite:///{tpe_sweep}/optuna.db")
    assert len(study.trials) == 4


@pytest.mark.slow
def test_sweep_objective_can_be_a_maximised_eval_rate(cache_dir, tmp_path):
    # experiment=smoke runs the Rust evaluation after training: optimise its pass@1 instead of a loss
    fast = [o for o in FAST if not o.startswith("eval.")]
    proc = run_cli(["-m", "experiment=smoke", "lora.r=4,8", *fast, "eval.limit=2", "eval.max_new_tokens=32",
                    "sweep.objective=eval/pass@1", "sweep.direction=maximize", f"hydra.sweep.dir={tmp_path}"],
                   cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    assert "Sorted by **eval/pass@1** (higher is better)" in md and "| pass@1 |" in md and "| compile rate |" in md
    for j in job_dirs(tmp_path):
        m, s = json.loads((j / "metrics.json").read_text()), read_offline_run(j)["summary"]
        assert s["objective_key"] == "eval/pass@1" and s["objective"] == m["eval/pass@1"]


# ----------------------------------------------------------- the other examples (make test-slow)
@pytest.mark.parametrize("name", [*sorted(FAST_EXAMPLES),
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in sorted(SLOW_EXAMPLES))])
def test_example_runs_in_smoke_form(name, cache_dir, tmp_path):
    script = EXAMPLES / f"{name}.sh"
    run_example(script, cache_dir, tmp_path)
    sweep = tmp_path / "phase2" if name == "two_phase" else tmp_path
    expected = len([j for argv in recorded_commands(script, tmp_path / "rec", cache_dir) if argv[2:3] == ["-m"]
                    for j in expand_jobs(argv)])
    rows = report_rows(sweep)
    assert len(rows) == expected and all("| ok |" in r for r in rows), rows
    if name == "two_phase":
        first = json.loads((tmp_path / "phase1" / "metrics.json").read_text())
        assert first["status"] == "ok"
        for j in job_dirs(sweep):
            cfg = yaml.safe_load((j / "resolved_config.yaml").read_text())
            assert cfg["train"]["init_adapter"] == str(tmp_path / "phase1" / "adapter") and cfg["phase"] == 2
    if name == "parallel_gpus":  # one process per job, each pinned to its own "GPU"
        logs = [(j / "run.log").read_text() for j in job_dirs(sweep)]
        assert "runs on GPU 0 (of 0,1)" in logs[0] and "runs on GPU 1 (of 0,1)" in logs[1]
        assert "peak RSS" not in (sweep / "report.md").read_text()  # per-process peaks: no caveat

"""`dsv3 sweep`: a real two-variant sweep of a very small model, skipping, commands, reports, errors.

One sweep (two `dsv3 fit` processes of 2 steps, run two at a time) is shared by the tests that read
its results; every other test runs nothing, or only the sweep's report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from dsv3_lightning.sweep import main
from dsv3_lightning.sweep.check import check_run
from dsv3_lightning.sweep.marker import MARKER, is_finished
from dsv3_lightning.sweep.results import curve, read_metrics
from dsv3_lightning.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]
SMALL = """
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_model_summary: false
model:
  config:
    hidden_size: 32
    intermediate_size: 64
    moe_intermediate_size: 16
    num_hidden_layers: 2
    num_attention_heads: 2
    q_lora_rank: 16
    kv_lora_rank: 16
    qk_nope_head_dim: 8
    qk_rope_head_dim: 4
    v_head_dim: 8
    n_routed_experts: 8
    num_experts_per_tok: 2
    n_group: 4
    topk_group: 2
    max_position_embeddings: 64
  warmup_steps: 1
data:
  data_path: {corpus}
  cache_dir: {cache}
  vocab_size: 300
  seq_len: 16
  batch_size: 2
"""
SWEEP = """
base: [{tiny}, small.yaml]
seeds: [7]
variants:
  none:
    description: no balancing
    config: {ablations}/none.yaml
  bias:
    config: {ablations}/bias.yaml
    overrides: {{trainer.gradient_clip_val: 0.5}}
  broken:
    overrides: {{data.data_path: {corpus}/missing}}   # parses, then fails in the run
table: [val/loss, {{metric: train/max_vio, last_steps: 2}}]
plots: [train/loss, train/max_vio]
"""


def write_sweep(folder: Path, corpus: Path, text: str = SWEEP) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "small.yaml").write_text(SMALL.format(corpus=corpus, cache=corpus.parent / "cache"))
    path = folder / "tiny_sweep.yaml"
    path.write_text(text.format(tiny=ROOT / "configs/tiny.yaml", ablations=ROOT / "configs/ablations/balancing",
                                corpus=corpus))
    return path


def sweep(*argv: str) -> str:
    """Runs ``dsv3 sweep ARGV`` in this process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus) -> tuple[Path, Path, str]:
    """(sweep file, output folder, printed output) of the one sweep that really runs: none and bias
    finish, broken fails (and the sweep exits with an error naming it, after its report)."""
    path = write_sweep(tmp_path_factory.mktemp("sweep"), corpus)
    out = path.parent / "out"
    printed = io.StringIO()
    with pytest.raises(SystemExit, match=r"sweep tiny_sweep: 1 of 3 runs failed: broken/seed7; their logs are in"):
        with contextlib.redirect_stdout(printed):
            main([str(path), "--out", str(out), "--jobs", "2", "--heartbeat", "0.5"])
    return path, out, printed.getvalue()


def test_runs_every_variant_and_tabulates_its_metrics(done):
    path, out, printed = done
    runs = load_sweep(path).runs(out, [])
    assert [r.label for r in runs] == ["none/seed7", "bias/seed7", "broken/seed7"]
    assert "[3/3]" in printed and printed.count(" finished in ") == 2
    # the heartbeat: each run (a process that imports torch) takes longer than 0.5 s
    assert re.search(r"\[\d/3\] running: (none|bias|broken)/seed7 \(", printed)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"], r["status"]) for r in table] == [
        ("none", "7", "finished"), ("bias", "7", "finished"), ("broken", "7", "failed")]
    assert table[2]["val/loss"] == "" and not is_finished(runs[2])
    for run, row in zip(runs[:2], table):
        assert is_finished(run) and (run.directory / MARKER).is_file()
        metrics = read_metrics(run.directory / "metrics.csv")
        assert float(row["val/loss"]) == curve(metrics, "val/loss")[-1][1]
        max_vio = [v for s, v in curve(metrics, "train/max_vio")]  # 2 steps: last_steps 2 is their mean
        assert len(max_vio) == 2 and float(row["train/max_vio (last 2 steps)"]) == pytest.approx(sum(max_vio) / 2)
        assert float(row["seconds"]) > 0
    # the variant's own overrides and the sweep's seed reached the run
    config = (runs[1].directory / "config.yaml").read_text()
    assert "gradient_clip_val: 0.5" in config and "seed_everything: 7" in config
    markdown = (out / "results.md").read_text()
    assert f"dsv3 sweep {path} --out {out} --jobs 2 --heartbeat 0.5" in markdown
    assert "| variant | description | runs | val/loss | train/max_vio (last 2 steps) | fit time (s) |" in markdown
    val_none = float(table[0]["val/loss"])
    assert f"| none | no balancing | 1/1 | {val_none:.4g} |" in markdown


def test_a_failed_run_is_reported_with_its_log(done):
    _, out, printed = done
    assert "broken/seed7 FAILED (exit code 1)" in printed
    assert f"log: {out / 'logs' / 'broken_seed7.log'}" in printed
    assert "data.data_path" in printed  # the tail of the log shows the run's own error
    assert "| broken | | 0/1 | - | - | - |" in (out / "results.md").read_text().replace("|  |", "| |")


def test_plots_are_png(done):
    pytest.importorskip("matplotlib")
    _, out, printed = done
    for name in ("plot_train_loss.png", "plot_train_max_vio.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {out / name}" in printed


def test_second_call_skips_finished_runs(done):
    path, out, _ = done
    metrics = [r.directory / "metrics.csv" for r in load_sweep(path).runs(out, [])[:2]]
    before = [m.stat().st_mtime_ns for m in metrics]
    printed = sweep(path, "--out", out, "--variants", "none", "bias")
    assert printed.count("skipped: finished earlier with the same arguments") == 2
    assert [m.stat().st_mtime_ns for m in metrics] == before


def test_other_arguments_make_a_run_stale(done):
    path, out, _ = done
    runs = load_sweep(path).runs(out, ["--trainer.max_steps=3"])
    assert not any(is_finished(r) for r in runs)


def test_print_commands(done, capsys):
    path, out, _ = done
    main([str(path), "--out", str(out), "--print_commands", "--variants", "none", "bias", "--",
          "--trainer.max_steps", "3"])
    lines = capsys.readouterr().out.splitlines()
    runs = load_sweep(path).select(["none", "bias"]).runs(out, ["--trainer.max_steps", "3"])
    assert [shlex.split(line) for line in lines] == [["dsv3", "fit", *r.fit_args] for r in runs]
    for run in runs:  # each printed command is a valid `dsv3 fit`
        check_run(run, str(path))
    # finished runs are not printed again
    main([str(path), "--out", str(out), "--print_commands"])
    captured = capsys.readouterr()
    [broken] = captured.out.splitlines()
    assert broken.startswith("dsv3 fit ") and "broken" in broken
    assert "2 finished run(s) not printed" in captured.err


def test_report_without_matplotlib(done, monkeypatch):
    path, out, _ = done
    png = out / "plot_train_loss.png"
    before = png.stat().st_mtime_ns if png.exists() else None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    printed = sweep(path, "--out", out, "--report_only", "--variants", "none", "bias")
    assert "plots skipped: matplotlib is not installed (pip install matplotlib)" in printed
    assert "| none | no balancing | 1/1 |" in (out / "results.md").read_text()
    assert (png.stat().st_mtime_ns if png.exists() else None) == before


def test_seeds_cross_variants_and_report_only_runs_nothing(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus)
    printed = sweep(path, "--out", tmp_path / "out", "--seeds", "1", "2", "--variants", "bias", "--report_only")
    assert "plots skipped: no run has finished" in printed
    with open(tmp_path / "out" / "results.csv") as f:
        rows = [(r["variant"], r["seed"], r["status"]) for r in csv.DictReader(f)]
    assert rows == [("bias", "1", "not run"), ("bias", "2", "not run")]
    assert "| bias | 0/2 | - | - | - |" in (tmp_path / "out" / "results.md").read_text()  # no description: no column
    assert not (tmp_path / "out" / "bias").exists()


def test_without_seeds_each_variant_runs_once_with_the_base_seed(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("seeds: [7]\n", ""))
    runs = load_sweep(path).runs(tmp_path / "out", ["--trainer.max_steps=5"])
    assert [(r.label, r.seed, r.directory) for r in runs][:2] == [
        ("none", None, tmp_path / "out" / "none"), ("bias", None, tmp_path / "out" / "bias")]
    for run in runs[:2]:
        assert not any(a.startswith("--seed_everything") for a in run.fit_args)
        # order: base configs, the variant's file, its overrides, the extra arguments, then the sweep's own
        configs = [run.fit_args[i + 1] for i, a in enumerate(run.fit_args) if a == "--config"]
        assert configs[-1].endswith(f"balancing/{run.variant.name}.yaml") and len(configs) == 3
        assert run.fit_args.index("--trainer.max_steps=5") < run.fit_args.index("--trainer.enable_progress_bar=false")


# ---------------------------------------------------------------------------------------- errors
def test_missing_base_config(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("small.yaml", "smal.yaml"))
    with pytest.raises(ValueError, match=r"base: config 'smal.yaml' does not exist .* relative to the sweep file's folder"):
        main([str(path)])


def test_unknown_variant_key(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("    overrides: {{trainer", "    override: {{trainer"))
    with pytest.raises(ValueError, match=r"unknown key variants.bias.'override' \(did you mean 'overrides'\?\); "
                                         r"the keys of a variant are config, overrides, description"):
        main([str(path)])


def test_unknown_top_level_key(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("seeds:", "seed:"))
    with pytest.raises(ValueError, match=r"unknown key 'seed' \(did you mean 'seeds'\?\); the keys are base, seeds"):
        main([str(path)])


def test_bad_yaml(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("  none:\n", "  none\n"))
    with pytest.raises(ValueError, match=r"tiny_sweep.yaml is not valid YAML at line \d+, column \d+: .*fix the file's syntax"):
        main([str(path)])


def test_unquoted_off_is_named(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("  none:\n", "  off:\n"))
    with pytest.raises(ValueError, match=r"a variant is named False because YAML reads a bare on/off/yes/no as a "
                                         r"boolean; quote the name"):
        main([str(path)])


def test_unknown_variant_on_the_command_line(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus)
    with pytest.raises(ValueError, match=r"--variants 'biass' is not a variant of .*; its variants are none, bias, broken "
                                         r"\(did you mean 'bias'\?\)"):
        main([str(path), "--variants", "biass"])


def test_bad_override_fails_before_any_run(tmp_path, corpus):
    path = write_sweep(tmp_path, corpus, SWEEP.replace("trainer.gradient_clip_val", "trainer.gradient_clip_vall"))
    with pytest.raises(ValueError, match=r"variant 'bias' is not a valid `dsv3 fit` configuration: .*"
                                         r"trainer.gradient_clip_vall.* Fix the variant's config/overrides"):
        main([str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_model_shape_fails_before_any_run(tmp_path, corpus):
    text = SWEEP.replace("{{trainer.gradient_clip_val: 0.5}}", "{{model.config.n_group: 3}}")
    path = write_sweep(tmp_path, corpus, text)
    with pytest.raises(ValueError, match=r"variant 'bias': model.config.n_routed_experts \(8\) must be divisible by "
                                         r"model.config.n_group \(3\)"):
        main([str(path), "--out", str(tmp_path / "out")])


def test_missing_sweep_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sweep file .*nope.yaml does not exist"):
        main([str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------------------------------- shipped sweeps
SHIPPED = {
    "load_balancing": ["none", "aux_loss", "bias", "bias_seq"],
    "mtp": ["off", "d1", "d2"],
    "fp8": ["float32", "blockwise", "rowwise", "tensorwise"],
    "routing": ["group_limited", "unlimited"],
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweep_parses_and_every_variant_is_a_valid_fit(name, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["dsv3"])
    spec = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    assert [v.name for v in spec.variants] == SHIPPED[name]
    assert spec.seeds and spec.table and spec.plots
    runs = spec.runs(tmp_path, [])
    assert len(runs) == len(spec.variants) * len(spec.seeds)
    for run in runs[:: len(spec.seeds)]:  # one seed per variant: the seed changes no option's validity
        check_run(run, name)

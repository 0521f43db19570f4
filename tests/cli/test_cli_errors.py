"""Bad input ends with the message that explains it (cli_errors.py), not jsonargparse's union dump.

Plugin errors happen when LightningCLI instantiates the classes (the plugin's __init__ raises its own
ValueError): the CLI raises that exception itself. Class-path errors happen at parse time: one
``error:`` line with the key, the problem and the fix, after the usage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, write_config

from dsv3_lightning.cli import main
from dsv3_lightning.cli_errors import ConstructorErrors, short_parse_error

FP8_RECIPE = """
trainer:
  plugins:
    - class_path: dsv3_lightning.plugins.fp8.FP8Precision
      init_args: {recipe: blockwize}
"""
EP_TIMEOUT = """
trainer:
  strategy:
    class_path: dsv3_lightning.plugins.expert_parallel.ExpertParallelStrategy
    init_args: {expert_parallel_size: 1, timeout: 0}
"""
DUALPIPE_MICROBATCHES = """
trainer:
  strategy:
    class_path: dsv3_lightning.plugins.dualpipe.DualPipeStrategy
    init_args: {pipeline_parallel_size: 2, num_microbatches: 0}
"""
PLUGIN_ERRORS = {
    "expert-parallel timeout": (
        EP_TIMEOUT,
        r"^trainer\.strategy\.init_args\.timeout \(0\.0\) must be a positive number of seconds$",
    ),
    "dualpipe micro-batches": (
        DUALPIPE_MICROBATCHES,
        r"^trainer\.strategy\.init_args\.num_microbatches \(0\) must be >= 2 \* pipeline_parallel_size \(4\) "
        r"for schedule 'dualpipev' \(2 stages per rank\); set it to at least 4$",
    ),
}


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


def _args(tmp_path: Path, corpus: Path, yaml: str) -> list[str]:
    base = write_config(tmp_path, corpus, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml)
    return ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(base), "--config", str(bad)]


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("case", PLUGIN_ERRORS, ids=list(PLUGIN_ERRORS))
def test_a_plugins_own_error_is_raised_instead_of_the_union_dump(case, tmp_path, corpus):
    yaml, message = PLUGIN_ERRORS[case]
    with pytest.raises(ValueError, match=message) as raised:
        main(_args(tmp_path, corpus, yaml))
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def _dsv3(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "JSONARGPARSE_DEBUG"} | env
    return subprocess.run(
        [sys.executable, "-m", "dsv3_lightning.cli", *args],
        capture_output=True, text=True, env=environ, timeout=120,
    )


def test_the_last_line_of_stderr_is_the_plugins_message_and_the_dump_is_for_debugging(tmp_path, corpus):
    args = _args(tmp_path, corpus, EP_TIMEOUT)
    message = "trainer.strategy.init_args.timeout (0.0) must be a positive number of seconds"
    plain = _dsv3(args)
    assert plain.returncode == 1
    assert _last_line(plain.stderr) == f"ValueError: {message}"
    assert "Union subtypes" not in plain.stderr and "Given value" not in plain.stderr
    debug = _dsv3(args, JSONARGPARSE_DEBUG="true")  # jsonargparse's switch: the dump comes back, above
    assert _last_line(debug.stderr) == f"ValueError: {message}"
    assert "Does not validate against any of the Union subtypes" in debug.stderr


def _parse_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    return _last_line(capsys.readouterr().err)


def test_a_value_outside_a_plugins_choices_is_one_line_with_them(tmp_path, corpus, capsys):
    """FP8Precision's recipe is a Literal: jsonargparse refuses a misspelling at parse time."""
    assert _parse_error(capsys, _args(tmp_path, corpus, FP8_RECIPE)) == (
        "error: trainer.plugins: class_path 'dsv3_lightning.plugins.fp8.FP8Precision': Parser key \"recipe\": "
        "Expected a typing.Literal['blockwise', 'rowwise', 'tensorwise']. Got value: blockwize; `dsv3 fit "
        "--trainer.plugins.help dsv3_lightning.plugins.fp8.FP8Precision` lists its init_args"
    )


def test_a_misspelt_class_path_is_one_line_with_the_close_spellings(tmp_path, corpus, capsys):
    yaml = "trainer:\n  plugins:\n    - class_path: dsv3_lightning.plugins.fp8.FP8Precisio\n"
    assert _parse_error(capsys, _args(tmp_path, corpus, yaml)) == (
        "error: trainer.plugins: class_path 'dsv3_lightning.plugins.fp8.FP8Precisio': module "
        "'dsv3_lightning.plugins.fp8' has no attribute 'FP8Precisio'; did you mean "
        "'dsv3_lightning.plugins.fp8.FP8Precision' or 'dsv3_lightning.plugins.fp8.FP8Recipe'?"
    )


def test_a_misspelt_init_arg_names_the_right_one(tmp_path, corpus, capsys):
    yaml = DUALPIPE_MICROBATCHES.replace("num_microbatches: 0", "num_microbatchs: 4")
    assert _parse_error(capsys, _args(tmp_path, corpus, yaml)) == (
        "error: trainer.strategy: class_path 'dsv3_lightning.plugins.dualpipe.DualPipeStrategy': Option "
        "'num_microbatchs' is not accepted; did you mean 'num_microbatches'? "
        "(`dsv3 fit --trainer.strategy.help dsv3_lightning.plugins.dualpipe.DualPipeStrategy` lists its init_args)"
    )


def test_a_missing_init_arg_says_which_to_set(tmp_path, corpus, capsys):
    yaml = DUALPIPE_MICROBATCHES.replace("pipeline_parallel_size: 2, ", "")
    assert _parse_error(capsys, _args(tmp_path, corpus, yaml)) == (
        "error: trainer.strategy: class_path 'dsv3_lightning.plugins.dualpipe.DualPipeStrategy': "
        "the following arguments are required: pipeline_parallel_size; set init_args.pipeline_parallel_size (`dsv3 fit "
        "--trainer.strategy.help dsv3_lightning.plugins.dualpipe.DualPipeStrategy` lists its init_args)"
    )


def test_a_misspelt_module_of_a_callback_names_the_module(tmp_path, corpus, capsys):
    args = _args(tmp_path, corpus, "{}")
    misspelt = "--trainer.callbacks+=dsv3_lightning.plugins.load_balancin.ExpertLoadMonitor"
    last = _parse_error(capsys, [*args, misspelt])
    assert last == (
        "error: trainer.callbacks: class_path 'dsv3_lightning.plugins.load_balancin.ExpertLoadMonitor': "
        "module 'dsv3_lightning.plugins' has no attribute 'load_balancin'; did you mean "
        "'dsv3_lightning.plugins.load_balancing'?"
    )


def test_a_class_path_outside_any_module_says_so(tmp_path, corpus, capsys):
    args = _args(tmp_path, corpus, "{}")
    last = _parse_error(capsys, [*args, "--trainer.callbacks+=dsv3_lightnin.NoSuchCallback"])
    assert last.startswith("error: trainer.callbacks: class_path 'dsv3_lightnin.NoSuchCallback': ")
    assert last.endswith(
        "check the module path (an importable module, e.g. dsv3_lightning.plugins.fp8.FP8Precision)"
    )


def test_an_unknown_key_keeps_jsonargparses_line(tmp_path, corpus, capsys):
    yaml = "model:\n  config:\n    n_experts: 4\n"
    assert _parse_error(capsys, _args(tmp_path, corpus, yaml)) == (
        "error: Subcommand 'fit' does not accept option 'model.config.n_experts'"
    )


def test_other_parse_errors_pass_unchanged():
    message = 'Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: x'
    assert short_parse_error(message, "dsv3 fit") is None


def test_a_failure_the_report_does_not_quote_is_not_blamed():
    constructors = ConstructorErrors()
    with pytest.raises(ValueError):
        constructors(int, "not a number")
    assert constructors.explaining(ValueError("something else entirely")) is None
    quoted = ValueError("Errors:\n  - " + str(constructors.raised[0]))
    assert constructors.explaining(quoted) is constructors.raised[0]

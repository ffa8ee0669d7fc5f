"""Config values are checked up front, against one schema, before any model loads."""

import os
import time

import pytest

import rcst_jax.jobs.calibrate
import rcst_jax.jobs.evaluate
import rcst_jax.models.loading
from rcst_edge.errors import ConfigError
from rcst_jax import cli
from rcst_jax.settings import schema

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture
def no_models(monkeypatch):
  """Loading a model (or data) during these probes is itself a failure."""
  def refuse(*a, **k):
    raise AssertionError("models or data loaded before the config was validated")
  for module in (rcst_jax.models.loading, rcst_jax.jobs.evaluate, rcst_jax.jobs.calibrate):
    monkeypatch.setattr(module, "load_models", refuse)
  # `calibrate` without the certificate loads the edge alone.
  monkeypatch.setattr(rcst_jax.jobs.calibrate, "load_model", refuse)
  for module in (rcst_jax.jobs.evaluate, rcst_jax.jobs.calibrate):
    monkeypatch.setattr(module, "load_sources", refuse)


@pytest.mark.parametrize("path", ["imagenet.py", "demo.py"])
def test_shipped_configs_validate(path):
  config = cli.parse_config(os.path.join(REPO, "configs", path), [])
  schema.validate(config)


def test_every_shipped_key_is_in_the_schema():
  for path in ("imagenet.py", "demo.py"):
    flat = schema.flatten(cli.parse_config(os.path.join(REPO, "configs", path), []))
    assert set(flat) <= set(schema.SCHEMA), path


BAD = [
    ("alpha_crc", "0"), ("alpha_crc", "1.0"), ("alpha_aps", "-0.1"), ("alpha_aps", "nan"),
    ("eta", "0"), ("eta", "inf"),
    ("tau_grid", "()"), ("tau_grid", "(0.1,nan)"), ("tau_grid", "abc"),
    ("k_grid", "(-1,10)"), ("k_grid", "(0.5,2)"),
    ("delta_sum_grid", "(-0.1,0.5)"),
    ("tau_grid", "(0.1,1.5)"), ("tau_grid", "(-0.1,0.5)"), ("delta_sum_grid", "(0.5,1.2)"),
    ("certify.lambda_grid", "(0.5,50)"), ("certify.lambda_grid", "(-0.1,)"),
    ("empty_policy", "bogus"), ("gradcam_layer", "nope"),
    ("dtype", "float16"), ("matmul_precision", "fastest"), ("compare_dtype", "float16"),
    ("batch_size", "0"), ("server_batch", "-1"), ("server_min_batch", "-2"), ("chunk_size", "0"),
    ("buckets", "(8,4)"), ("buckets", "(0,8)"), ("buckets", "(8,8)"),
    ("devices", "0"), ("devices", "some"),
    ("data.name", "cifar"), ("data.n_cal", "0"), ("data.n_test", "0"),
    ("per_image", "maybe"), ("gallery_size", "-1"), ("output_dir", ""),
    ("certify.epsilon", "0"), ("certify.test", "t"), ("certify.cost", "kilobytes"),
    ("certify.multiple_testing", "holm"),
    # Cross-field: found before any pass runs, not after the certification's passes.
    ("certify.risks", "('accuracy_drop','edge_risk','accuracy_drop')"),
    ("certify.split", "0.0001"), ("certify.split", "0.9999"),  # of data.n_cal = 4000
    ("certify.test", "binomial"),  # the default risk, accuracy_drop, is three-valued
]


@pytest.mark.parametrize("key,value", BAD)
def test_bad_value_is_refused_before_any_model_loads(key, value, no_models, capsys, tmp_path):
  t0 = time.time()
  code = cli.main(["evaluate", "--config", DEMO, f"--config.{key}={value}",
                   f"--config.output_dir={tmp_path / 'out'}"] if key != "output_dir" else
                  ["evaluate", "--config", DEMO, f"--config.{key}={value}"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("rcst evaluate: error: ") and f"config.{key}" in err, err
  assert "Traceback" not in err
  assert time.time() - t0 < 5
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("override,message", [
    ("--config.tau_gird=(0.1,)", "unknown config key 'tau_gird'"),
    ("--config.data.nmae=synthetic", "unknown config key 'nmae'"),
    ("--config.batch_size=abc", "--config.batch_size=abc"),
    ("--config.alpha_crc=high", "--config.alpha_crc=high"),
])
def test_unknown_key_and_ill_typed_override_are_named(override, message, no_models, capsys):
  for command in (["evaluate", "--config", DEMO], ["calibrate", "--config", DEMO], ["demo"]):
    code = cli.main([*command, override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"rcst {command[0]}: error: ") and message in err, err


def test_library_callers_are_validated_too(no_models):
  config = cli.parse_config(DEMO, [])
  with config.unlocked():
    config.chunk_size = 0
  with pytest.raises(ConfigError, match="config.chunk_size = 0"):
    rcst_jax.jobs.evaluate.evaluate_config(config)


@pytest.mark.parametrize("key,value,allowed", [
    ("tau_grid", (0.1, 1.5), "each a number in [0, 1]; 1.5 is not"),
    ("tau_grid", (-0.2, 0.5), "each a number in [0, 1]; -0.2 is not"),
    ("delta_sum_grid", (0.5, 1.2), "each a number in [0, 1.1] (one above 1 keeps every patch); "
     "1.2 is not"),
    ("certify.lambda_grid", (0.5, 50), "each a number in [0, 1.1] (one above 1 accepts "
     "nothing); 50 is not"),
])
def test_grid_value_out_of_range_names_key_value_and_range(key, value, allowed):
  config = cli.parse_config(DEMO, [f"--config.{key}={value}"], check=False)
  with pytest.raises(ConfigError) as e:
    schema.validate(config)
  assert str(e.value) == (f"config.{key} = {value!r}: must be a tuple of at least 1 value(s), "
                          f"{allowed}")


def test_grid_ends_that_mean_all_or_nothing_pass():
  config = cli.parse_config(DEMO, ["--config.tau_grid=(0.0,1.0)",
                                   "--config.delta_sum_grid=(0,1.01)",
                                   "--config.certify.lambda_grid=(0.0,0.5,1.0,1.01)"])
  assert tuple(config.tau_grid) == (0.0, 1.0)


def test_unknown_key_in_a_config_file_is_refused():
  config = cli.parse_config(DEMO, [])
  with config.unlocked():
    config.tau_gird = (0.1,)
  with pytest.raises(ConfigError, match="unknown config key 'tau_gird'.*'tau_grid'"):
    schema.validate(config)


def test_synthetic_data_needs_n_test():
  config = cli.parse_config(DEMO, [])
  with config.unlocked():
    del config.data["n_test"]
  with pytest.raises(ConfigError, match="data.n_test"):
    schema.validate(config)


@pytest.mark.parametrize("argv,message", [
    (["run", "--tau", "nan"], "--tau: must be a number in [0, 1]"),
    (["run", "--tau", "inf"], "--tau: must be a number in [0, 1]"),
    (["run", "--tau", "1.7"], "--tau: must be a number in [0, 1]"),
    (["run", "--tau", "-0.1"], "--tau: must be a number in [0, 1]"),
    (["run", "--tau", "0.5", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["explain", "--tau=-inf", "--out", "x.png"], "--tau: must be a number in [0, 1]"),
    (["predict", "--model", "m", "--batch-size=-1"], "--batch-size: must be an integer"),
])
def test_run_explain_predict_refuse_bad_numbers(argv, message, capsys):
  if argv[0] in ("run", "explain"):
    argv = [*argv[:1], "--edge", "e", "--calibration", "c.json",
            *(["--server", "s"] if argv[0] == "run" else []), *argv[1:]]
  with pytest.raises(SystemExit) as exit_:
    cli.main([*argv, "image.png"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("override, message", [
    ("--config.buckets=(8,)", "largest bucket"), ("--config.k_grid=(10,400)", "exceed the 196")])
def test_checks_that_need_the_server_grid(tmp_path, override, message):
  import small_models

  from rcst_edge.errors import ConfigError
  from rcst_jax.data.sources import Sources
  from rcst_jax.data.synthetic import SyntheticShapes
  from rcst_jax.models.loading import Models
  from rcst_jax.sweep import engine
  config = cli.parse_config("imagenet:smoke", [f"--config.output_dir={tmp_path}", override])
  models = Models(small_models.server(), small_models.server(), small_models.server())
  with pytest.raises(ConfigError, match=message):
    engine.Sweep(config, models, Sources(SyntheticShapes("test", 2), SyntheticShapes("test", 2)),
                 str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    (["--config.certify.risks=('accuracy_drop','degradation','accuracy_drop')"],
     "config.certify.risks = ('accuracy_drop', 'degradation', 'accuracy_drop'): must be a tuple "
     "of at least 1 value(s), each one of ['accuracy_drop', 'degradation', 'system_error', "
     "'edge_risk'], none twice; 'accuracy_drop' is given twice"),
    (["--config.certify.split=0.002"],
     "config.certify.split = 0.002: must be a fraction of data.n_cal = 200 calibration images "
     "that leaves both parts non-empty (it gives 0 fitting and 200 testing images)"),
    (["--config.certify.split=0.998"],
     "config.certify.split = 0.998: must be a fraction of data.n_cal = 200 calibration images "
     "that leaves both parts non-empty (it gives 200 fitting and 0 testing images)"),
    (["--config.data.n_cal=1", "--config.certify.split=0.5"],
     "it gives 0 fitting and 1 testing images"),  # round half to even, as the split does
    (["--config.certify.test=binomial"], "config.certify.test = 'binomial': must be 'exact', "
     "'wsr' or 'hb' when certify.risks has accuracy_drop"),
])
def test_certification_settings_are_refused_before_anything_runs(overrides, message, no_models,
                                                                  capsys, tmp_path):
  """Each used to fail only after the model passes (or after certification) ran."""
  for command in ("calibrate", "evaluate", "demo"):
    out = tmp_path / command
    code = cli.main([command, "--config", "demo:smoke", f"--config.output_dir={out}",
                     *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"rcst {command}: error: ") and message in err, err
    assert not os.path.exists(out)


def test_settings_that_do_not_certify_are_not_held_to_the_certification():
  cli.parse_config("demo:smoke", ["--config.certify.enabled=False",
                                  "--config.certify.split=0.002", "--config.certify.test=binomial"])
  cli.parse_config("demo:smoke", ["--config.certify.test=binomial",
                                  "--config.certify.risks=('degradation','edge_risk')"])


def test_the_split_sizes_checked_are_the_certification_s():
  import numpy as np

  from rcst_jax.sweep import certification
  for n in (1, 2, 3, 7, 200, 4000):
    for fraction in (0.001, 0.1, 0.25, 0.3, 0.5, 0.7, 0.999):
      fit, test = certification.split(np.arange(n), fraction, seed=0)
      assert (len(fit), len(test)) == schema.certify_split_sizes(n, fraction), (n, fraction)

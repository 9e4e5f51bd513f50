"""The image experiment end to end at toy scale: every stage trains, evaluation writes a report."""
import json
import os
import re

import pytest

from cdjax import checkpoint
from cdjax import experiment
from cdjax import provenance
from cdjax import train
from configs import mnist_demo


def tiny_config():
  c = mnist_demo.get_config()
  c.data.max_eval_examples = 24
  c.classifier.update(net_kwargs=dict(num_classes=10, width=8, depth=1), num_steps=2, batch_size=16)
  tiny_unet = dict(num_classes=10, width=8, ch_mult=(1,), num_res_blocks=1, attn_levels=())
  c.signal.update(net_kwargs=tiny_unet, sde_kwargs=dict(N=3), pretrain_steps=2, batch_size=16)
  c.logits.update(net_kwargs=dict(num_classes=10, hidden=16, depth=1, enc_width=8, enc_depth=1),
                  sde_kwargs=dict(N=3), pretrain_steps=2, batch_size=16)
  c.train.update(joint_steps=2, log_every=1, ckpt_every=2)
  c.sampling.batch_size = 16
  c.mesh.data = 1   # one device: 8 virtual ones on 2 CPU cores only add compile and transfer time
  c.evaluation.methods = {"noisy": dict(strategy="noisy"),
                          "enhance_then_classify": dict(strategy="enhance_then_classify",
                                                        params="pretrained"),
                          "parallel": dict(strategy="parallel"),
                          "nested": dict(strategy="nested", nested_steps=(1,))}
  return c


def test_experiment_trains_every_stage_and_writes_the_report(tmp_path, files_under, capsys):
  config, workdir, out = tiny_config(), str(tmp_path / "work"), str(tmp_path / "results" / "toy")
  rows = experiment.run(config, workdir, out)
  for stage in ("classifier/classifier", "gn30/signal", "gn30/logits", "gn30/joint"):
    assert os.path.isdir(os.path.join(workdir, stage)), stage
  saved = sorted(f.split("-")[0] for f in os.listdir(os.path.join(workdir, "gn30", "eval")))
  assert saved == ["enhance_then_classify", "nested", "noisy", "parallel"]   # resumable evaluation
  report = json.load(open(out + ".json"))
  assert report["command"] and report["config"]["data"]["name"] == "mnist_local"
  assert report["commit"] == provenance.git_commit() and report["machine"] == provenance.machine()
  assert report["software"] == provenance.software()
  methods = [r["method"] for r in report["rows"]]
  assert methods == ["noisy", "enhance_then_classify", "nested", "parallel"]
  by_method = {r["method"]: r for r in rows}
  assert [by_method[m]["nfe"] for m in methods] == [0, 3, 3 + 3 + 3, 6]
  for r in rows:
    assert 0.0 <= r["ci95_lo"] <= r["accuracy"] <= r["ci95_hi"] <= 1.0
  assert "diff_vs_reference" in by_method["parallel"] and "diff_vs_reference" not in by_method["enhance_then_classify"]
  assert open(out + ".md").read().startswith(
      f"Command: `{report['command']}`\n\nCommit {report['commit']}, on {report['machine']}; "
      f"{report['software']}.\n\n| ")
  assert os.path.getsize(out + ".png") > 1000

  # Training again reuses every finished stage: no checkpoint is rewritten; a stage whose inputs
  # changed since is named with the changed fields (evaluation-only fields are not inputs).
  before = files_under(workdir)
  capsys.readouterr()
  config.signal.sde_kwargs.N = 4
  config.evaluation.corruptions.gn30.p = 0.25
  config.data.max_eval_examples = 48
  config.train.update(ema_decay=0.95, log_every=7, joint_lr_scales=dict(signal=1.0, logits=0.5))
  config.checkpoint.init_signal = "runs/elsewhere"
  experiment.train_all(config, workdir)
  assert files_under(workdir) == before
  said = dict(line[1:].split("] ", 1) for line in capsys.readouterr().out.splitlines())
  changed = {stage: line.partition("trained with other ")[2].partition(":")[0]
             for stage, line in said.items()}
  assert all(line.startswith("reusing") for line in said.values())
  ema = "train.ema_decay"
  assert changed == {"classifier": ema, "signal": f"checkpoint.init_signal, corruption.kwargs.p, signal.sde_kwargs.N, {ema}",
                     "logits": f"corruption.kwargs.p, {ema}",
                     "joint": f"corruption.kwargs.p, signal.sde_kwargs.N, {ema}, "
                              "train.joint_lr_scales.logits"}

  # A frozen classifier whose export was cut short (no provenance record yet) is exported again.
  record_path = os.path.join(workdir, "classifier", "classifier", "provenance.json")
  record = json.load(open(record_path))
  os.remove(record_path)
  experiment.train_stage(config, os.path.join(workdir, "classifier"), "classifier")
  assert json.load(open(record_path))["sha256"] == record["sha256"]
  # More (or fewer) steps would replace the classifier the other stages were trained against:
  # refused, naming the step it was exported at.
  for steps in (3, 1):
    config.classifier.num_steps = steps
    with pytest.raises(checkpoint.CheckpointError, match=(
        rf"from its checkpoint at step 2; classifier.num_steps={steps} asks for another. Set "
        r"classifier.num_steps=2")):
      experiment.train_stage(config, os.path.join(workdir, "classifier"), "classifier")
  assert json.load(open(record_path))["sha256"] == record["sha256"]


def test_missing_runs_to_start_from_are_named_before_anything_trains(tmp_path):
  """A branch's starting run (checkpoint.init_<branch>) or the Ex-Diff enhancer that is not there
  stops train_all before the classifier trains; a branch that has started training no longer
  needs its starting run."""
  config, workdir = tiny_config(), tmp_path / "work"
  config.checkpoint.init_logits = str(tmp_path / "se" / "{corruption}" / "logits")
  missing = re.escape(str(tmp_path / "se" / "gn30" / "logits"))
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"checkpoint.init_logits='.*{{corruption}}/logits': no run in {missing} \(corruption "
      r"'gn30'\)\. Train that run first .* --config.checkpoint.init_logits=<its workdir>")):
    experiment.train_all(config, str(workdir))
  assert not workdir.exists()
  os.makedirs(workdir / "gn30" / "logits" / "checkpoints")
  experiment.check_runs_exist(config, str(workdir))
  config.checkpoint.enhancer = str(tmp_path / "se" / "{corruption}" / "enhancer")
  experiment.check_runs_exist(config, str(workdir))   # the signal net reads no latent
  config.signal.net_kwargs.latent_mode = "film"
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.enhancer=.*no run in"):
    experiment.check_runs_exist(config, str(workdir))


def test_joint_stage_starts_from_the_pretrained_branches(monkeypatch, tmp_path):
  """train_all gives the joint stage `init_signal` / `init_logits` pointing at the branch's own
  pre-trained signal and logit stages (else joint fine-tuning starts from random weights); the
  branch stages keep the config's own starting runs ("{corruption}" replaced)."""
  config, workdir = tiny_config(), str(tmp_path / "work")
  config.checkpoint.init_signal = "runs/{corruption}/sgmse"
  calls = []
  monkeypatch.setattr(experiment, "check_runs_exist", lambda *args: None)
  monkeypatch.setattr(experiment, "train_stage", lambda cfg, stage_dir, stage: calls.append(
      (stage, stage_dir, cfg.checkpoint.init_signal, cfg.checkpoint.init_logits)))
  experiment.train_all(config, workdir)
  branch = os.path.join(workdir, "gn30")
  assert calls == [
      ("classifier", os.path.join(workdir, "classifier"), "runs/{corruption}/sgmse", ""),
      ("signal", os.path.join(branch, "signal"), "runs/gn30/sgmse", ""),
      ("logits", os.path.join(branch, "logits"), "runs/gn30/sgmse", ""),
      ("joint", os.path.join(branch, "joint"), os.path.join(branch, "signal"),
       os.path.join(branch, "logits"))]
  assert config.checkpoint.init_signal == "runs/{corruption}/sgmse"   # left as it was


def test_stage_config_uses_the_stage_learning_rate():
  config = tiny_config()
  config.classifier.lr = 0.05
  assert train.stage_config(config, "classifier").optim.lr == 0.05
  assert train.stage_config(config, "signal").optim.lr == config.optim.lr
  assert config.optim.lr != 0.05   # the experiment's config is left as it was


def test_changed_fields_are_the_stage_inputs_that_differ_from_its_record(tmp_path):
  """A reused stage is compared with its record (config.json as `train.train` writes it, with
  the stage's own learning rate) in the fields it learns from, and only those."""
  config = tiny_config()
  config.classifier.lr = 0.05   # the classifier's record holds optim.lr=0.05
  for stage in ("classifier", "joint"):
    os.makedirs(tmp_path / stage)
    (tmp_path / stage / "config.json").write_text(
        train.stage_config(config, stage).to_json_best_effort())
  changed = lambda stage: experiment._changed_fields(config, str(tmp_path / stage), stage)
  assert changed("classifier") == changed("joint") == []
  config.sampling.switch_t = 0.25    # the joint logit net learns the switch
  config.sampling.batch_size = 8     # evaluation only
  config.train.log_every = 9         # logging only
  config.corruption.kwargs.p = 0.1   # the classifier trains on clean data
  assert changed("classifier") == []
  assert changed("joint") == ["corruption.kwargs.p", "sampling.switch_t"]


def test_joint_parameters_only_where_the_joint_stage_trains():
  """A method asking for the joint stage's parameters without `train.joint_steps` is refused by
  `check_config`, before anything trains."""
  config = tiny_config()
  assert experiment.param_sources(config) == ("pretrained", "joint")
  config.train.joint_steps = 0
  assert experiment.param_sources(config) == ("pretrained",)
  experiment.check_config(config)   # methods without `params` take the pre-trained branches
  config.evaluation.methods.parallel.params = "joint"
  with pytest.raises(ValueError, match=(r"evaluation.methods.parallel.params='joint': no such "
                                        r"parameters; use one of \['pretrained'\]")):
    experiment.check_config(config)


def test_method_order_puts_the_baselines_first_in_their_order():
  names = ["parallel", "card", "noisy", "alternating", "enhance_then_classify"]
  assert experiment.method_order(names) == ["noisy", "enhance_then_classify", "card",
                                            "alternating", "parallel"]


def test_methods_pick_pretrained_or_joint_parameters():
  params = {"pretrained": "P", "joint": "J"}
  assert experiment.method_params(params, "m", {"strategy": "card", "params": "pretrained"}) == (
      "P", {"strategy": "card"})
  assert experiment.method_params(params, "m", {"strategy": "parallel"}) == ("J", {"strategy": "parallel"})
  assert experiment.method_params({"pretrained": "P"}, "m", {})[0] == "P"   # no joint stage
  with pytest.raises(ValueError, match=r"methods.m.params='joint': no such parameters"):
    experiment.method_params({"pretrained": "P"}, "m", {"params": "joint"})


def test_corruption_entries_set_kwargs_name_and_init_paths():
  config = tiny_config()
  config.corruption.name = "add_noise"
  config.evaluation.corruptions = {"noise": dict(snr_db=(0.0, 5.0)),
                                   "noise_reverb": dict(name="noise_reverb", rt60=(0.2, 0.8))}
  config.checkpoint.init_signal = "runs/speech/{corruption}/sgmse"
  noise = experiment.corruption_config(config, "wd", "noise")
  reverb = experiment.corruption_config(config, "wd", "noise_reverb")
  assert (noise.corruption.name, noise.corruption.kwargs.to_dict()) == ("add_noise", {"snr_db": (0.0, 5.0)})
  assert (reverb.corruption.name, reverb.corruption.kwargs.to_dict()) == ("noise_reverb", {"rt60": (0.2, 0.8)})
  assert reverb.checkpoint.init_signal == "runs/speech/noise_reverb/sgmse"
  assert (reverb.checkpoint.init_logits, reverb.checkpoint.classifier) == (
      "", os.path.join("wd", "classifier", "classifier"))
  assert config.evaluation.corruptions["noise_reverb"]["name"] == "noise_reverb"   # left as it was


@pytest.mark.parametrize("field, value, message", [
    ("sampling.signal_predictor", "ancestrl",
     r"sampling.signal_predictor='ancestrl': Unknown predictor 'ancestrl'. Did you mean "
     r"'ancestral'"),
    ("sampling.corrector", "langevn", r"sampling.corrector='langevn': .*Did you mean 'langevin'"),
    ("evaluation.methods.parallel.logits_corrector", "sme",
     r"evaluation.methods.parallel.logits_corrector='sme': Unknown corrector"),
    ("evaluation.methods.parallel.strategy", "paralel",
     r"evaluation.methods.parallel.strategy='paralel': Unknown strategy .*Did you mean 'parallel'"),
    ("evaluation.methods.nested.logits_predictor", "posterior",
     r"evaluation.methods.nested.logits_predictor='posterior': .*'posterior_mean'"),
    ("evaluation.methods.parallel.params", "jont",
     r"evaluation.methods.parallel.params='jont': no such parameters; use one of"),
    ("sampling.batch_size", 7, r"sampling.batch_size=7: .*use a multiple of 2, e.g. 8"),
    ("evaluation.methods.noisy.batch_size", 5,
     r"evaluation.methods.noisy.batch_size=5: .*use a multiple of 2"),
    ("logits.sde_kwargs.N", 7,
     r"methods.parallel.strategy='parallel': Parallel needs equal step counts; signal N=3, "
     r"logits N=7"),
    ("corruption.name", "gn_replac", r"corruption.name='gn_replac': Unknown corruption"),
    ("evaluation.corruptions.gn30", dict(q=0.3),
     r"evaluation.corruptions.gn30: got an unexpected keyword argument 'q' \(corruption "
     r"'gn_replace' takes p\)"),
    ("data.shape", (32, 32, 3), r"data.shape=\(32, 32, 3\), but mnist_local's images are "
                                r"\(28, 28, 1\): set data.shape=\(28, 28, 1\)"),
])
def test_run_refuses_a_bad_method_before_training(field, value, message, monkeypatch, tmp_path):
  """Each method's sampling config, merged as evaluation merges it, the corruptions and the
  data's shape are checked before `run` trains anything; the error names the field."""
  config = tiny_config()
  config.mesh.data = 2
  config.update_from_flattened_dict({field: value})
  monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
  with pytest.raises(ValueError, match=message):
    experiment.run(config, str(tmp_path / "work"), str(tmp_path / "out"))


def test_run_refuses_an_output_it_cannot_write_before_training(monkeypatch, tmp_path):
  (tmp_path / "a_file").write_text("")
  monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
  with pytest.raises(OSError, match=rf"Cannot write the results to {tmp_path / 'a_file' / 'x'}"):
    experiment.run(tiny_config(), str(tmp_path / "work"), str(tmp_path / "a_file" / "x" / "out"))


@pytest.mark.parametrize("method, message", [
    (dict(strategy="alternating", round=3),
     r"evaluation.methods.m.round: not a sampling field.*Closest fields: rounds"),
    (dict(strategy="parallel", guidance=dict(signal_scal=1.0)),
     r"evaluation.methods.m.guidance.signal_scal: not a sampling field.*signal_scale"),
])
def test_run_refuses_a_method_field_that_sampling_lacks(method, message, monkeypatch, tmp_path):
  """A misspelt field in a method's overrides would be merged in and ignored: `run` names it
  before training. Open sections (predictor_kwargs) take any field."""
  config = tiny_config()
  config.evaluation.methods["ok"] = dict(strategy="parallel", predictor_kwargs=dict(eta=0.5))
  experiment.check_config(config)
  config.evaluation.methods["m"] = method
  monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
  with pytest.raises(ValueError, match=message):
    experiment.run(config, str(tmp_path / "work"), str(tmp_path / "out"))

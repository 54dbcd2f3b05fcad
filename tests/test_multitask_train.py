"""`bitfit-fast train --task-files ...`: several tasks trained together in mixed batches, each a run of its own."""

import collections
import json
import re
import shutil

import pytest
import safetensors.torch
import torch
from test_trainer import save_tiny_bert, write_csv

from bitfit_fast import cli
from bitfit_fast.checkpoint import WEIGHTS_NAME
from bitfit_fast.errors import UserError
from bitfit_fast.train import TrainConfig
from bitfit_fast.train.multitask import TaskFiles, train_tasks
from bitfit_fast.train.run import claimed, load_run


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    model = save_tiny_bert(root / "model", dropout=0.1)
    files = {
        "topics": (write_csv(root / "topics-train.csv", 36, 1), write_csv(root / "topics-val.csv", 12, 2)),
        "sport-or-tech": (write_csv(root / "st-train.csv", 20, 3, labels=("sport", "tech")),
                          write_csv(root / "st-val.csv", 10, 4, labels=("sport", "tech"))),
    }
    args = ["train", "--model", model, "--epochs", "3", "--batch-size", "8", "--lr", "1e-2", "--backend", "torch",
            "--no-progress", "--output-dir", str(root / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    return root, files


def test_each_task_of_a_joint_run_is_a_run_of_its_own(joint_run, capsys):
    root, files = joint_run
    summary = json.loads((root / "runs" / "run_summary.json").read_text())
    assert list(summary["tasks"]) == list(files) and summary["steps"] == 3 * 7  # 56 examples in batches of 8
    # Each task's training loss on the batches that held it; the joint loss, the mean of the batch's tasks' losses.
    by_step = collections.defaultdict(dict)
    for name in files:
        for entry in summary["tasks"][name]["losses"]:
            by_step[entry["step"]][name] = entry["loss"]
    assert [entry["step"] for entry in summary["losses"]] == sorted(by_step) == list(range(1, 22))
    for entry in summary["losses"]:
        losses = by_step[entry["step"]].values()
        assert entry["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert any(len(tasks) == 2 for tasks in by_step.values()), "a mean of two tasks' losses is checked"
    capsys.readouterr()
    for name, (train, validation) in files.items():
        run = root / "runs" / name
        recorded_files = {key: summary["tasks"][name][key] for key in ("train_file", "validation_file")}
        assert recorded_files == dict(train_file=train, validation_file=validation)
        for part in ("run_config.json", "run_summary.json", "biases/bitfit_biases.safetensors",
                     "biases-last/bitfit_biases.safetensors", "learning_curves.png"):
            assert (run / part).is_file(), part
        recorded = json.loads((run / "run_config.json").read_text())
        assert recorded["config"]["validation_file"] == validation and recorded["num_labels"] == (3, 2)[
            name != "topics"]
        best, saved = summary["tasks"][name]["best"], summary["tasks"][name]["saved_biases"]
        assert saved == {"biases": best["epoch"], "biases-last": 3}
        if best["epoch"] != 3:  # the epochs' biases differ: the joint steps trained this task
            first, last = (safetensors.torch.load_file(run / d / "bitfit_biases.safetensors")
                           for d in ("biases", "biases-last"))
            assert any(not torch.equal(first[k], last[k]) for k in first)
        # The task's best biases, saved from the bank, score on a fresh single-task model what the bank scored.
        assert cli.main(["eval", str(run)]) == 0
        assert capsys.readouterr().out.strip().startswith(f"{run}: validation accuracy {best['value']:.4f} (")
    assert cli.main(["predict", str(root / "runs" / "sport-or-tech"), "--text", "goal team", "robot chip"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(row["probabilities"]) for row in rows] == [{"sport", "tech"}] * 2


@pytest.mark.parametrize("extra,message", [
    (["--task-files", "a", "t.csv", "v.csv"], "--task-files trains several tasks together: give it at least twice"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "a", "t.csv", "v.csv"],
     "--task-files names must differ, also in more than letter case (each names a directory), got ['a', 'a']"),
    (["--task-files", "Sport", "t.csv", "v.csv", "--task-files", "sport", "t.csv", "v.csv"],
     "--task-files names must differ, also in more than letter case (each names a directory), got ['Sport', "
     "'sport']"),
    (["--task-files", "a/b", "t.csv", "v.csv", "--task-files", "c", "t.csv", "v.csv"],
     "--task-files name 'a/b' must be a plain directory name"),
    (["--task-files", "n" * 256, "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv"],
     "--task-files name 'nnnnnnnnnnnnnnnnnnnn'... is 256 bytes long: it names a directory, which file systems allow at "
     "most 255 bytes; choose a shorter name"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv", "--resume", "--save-every", "3"],
     "--task-files trains several tasks from their files in one process: leave out --resume, --save-every"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv", "--method", "full"],
     "--task-files trains BitFit tasks: --method full is not one"),
    (["--task-files", "biases", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv"],
     "--task-files name 'biases' is a file of the joint run's directory: choose another name"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "Biases-Last", "t.csv", "v.csv"],
     "--task-files name 'Biases-Last' is a file of the joint run's directory: choose another name"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv", "--validation-file", "v.csv"],
     "--task-files trains several tasks from their files in one process: leave out --validation-file"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv", "--backend", "triton"],
     "--backend triton: backend='triton' needs a CUDA GPU"),
    (["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv"],
     "--task-files trains in one process: start it without torchrun"),
])
def test_joint_run_mistakes_end_with_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("bitfit_fast_kernels.INTERPRETER", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "torchrun" in message:
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--output-dir", str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitfit-fast train: error: ") and message in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("joint", [False, True])
def test_triton_in_bf16_under_the_interpreter_is_refused_before_anything_loads(joint, tmp_path, capsys, monkeypatch):
    """The Triton CPU interpreter has no bf16 GEMM (triton#11584): one line before the model loads, not a
    traceback at the first kernel (and a task's record left behind)."""
    monkeypatch.setattr("bitfit_fast_kernels.INTERPRETER", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = ["--task-files", "a", "t.csv", "v.csv", "--task-files", "b", "t.csv", "v.csv"] if joint else []
    assert cli.main(["train", "--backend", "triton", "--bf16", "--output-dir", str(tmp_path / "runs"), *data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend triton --bf16: the Triton CPU interpreter cannot multiply bf16" in err
    assert not (tmp_path / "runs").exists()


def test_a_train_config_refuses_counts_below_one():
    for options in (dict(epochs=0), dict(batch_size=-8), dict(micro_batch_size=0), dict(max_length=2.5),
                    dict(epochs=True), dict(save_every=-1)):
        with pytest.raises(ValueError, match=f"{next(iter(options))} must be"):
            TrainConfig(**options)


def test_train_tasks_refuses_the_options_a_joint_run_would_ignore(tmp_path):
    """The Python API: a TrainConfig's own data, resume, checkpoints or micro-batches are refused, not ignored."""
    tasks = [TaskFiles(name, "t.csv", "v.csv") for name in ("a", "b")]
    for options, named in [(dict(resume=True, save_every=3), "resume, save_every"),
                           (dict(micro_batch_size=2), "micro_batch_size"), (dict(task="sst2"), "task")]:
        config = TrainConfig(output_dir=str(tmp_path / "runs"), **options)
        with pytest.raises(UserError, match=f"leave the TrainConfig's {named} unset"):
            train_tasks(config, tasks, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()


def test_a_joint_run_or_its_tasks_are_never_trained_over(joint_run, capsys, tmp_path):
    root, files = joint_run
    saved = {p: p.read_bytes() for p in (root / "runs").rglob("*") if p.is_file()}
    again = ["train", "--model", str(root / "model"), "--epochs", "1", "--backend", "torch", "--no-progress"]
    for name, (train, validation) in files.items():
        again += ["--task-files", name, train, validation]
    train, validation = files["topics"]
    single = ["train", "--model", str(root / "model"), "--epochs", "1", "--backend", "torch", "--no-progress",
              "--train-file", train, "--validation-file", validation]
    for args, message in ((again + ["--output-dir", str(root / "runs")], "runs already holds a run (run_summary.json)"),
                          (single + ["--output-dir", str(root / "runs" / "topics")],
                           "runs/topics already holds a run (biases): choose another --output-dir"),
                          (single + ["--output-dir", str(root / "runs" / "topics"), "--resume"],
                           "runs/topics holds a finished run without a checkpoint (biases, no checkpoint.pt; a "
                           "--task-files run's tasks keep none): it cannot be continued")):
        assert cli.main(args) == 2
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (root / "runs").rglob("*") if p.is_file()} == saved
    # A directory that holds no joint run but a task's run where a task of the joint run would go.
    shutil.copytree(root / "runs" / "topics", tmp_path / "other" / "topics")
    kept = {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()}
    assert cli.main(again + ["--output-dir", str(tmp_path / "other")]) == 2
    assert "other/topics already holds a run (biases): choose another --output-dir" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()} == kept
    # A directory another run is training in (the joint run's own, or a task's): refused before anything loads.
    for busy in (tmp_path / "busy", tmp_path / "busy-task" / "topics"):
        with claimed(busy):
            assert cli.main(again + ["--output-dir", str(busy.parent if busy.name == "topics" else busy)]) == 2
            assert f"--output-dir {busy} is in use: another bitfit-fast train is running there" in \
                capsys.readouterr().err


def test_a_joint_run_that_stopped_before_its_first_epoch_ended_starts_again(joint_run, tmp_path, capsys):
    """A NaN loss or Ctrl-C in the first epoch leaves only the tasks' records: the same command starts it again,
    as Ctrl-C says. A lone single-task record in the joint run's directory is another run's (eval would read it
    as the directory's run): refused."""
    root, files = joint_run
    out = tmp_path / "runs"
    for name in files:
        (out / name).mkdir(parents=True)
        shutil.copy(root / "runs" / name / "run_config.json", out / name)
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "8", "--backend", "torch",
            "--no-progress", "--max-train-examples", "8"]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    interrupted = cli.build_parser().parse_args(args + ["--output-dir", str(out)])
    assert cli._resume_hint(interrupted) == "; no epoch had finished: the same command starts it again"
    capsys.readouterr()
    assert cli.main(args + ["--output-dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert "a joint run gives each task a new output layer" not in said  # the model has no head of its own
    # 16 examples in batches of 8: each task on one or two batches, its 8 examples spread over them.
    share = re.search(r"each epoch, each task steps on the batches that hold its examples: topics (\d) steps of "
                      r"([\d.]+) examples, sport-or-tech (\d) steps of ([\d.]+) examples on average \(a run of its "
                      r"own: batches of 8\)", said)
    assert share, said
    for steps, examples in (share.groups()[:2], share.groups()[2:]):
        assert int(steps) in (1, 2) and int(steps) * float(examples) == 8
    assert cli._resume_hint(interrupted).startswith("; a joint run has no --resume: the task runs in")

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(root / "runs" / "topics" / "run_config.json", other)
    assert cli.main(args + ["--output-dir", str(other)]) == 2
    assert f"--output-dir {other} is not empty (run_config.json): a joint run starts in a new or empty directory" in \
        capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["run_config.json"]


def test_a_joint_run_from_a_model_with_a_trained_head_says_each_task_gets_its_own(joint_run, tmp_path, capsys):
    """A single-task run starts from a classifier the checkpoint holds; a joint run gives every task its own new
    one, and says so."""
    import transformers

    root, files = joint_run
    model = transformers.BertForSequenceClassification.from_pretrained(root / "model", num_labels=3)
    model.save_pretrained(tmp_path / "classifier")
    transformers.AutoTokenizer.from_pretrained(root / "model").save_pretrained(tmp_path / "classifier")
    args = ["train", "--model", str(tmp_path / "classifier"), "--epochs", "1", "--backend", "torch", "--no-progress",
            "--max-train-examples", "4", "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "holds a trained classification head: a joint run gives each task a new output layer of its own " \
           "instead (train a task alone to start from that head)" in capsys.readouterr().out


def test_a_joint_run_repeats_under_its_seed(joint_run, tmp_path):
    """The same joint run twice, with dropout: every task's trained values are the same, bit for bit."""
    root, files = joint_run
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "8", "--lr", "1e-2",
            "--backend", "torch", "--no-progress", "--seed", "7"]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    for out in ("first", "second"):
        assert cli.main(args + ["--output-dir", str(tmp_path / out)]) == 0
    for name in files:
        first, second = (safetensors.torch.load_file(tmp_path / out / name / "biases-last" / WEIGHTS_NAME)
                         for out in ("first", "second"))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)


def test_a_task_of_a_joint_run_that_stopped_early_says_to_train_again(joint_run, tmp_path):
    """A joint run keeps no checkpoint: a task directory without biases says to run the joint command again, not
    to --resume it."""
    root, _ = joint_run
    task = tmp_path / "topics"
    task.mkdir()
    (task / "run_config.json").write_text((root / "runs" / "topics" / "run_config.json").read_text())
    with pytest.raises(UserError, match=r"stopped before its first epoch finished: train it again \(its "
                                        r"--task-files command\)"):
        load_run(str(task))


@pytest.mark.parametrize("method,trains", [("frozen", "its head alone"), ("full", "every weight")])
def test_a_run_of_a_method_that_saves_no_biases_says_what_it_trains(joint_run, tmp_path, method, trains):
    root, _ = joint_run
    record = json.loads((root / "runs" / "topics" / "run_config.json").read_text())
    del record["joint_run"]
    record["config"]["method"] = method
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"has no biases/: --method {method} trains {trains}, and only the BitFit "
                                        "methods save what they train"):
        load_run(str(tmp_path / "run"))


def test_class_labels_and_scores_say_which_option_they_need(joint_run, tmp_path, capsys):
    root, files = joint_run
    scores = tmp_path / "scores.csv"
    scores.write_text("text,label\ngoal match,0.25\nbank price,0.75\nteam goal,0.5\n")
    new_scores = tmp_path / "new-scores.csv"
    new_scores.write_text("text,label\ngoal team,0.3\nprice bank,0.9\n")
    common = ["train", "--model", str(root / "model"), "--backend", "torch", "--no-progress", "--output-dir",
              str(tmp_path / "runs")]
    # --regression is shared by a joint run's tasks: a task of classes among them is told to train apart.
    assert cli.main([*common, "--regression", "--task-files", "topics", *files["topics"],
                     "--task-files", "score", str(scores), str(scores)]) == 2
    err = capsys.readouterr().err
    assert "column 'label' is not a score" in err and err.strip().endswith(
        "(if it is a task of classes: the tasks of a joint run share --regression, so train it in a run of its own)")
    # Scores read as classes: the validation's new values are named, with the option they need.
    assert cli.main([*common, "--train-file", str(scores), "--validation-file", str(new_scores)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "has labels ['0.3', '0.9'] that the training data does not have ['0.25', '0.5', '0.75']: remove those rows, "
        "or train on data that has them; if the column holds scores, pass --regression")
    assert not (tmp_path / "runs").exists()


def test_a_joint_runs_output_dir_names_its_task_runs(joint_run, capsys):
    root, _ = joint_run
    runs = root / "runs"
    for command in ("eval", "predict", "serve"):
        assert cli.main([command, str(runs), *(["--text", "goal"] if command == "predict" else [])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert (f"{runs} is not a `bitfit-fast train` run (it has no run_config.json): it holds the runs "
                f"{runs / 'sport-or-tech'}, {runs / 'topics'}: pass one of them") in err


def test_the_tasks_of_a_joint_run_serve_together(joint_run):
    from bitfit_fast import serve
    from bitfit_fast.serve import RunsPredictor

    root, files = joint_run
    runs = [str(root / "runs" / name) for name in files]
    predictor = RunsPredictor(runs, backend="torch")
    examples = [predictor.check(dict(task=task, text=text)) for task, text in
                (("topics", "bank price"), ("sport-or-tech", "goal team"), ("topics", "robot chip"))]
    for example, answer in zip(examples, predictor.predict(examples)):
        alone = serve.predict(str(root / "runs" / example["task"]), texts=[("bank price",), ("goal team",),
                                                                          ("robot chip",)])
        expected = next(row for row in alone if predictor.tokenizer(row["text"])["input_ids"] == example["input_ids"])
        assert answer["label"] == expected["label"]
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)


def test_a_joint_fp16_run_scales_its_loss(joint_run, tmp_path, monkeypatch):
    root, files = joint_run
    scaled = []

    class RecordingScaler(torch.amp.GradScaler):
        def scale(self, outputs):
            scaled.append(self.is_enabled())
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "28", "--fp16", "--backend",
            "torch", "--no-progress", "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    assert scaled == [True, True], "each of the two steps scales its fp16 loss"


def test_each_step_of_a_joint_run_clips_and_steps_only_its_batchs_tasks(joint_run, tmp_path, monkeypatch):
    """The wiring the library tests cannot see: every step clips each task's gradient at --max-grad-norm and steps
    the optimizer with the batch's own tasks (stepping the others would move them by momentum and weight decay)."""
    from bitfit_fast.task_bank import TaskAdamW, TaskBank

    root, files = joint_run
    calls = []
    for cls, method in ((TaskBank, "task_losses"), (TaskBank, "clip_grad_norm_"), (TaskAdamW, "step")):
        original = getattr(cls, method)

        def recording(self, *args, _method=method, _original=original):
            # task_losses(logits, labels, tasks), clip_grad_norm_(max_norm), step(tasks)
            calls.append((_method, args[-1]))
            return _original(self, *args)

        monkeypatch.setattr(cls, method, recording)
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "6", "--max-grad-norm", "0.25",
            "--backend", "torch", "--no-progress", "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    steps = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(steps) == 10  # 56 examples in batches of 6
    for (loss, batch_tasks), (clip, max_norm), (step, stepped) in steps:
        assert (loss, clip, step) == ("task_losses", "clip_grad_norm_", "step")
        assert max_norm == 0.25 and list(stepped) == list(batch_tasks)


@pytest.mark.parametrize("step,epoch,kept", [  # 56 examples in batches of 8: 7 steps an epoch
    (2, 1, "no biases were saved yet"), (9, 2, "each task's best biases so far are kept")])
def test_a_joint_run_whose_loss_diverges_stops_as_a_run_does(joint_run, tmp_path, monkeypatch, step, epoch, kept):
    from bitfit_fast import BitFitConfig
    from bitfit_fast.task_bank import TaskBank
    from bitfit_fast.train import TrainConfig, TrainingDiverged
    from bitfit_fast.train.multitask import TaskFiles, train_tasks

    root, files = joint_run
    calls = []
    task_losses = TaskBank.task_losses

    def poisoned(self, *args):
        calls.append(None)
        return task_losses(self, *args) * (float("nan") if len(calls) == step else 1.0)

    monkeypatch.setattr(TaskBank, "task_losses", poisoned)
    out = tmp_path / "runs"
    config = TrainConfig(model=str(root / "model"), epochs=2, batch_size=8, output_dir=str(out), progress=False,
                         bitfit=BitFitConfig(backend="torch"))
    with pytest.raises(TrainingDiverged, match=rf"the loss became nan at step {step} \(epoch {epoch}\); {kept}"):
        train_tasks(config, [TaskFiles(name, *task_files) for name, task_files in files.items()], log=lambda _: None)
    for name in files:
        assert (out / name / "biases").is_dir() == (epoch > 1)


def test_each_epoch_of_a_joint_run_trains_each_tasks_examples_once_from_fresh_gradients(joint_run, tmp_path,
                                                                                        monkeypatch):
    """Against each task's own encoded examples (its first --max-train-examples): every epoch's training batches
    hold each of them once, under its own task and with its own label, in an order of the epoch's own; every step
    starts from no gradients; the optimizer takes --lr and --weight-decay."""
    from transformers import AutoTokenizer

    from bitfit_fast.task_bank import TaskBank
    from bitfit_fast.train import TrainConfig
    from bitfit_fast.train import data as data_lib

    root, files = joint_run
    config = TrainConfig()
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    expected = {}
    for name, (train, validation) in files.items():
        data = data_lib.load_local(train, validation, tuple(config.text_columns), config.label_column)
        encoded = data_lib.encode(data_lib.limit(data.train, 30), tokenizer, config.max_length)
        expected[name] = collections.Counter(zip(map(tuple, encoded.input_ids), encoded.labels))
    steps, optimizers = [], []
    forward, task_losses, optimizer = TaskBank.forward, TaskBank.task_losses, TaskBank.optimizer

    def recording_forward(self, tasks, **batch):
        if self.training:
            assert all(p.grad is None for p in self.parameters()), "a step starts from no gradients"
            steps.append([(task, tuple(ids[mask.bool()].tolist()))
                          for task, ids, mask in zip(tasks, batch["input_ids"], batch["attention_mask"])])
        return forward(self, tasks, **batch)

    def recording_losses(self, logits, labels, tasks):
        steps[-1] = [(task, ids, label) for (task, ids), label in zip(steps[-1], labels.tolist(), strict=True)]
        return task_losses(self, logits, labels, tasks)

    def recording_optimizer(self, **options):
        optimizers.append(options)
        return optimizer(self, **options)

    monkeypatch.setattr(TaskBank, "forward", recording_forward)
    monkeypatch.setattr(TaskBank, "task_losses", recording_losses)
    monkeypatch.setattr(TaskBank, "optimizer", recording_optimizer)
    args = ["train", "--model", str(root / "model"), "--epochs", "2", "--batch-size", "8", "--lr", "2e-3",
            "--weight-decay", "0.05", "--max-train-examples", "30", "--backend", "torch", "--no-progress",
            "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    assert optimizers == [dict(lr=2e-3, weight_decay=0.05)]
    assert len(steps) == 2 * 7  # 30 + 20 examples in batches of 8
    epochs = [[example for step in steps[7 * e:7 * e + 7] for example in step] for e in range(2)]
    for examples in epochs:
        got = {name: collections.Counter((ids, label) for task, ids, label in examples if task == name)
               for name in files}
        assert got == expected
    assert epochs[0] != epochs[1], "each epoch shuffles anew"


def test_a_joint_fp16_run_clips_unscaled_gradients(joint_run, tmp_path, monkeypatch):
    """The loss is scaled (by 65536 at first): each step unscales the gradients before it clips them at
    --max-grad-norm, as a run does."""
    from bitfit_fast.task_bank import TaskBank

    root, files = joint_run
    calls = []
    unscale, clip = torch.amp.GradScaler.unscale_, TaskBank.clip_grad_norm_
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_",
                        lambda self, optimizer: (calls.append("unscale_"), unscale(self, optimizer))[1])
    monkeypatch.setattr(TaskBank, "clip_grad_norm_",
                        lambda self, max_norm: (calls.append("clip_grad_norm_"), clip(self, max_norm))[1])
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "28", "--fp16", "--backend",
            "torch", "--no-progress", "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    assert calls == ["unscale_", "clip_grad_norm_"] * 2


def test_a_joint_fp16_run_skips_the_step_of_a_task_whose_gradient_overflowed_only(joint_run, tmp_path, monkeypatch):
    """As each task's own fp16 run skips a step whose gradient overflowed: the overflowing task keeps its values
    and moments, the batch's other task steps (GradScaler.step skipped them all), and the loss scale halves."""
    from bitfit_fast.task_bank import TaskAdamW, TaskBank

    root, files = joint_run
    stepped, scales, unscaled = [], [], []
    unscale, step, update = torch.amp.GradScaler.unscale_, TaskAdamW.step, torch.amp.GradScaler.update

    def overflowing_first(self, optimizer):  # task topics' gradient overflows at the first step
        unscaled.append(None)
        if len(unscaled) == 1:
            bank: TaskBank = optimizer.bank
            for param, tasks in bank.parameter_tasks().items():
                if tasks is None and param.grad is not None:
                    param.grad[bank.tasks["topics"].index] = float("inf")
        return unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", overflowing_first)
    monkeypatch.setattr(TaskAdamW, "step", lambda self, tasks: (stepped.append(sorted(set(tasks))), step(self, tasks)))
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self: (update(self), scales.append(self.get_scale())))
    args = ["train", "--model", str(root / "model"), "--epochs", "1", "--batch-size", "28", "--fp16", "--backend",
            "torch", "--no-progress", "--output-dir", str(tmp_path / "runs")]
    for name, (train, validation) in files.items():
        args += ["--task-files", name, train, validation]
    assert cli.main(args) == 0
    assert stepped == [["sport-or-tech"], ["sport-or-tech", "topics"]]
    assert scales == [2.0**15, 2.0**15], "the first step's overflow halves the scale (growth waits 2000 steps)"


def test_a_joint_runs_saved_biases_name_their_tasks_classes(joint_run):
    """Each task's biases/ and biases-last/ hold its own class names, as save_biases of its own run would: loaded
    on their own (load_biases, a TaskBank of directories) they answer "sport", not LABEL_1."""
    from bitfit_fast.checkpoint import CONFIG_NAME

    root, _ = joint_run
    for directory in ("biases", "biases-last"):
        record = json.loads((root / "runs" / "sport-or-tech" / directory / CONFIG_NAME).read_text())
        assert record["label_names"] == ["sport", "tech"], directory


def test_a_task_of_the_bank_evaluates_on_its_own_columns():
    """The bank seen as one task's model (what each epoch evaluates) gives that task's logits only, of its width:
    the zero columns past it are no class of its own to predict."""
    from bitfit_reference import MODELS, padded_batch

    from bitfit_fast.task_bank import TaskBank
    from bitfit_fast.train.multitask import _OneTask

    base = MODELS["bert"](num_labels=3)
    bank = TaskBank.new(base, {"topic": 5, "sentiment": 2, "score": 1}).eval()
    batch = padded_batch(base, (4, 6, 3))
    labels = batch.pop("labels")
    with torch.no_grad():
        for name, task in bank.tasks.items():
            logits = _OneTask(bank, name)(labels=labels, **batch).logits
            torch.testing.assert_close(logits, bank([name] * 3, **batch)[:, :task.num_labels], rtol=0, atol=0)

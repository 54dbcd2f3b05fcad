"""TaskBank: several BitFit tasks on one base in mixed batches, against each task's own single-task model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from bitfit_reference import (
    BACKENDS,
    DEVICE,
    MODELS,
    PATHS,
    TINY,
    bbc_titles,
    enable_hf_checkpointing,
    padded_batch,
    real_batch,
    real_minilm,
    trainable,
)
from kernel_checks import ATOL, assert_gemms_ran_in
from test_api import FAMILIES, KEY_BIAS_FAMILIES, KEY_BIAS_LENGTHS
from test_fused_distilbert import tiny_distilbert
from test_fused_modernbert import tiny_modernbert

import bitfit_fast
from bitfit_fast import task_rows
from bitfit_fast.task_bank import TaskBank, TaskHeads, task_part

# Three tasks of different widths; the mixed batch's examples in an order that interleaves them.
WIDTHS = {"topic": 3, "sentiment": 2, "intent": 5}
TASKS = ["topic", "sentiment", "intent", "topic", "intent", "sentiment", "topic"]
LENGTHS = (7, 3, 5, 1, 6, 2, 4)
MAX_NORM = 0.05  # small enough that every step clips


def with_head(base, num_labels: int):
    """A copy of ``base`` whose classifier has ``num_labels`` outputs (a new task on the same frozen body)."""
    model = copy.deepcopy(base)
    head = model.classifier
    linear = head.out_proj if hasattr(head, "out_proj") else head
    replacement = torch.nn.Linear(linear.in_features, num_labels, device=linear.weight.device)
    if hasattr(head, "out_proj"):
        head.out_proj = replacement
    else:
        model.classifier = replacement
    model.config.num_labels = model.num_labels = num_labels
    return model


def trained_tasks(base, tmp_path, widths=WIDTHS, **options):
    """Single-task BitFit models on ``base`` with random trained values (as if each task were trained), saved with
    save_biases: {name: (model, directory)}. With train_head=False or head=[] every task keeps the base's own
    head."""
    tasks = {}
    for seed, (name, width) in enumerate(widths.items()):
        trains_head = options.get("train_head", True) and options.get("head") != []
        own = with_head(base, width) if trains_head else copy.deepcopy(base)
        model = bitfit_fast.apply(own, announce=False, **options)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in trainable(model).values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        tasks[name] = (model, bitfit_fast.save_biases(model, tmp_path / name))
    return tasks


# DeBERTa-v2's relative attention: as DeBERTa-v3's (the key and query projections shared with the positions, a
# LayerNorm over them, log buckets), with projections of the positions' own, and without the LayerNorm.
DEBERTA_V2 = {"v3": dict(share_att_key=True, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"],
                         position_buckets=16),
              "own-projections": dict(share_att_key=False, norm_rel_ebd="layer_norm", pos_att_type=["c2p", "p2c"]),
              "p2c-unnormed": dict(share_att_key=False, norm_rel_ebd="none", pos_att_type=["p2c"],
                                   max_relative_positions=6)}


def deberta_v2(num_labels: int = 3, **overrides):
    import transformers

    config = transformers.DebertaV2Config(**{**TINY, "max_position_embeddings": 64, "relative_attention": True,
                                             "position_biased_input": False, **DEBERTA_V2["v3"], **overrides},
                                          num_labels=num_labels)
    return transformers.DebertaV2ForSequenceClassification(config).to(DEVICE)


def check_mixed_equals_single(bank, tasks, batch, example_tasks, atol=0.0, rtol=0.0):
    with torch.no_grad():
        mixed = bank(example_tasks, **batch)
        singles = {name: model(**batch).logits for name, (model, _) in tasks.items()}
    assert mixed.shape == (len(example_tasks), max(singles[t].shape[1] for t in example_tasks))
    for i, name in enumerate(example_tasks):
        width = singles[name].shape[1]
        torch.testing.assert_close(mixed[i, :width], singles[name][i], atol=atol, rtol=rtol, msg=f"example {i}")
        assert not mixed[i, width:].any()
    # The tasks disagree on every example, so a bank that mixed up their biases or heads would fail above.
    names = list(singles)
    for a, b in zip(names, names[1:]):
        assert not torch.allclose(singles[a][:, :2], singles[b][:, :2], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", MODELS)
def test_mixed_batch_logits_equal_each_tasks_own_model(family, path, backend, tmp_path):
    check_a_bank_of_saved_tasks(MODELS[family](num_labels=3), tmp_path, backend=backend, **PATHS[path])


def check_a_bank_of_saved_tasks(base, tmp_path, backend, **options):
    """A bank of tasks saved from their own models on ``base`` (random trained values): a mixed batch's logits
    equal each task's own model's, and each task has its head's width."""
    tasks = trained_tasks(base, tmp_path, backend=backend, **options)
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend=backend).eval()
    for model, _ in tasks.values():
        model.eval()
    batch = padded_batch(base, LENGTHS)
    batch.pop("labels")
    check_mixed_equals_single(bank, tasks, batch, TASKS, atol=1e-5, rtol=1e-5)
    assert [task.num_labels for task in bank.tasks.values()] == list(WIDTHS.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", DEBERTA_V2)
def test_a_deberta_v2_bank_gives_each_example_its_tasks_relative_positions(variant, backend, tmp_path):
    """DeBERTa-v2/v3's relative positions pass through trained biases (the positions' LayerNorm β, the key and
    query projections' b): a mixed batch's logits equal each task's own model's, every task's positional keys and
    queries its own."""
    check_a_bank_of_saved_tasks(deberta_v2(**DEBERTA_V2[variant]), tmp_path, backend)


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16], ids=str)
def test_a_deberta_v2_bank_under_autocast_is_as_accurate_as_each_tasks_own_model(precision, tmp_path):
    """The per-task positional keys and queries under autocast (W·LN(E) and W·beta_t rounded apart, where a task's
    own model rounds W·(LN(E) + beta_t)): each example's logits no further from its own model's fp32 ones than twice
    that model's error under the same autocast, plus the format's ATOL of the largest logit. In fp16 a bank without
    the tasks' positional parts fails this; bf16's rounding is larger than they are in a model this small (there
    it checks that the path runs no worse than the task's own model; the fp32 test checks the parts exactly)."""
    base = deberta_v2()
    with torch.no_grad():  # attention scores of a trained model's scale (init's are ~0.01): positions count
        for attention in (layer.attention.self for layer in base.deberta.encoder.layer):
            attention.query_proj.weight.mul_(20)
            attention.key_proj.weight.mul_(20)
    tasks = trained_tasks(base, tmp_path, backend="torch")
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch").eval()
    batch = padded_batch(base, LENGTHS)
    batch.pop("labels")
    with torch.no_grad():
        truths = {name: model.eval()(**batch).logits for name, (model, _) in tasks.items()}
        with torch.autocast(DEVICE, dtype=precision):
            mixed = bank(TASKS, **batch).float()
            singles = {name: model(**batch).logits.float() for name, (model, _) in tasks.items()}
    for i, name in enumerate(TASKS):
        truth = truths[name][i]
        ours = (mixed[i, :len(truth)] - truth).abs().max()
        theirs = (singles[name][i] - truth).abs().max()
        assert ours <= 2 * theirs + ATOL[precision] * truth.abs().max(), (i, ours, theirs)


def test_a_deberta_v2_bank_on_a_transformers_without_its_position_helpers_is_refused_before_it_changes(
        monkeypatch):
    """transformers 4.46 (which the package allows) computes DeBERTa's relative positions with other helpers and a
    dropout of its own: refused in one line, the model left plain (it crashed halfway through applying it)."""
    import transformers.models.deberta_v2.modeling_deberta_v2 as deberta

    monkeypatch.delattr(deberta, "build_rpos")
    model = deberta_v2()
    with pytest.raises(ValueError, match=r"as transformers 4.47 and later compute them; this is transformers "
                                         r"\S+: upgrade it"):
        TaskBank.new(model, {"a": 2, "b": 3})
    assert not bitfit_fast.model.is_applied(model)


@pytest.mark.parametrize("precision", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_mixed_batch_on_real_minilm_and_real_text(path, precision, tmp_path, gemm_dtypes):
    base = real_minilm(num_labels=3, layers=[0, 5])
    tasks = trained_tasks(base, tmp_path, backend="torch", **PATHS[path])
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch").eval()
    texts = bbc_titles("sports", 3) + bbc_titles("tech", 2) + bbc_titles("business", 2)
    batch = real_batch(texts, [0] * len(texts))
    batch.pop("labels")
    with torch.no_grad():
        fp32 = bank(TASKS, **batch)
        gemm_dtypes.clear()
        with torch.autocast(DEVICE, dtype=precision or torch.float32, enabled=precision is not None):
            mixed = bank(TASKS, **batch).float()
            singles = {name: model.eval()(**batch).logits.float() for name, (model, _) in tasks.items()}
    assert_gemms_ran_in(precision or torch.float32, gemm_dtypes)
    for i, name in enumerate(TASKS):
        width = WIDTHS[name]
        if precision is None:
            torch.testing.assert_close(mixed[i, :width], singles[name][i], atol=1e-5, rtol=1e-5)
        else:  # flash-attention's rule against fp32: no worse than twice the single-task model's own error
            ours = (mixed[i, :width] - fp32[i, :width]).abs().max()
            theirs = (singles[name][i] - fp32[i, :width]).abs().max()
            assert ours <= 2 * theirs + 1e-3, (i, ours, theirs)


def _dropping_every_fifth_feature(x, p=0.5, training=True, inplace=False):
    """F.dropout with one fixed mask (every fifth feature of the last dimension dropped): the bank's and each task's
    own model drop the same values."""
    if not training or p == 0:
        return x
    return x * (torch.arange(x.shape[-1], device=x.device) % 5 != 0) / (1 - p)


@pytest.mark.parametrize("variant", ["v3", "own-projections"])
def test_a_deberta_bank_drops_out_the_positions_of_the_batchs_tasks_only(variant, tmp_path, monkeypatch):
    """With the position dropout on, each task's positions are projected on their own: for the batch's tasks only,
    min(B, T) projections (the bank's T of them, before: activations kept for the backward grew with the bank).
    3 examples of tasks 'c' and 'a' in a bank of 4: each example's train-mode logits and gradients are its task's
    own model's (one fixed dropout mask in both), from 3 projected position sets, not 4."""
    monkeypatch.setattr(torch.nn.functional, "dropout", _dropping_every_fifth_feature)
    base = deberta_v2(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **DEBERTA_V2[variant])
    tasks = trained_tasks(base, tmp_path, {"a": 3, "b": 2, "c": 4, "d": 2}, backend="torch")
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch").train()
    dropped = []
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, *args, **kwargs: dropped.append(tuple(x.shape)) or
                        _dropping_every_fifth_feature(x, *args, **kwargs))
    batch = padded_batch(base, (5, 3, 6))
    batch.pop("labels")
    example_tasks = ["c", "a", "c"]
    mixed = bank(example_tasks, **batch)
    span = 2 * bank.model.deberta.encoder.layer[0].attention.self.pos_ebd_size
    assert [shape[0] for shape in dropped if shape[1:2] == (span,)] == [3, 3], dropped  # one per layer, of min(B, T)
    labels = torch.tensor([3, 2, 1])
    before = {name: {n: v.clone() for n, v in bank.task_tensors(name).items()} for name in tasks}
    bank.loss(mixed, labels, example_tasks).backward()
    torch.optim.SGD([p for p in bank.parameters() if p.requires_grad], lr=1.0).step()  # moved by minus the gradient
    for name, (model, _) in tasks.items():
        rows = [i for i, t in enumerate(example_tasks) if t == name]
        after = bank.task_tensors(name)
        if not rows:
            assert all(torch.equal(after[n], value) for n, value in before[name].items()), name
            continue
        model.train()
        own = model(**{k: v[rows] for k, v in batch.items()}, labels=labels[rows])
        torch.testing.assert_close(mixed[rows, :own.logits.shape[1]], own.logits, atol=1e-5, rtol=1e-5)
        own.loss.backward()
        for n, param in trainable(model).items():
            torch.testing.assert_close(before[name][n] - after[n], param.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path,encoder", [("fused", "bert"), ("fused-lean", "bert"), ("fused-minimal", "bert"),
                                        ("modules", "bert"),
                                        ("fused-bucketed", "bert"), ("fused-grouped", "bert"),
                                        ("fused-subset", "bert"), ("fused", "real-minilm"), ("fused", "deberta-v3"),
                                        ("fused", "deberta-v3+dropout"), ("modules", "longformer"),
                                        ("fused", "distilbert"), ("fused", "modernbert")])
def test_training_a_mixed_batch_equals_each_tasks_own_steps(path, encoder, backend, tmp_path, request, monkeypatch):
    """AdamW steps on mixed batches (the bank's loss: the sum of each task's mean loss, clipped per task) end where
    each task's own model ends after the same steps on its examples alone (clipped as its run clips).
    "fused-bucketed": the GPU's row buckets (zero rows of task 0 after the real ones) on this device;
    "fused-grouped": attention by length groups, whose layout holds the examples in another order than the batch;
    "fused-subset": biases="subset", whose query biases are tables beside the frozen key and value biases.
    "real-minilm": pretrained MiniLM (two of its layers) on real BBC titles; with the Triton backend the tables'
    gradients are the kernels' per-task sums (``bitfit_fast_kernels.task_tables``).
    "deberta-v3": relative positions through trained biases (each task's positional keys and queries its own);
    "+dropout": Hugging Face's dropouts on, the relative positions' among them (which multiplies each task's β, so
    each task's positions are projected on their own), with one fixed mask in the bank and the task models alike.
    "longformer": attention projections of the states sequence first, [S, B, d] (their tables' gradients summed
    per task from rows of every example in turn), with its global attention on each first token.
    "distilbert" and "modernbert" (every bias declared): their own fused layers, random biases and gains."""
    options = dict(biases="subset") if path == "fused-subset" else {}
    if path in ("fused-bucketed", "fused-grouped"):
        request.getfixturevalue("bucketed_rows" if path == "fused-bucketed" else "grouped_attention")
    path = path if path in PATHS else "fused"
    widths = {"topic": 3, "sentiment": 2, "score": 1}  # "score": a regression task (its loss the mean squared error)
    example_tasks = ["topic", "sentiment", "sentiment", "topic", "topic", "score"]
    if encoder == "bert":
        base = MODELS["bert"](num_labels=3)
    elif encoder == "distilbert":
        base = tiny_distilbert(num_labels=3).to(DEVICE)
    elif encoder == "modernbert":
        base = tiny_modernbert().to(DEVICE)
    elif encoder == "longformer":
        config_cls, model_cls, config = KEY_BIAS_FAMILIES["longformer"]
        base = model_cls(config_cls(**config, num_labels=3)).to(DEVICE)  # without dropout, as TINY
    elif encoder.startswith("deberta"):
        dropout = 0.1 if encoder.endswith("+dropout") else 0.0
        base = deberta_v2(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        monkeypatch.setattr(torch.nn.functional, "dropout", _dropping_every_fifth_feature)
    else:  # without dropout, as the config-built models: the bank and the single models draw different masks
        base = real_minilm(num_labels=3, layers=[0, 5], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           classifier_dropout=0.0)
    tasks = trained_tasks(base, tmp_path, widths, backend=backend, **PATHS[path], **options)
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend=backend).train()
    optimizer = bank.optimizer(lr=1e-2)
    singles = {name: (model.train(), torch.optim.AdamW(trainable(model).values(), lr=1e-2))
               for name, (model, _) in tasks.items()}
    initial = {name: {n: p.detach().clone() for n, p in trainable(model).items()} for name, (model, _) in tasks.items()}
    for step in range(3):
        if encoder != "real-minilm":
            batch = padded_batch(base, (6, 2, 5, 3, 4, 7))
        else:
            batch = real_batch(bbc_titles("tech", 3, skip=3 * step) + bbc_titles("sports", 3, skip=3 * step),
                               [0] * 6)
        labels = torch.tensor([2, 1, 0, 0, 1, 0.5], device=DEVICE)  # class ids, and a score for "score"
        optimizer.zero_grad()
        bank.loss(bank(example_tasks, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                  labels, example_tasks).backward()
        norms = bank.clip_grad_norm_(MAX_NORM)
        optimizer.step(example_tasks)
        for name, (model, single_optimizer) in singles.items():
            rows = torch.tensor([i for i, t in enumerate(example_tasks) if t == name], device=DEVICE)
            single_optimizer.zero_grad()
            model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                  labels=labels[rows] if name == "score" else labels[rows].long()).loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(trainable(model).values(), MAX_NORM)
            torch.testing.assert_close(norms[bank.tasks[name].index], norm.float(), rtol=1e-4, atol=1e-6)
            assert norm > MAX_NORM, "the norm must be clipped for the comparison to test the clipping"
            single_optimizer.step()
    for name, (model, _) in singles.items():
        expected = trainable(model)
        got = bank.task_tensors(name)
        assert set(got) == set(expected)
        for param_name, value in expected.items():
            torch.testing.assert_close(got[param_name], value, atol=2e-5, rtol=1e-4, msg=f"{name} {param_name}")
        moved = [n for n, v in expected.items() if (v - initial[name][n]).abs().max() > 1e-3]
        assert len(moved) > len(expected) // 2, "the steps must move the parameters for the comparison to mean much"


@pytest.mark.parametrize("optimizer", ["bank", "torch"])
def test_a_task_absent_from_a_batch_ends_where_its_own_run_ends(optimizer, tmp_path):
    """The bank's optimizer steps only the batch's tasks: with "sentiment" absent from the middle batch, each task
    ends where its own run ends after the steps on its examples. torch's AdamW ("torch") moves the absent task by
    its momentum and weight decay and counts the step, which is why the bank has an optimizer of its own."""
    widths = {"topic": 3, "sentiment": 2}
    base = MODELS["bert"](num_labels=3)
    tasks = trained_tasks(base, tmp_path, widths)
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()}).train()
    params = [p for p in bank.parameters() if p.requires_grad]
    bank_optimizer = (bank.optimizer(lr=1e-2, weight_decay=0.1) if optimizer == "bank"
                      else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1))
    singles = {name: (model.train(), torch.optim.AdamW(trainable(model).values(), lr=1e-2, weight_decay=0.1))
               for name, (model, _) in tasks.items()}
    schedule = [["topic", "sentiment", "sentiment", "topic", "topic"], ["topic"] * 5,
                ["sentiment", "topic", "sentiment", "topic", "topic"]]
    labels = torch.tensor([1, 1, 0, 2, 1], device=DEVICE)
    for example_tasks in schedule:
        batch = padded_batch(base, (6, 2, 5, 3, 4))
        del batch["labels"]
        bank_optimizer.zero_grad()
        bank.loss(bank(example_tasks, **batch), labels, example_tasks).backward()
        bank_optimizer.step(example_tasks) if optimizer == "bank" else bank_optimizer.step()
        for name, (model, single_optimizer) in singles.items():
            rows = torch.tensor([i for i, t in enumerate(example_tasks) if t == name], device=DEVICE)
            if rows.numel():
                single_optimizer.zero_grad()
                model(**{k: v[rows] for k, v in batch.items()}, labels=labels[rows]).loss.backward()
                single_optimizer.step()
    mismatched = []
    for name, (model, _) in singles.items():
        got = bank.task_tensors(name)
        mismatched += [(name, n) for n, value in trainable(model).items()
                       if not torch.allclose(got[n], value, atol=2e-5, rtol=1e-4)]
    if optimizer == "bank":
        assert not mismatched
    else:
        assert mismatched and {name for name, _ in mismatched} == {"sentiment"}


# How a bank holds its heads: BERT's linear classifiers concatenated into two parameters, or a head module per task
# (any head that is not one linear layer: here the classifier in a Sequential).
HEAD_KINDS = ["concatenated", "modules"]


def _bank_with_gradients(layers: int, tasks: int = 4, heads: str = "concatenated"):
    """A fresh bank of ``tasks`` tasks on a BERT of ``layers`` layers, every trained parameter given a random
    gradient (absent tasks' table rows too: the optimizer must leave them however their gradient looks)."""
    model = MODELS["bert"](num_labels=3, num_hidden_layers=layers)
    if heads == "modules":
        model.classifier = torch.nn.Sequential(model.classifier)
    bank = TaskBank.new(model, {f"task{t}": 2 + t % 3 for t in range(tasks)})
    assert (bank.model.classifier.heads is None) == (heads == "concatenated")
    for param in bank.parameters():
        if param.requires_grad:
            param.grad = torch.randn_like(param)
    return bank


def _parts(bank) -> dict:
    """(param, task) -> where that task's values are in the parameter (``task_part``), for each task it holds."""
    return {(param, task): part for param, tasks in bank.parameter_tasks().items() for task in range(len(bank.tasks))
            if (part := task_part(tasks, task)) is not None}


def _alone(bank, options: dict) -> dict:
    """(param, task) -> (a copy of that task's part of the parameter, its place there, torch's AdamW on it alone)."""
    alone = {}
    for (param, task), part in _parts(bank).items():
        own = param[part].detach().clone().requires_grad_(True)
        alone[param, task] = own, part, torch.optim.AdamW([own], **options)
    return alone


def _step_alone(alone: dict, gradients: dict, present) -> None:
    """Steps each task's part that the batch holds and that has a gradient, alone, as its own run would."""
    for (param, task), (own, part, own_optimizer) in alone.items():
        if gradients[param] is not None and task in present:
            own.grad = gradients[param][part]
            own_optimizer.step()


def _check_alone(alone: dict) -> None:
    for (param, task), (own, part, _) in alone.items():
        torch.testing.assert_close(param[part], own.detach(), rtol=1e-6, atol=1e-7, msg=f"task {task}")


@pytest.mark.parametrize("heads", HEAD_KINDS)
def test_the_bank_optimizer_steps_each_task_as_torch_adamw_steps_it_alone(heads):
    """Every table row and head of a task ends where torch's AdamW on it alone ends, stepped on the batches that
    held the task (and, for a table, had a gradient); an optimizer restored from ``state_dict`` goes on exactly as
    the original. The parameters update as one flat vector, so this checks its bookkeeping."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=2, heads=heads)
    options = dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    optimizer = bank.optimizer(**options)
    task_of = bank.parameter_tasks()
    alone = _alone(bank, options)
    names = list(bank.tasks)
    schedule = [names, names[:1], names[1:3], names, names[2:]]
    without_gradient = next(p for p, task in task_of.items() if task is None)  # sits out the third step
    restored = None
    for index, example_tasks in enumerate(schedule):
        gradients = {p: torch.randn_like(p) for p in task_of}
        if index == 2:
            gradients[without_gradient] = None
        for step_optimizer in filter(None, (optimizer, restored)):
            for p, grad in gradients.items():
                p.grad = grad
            if step_optimizer is restored:  # a twin bank: the same values, its own optimizer
                for p, twin in zip(task_of, restored.param_groups[0]["params"]):
                    twin.grad = None if gradients[p] is None else gradients[p].clone()
            step_optimizer.step(example_tasks)
        _step_alone(alone, gradients, {bank.tasks[name].index for name in example_tasks})
        if index == 1:  # from here on, an optimizer loaded from this one's state_dict runs beside it
            twin_bank = copy.deepcopy(bank)
            restored = twin_bank.optimizer(**options)
            restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _check_alone(alone)
    twin = dict(twin_bank.named_parameters())
    for name, param in bank.named_parameters():
        assert torch.equal(param, twin[name]), name
    assert restored.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize("heads", HEAD_KINDS)
def test_a_tasks_overflowing_gradient_stays_in_its_task(heads):
    """Each task's own run would clip and step on its own: an inf in one task's head or table row leaves every other
    task's norm, clipped gradients and step finite."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, heads=heads)
    task_of, parts = bank.parameter_tasks(), _parts(bank)
    head = next(p for p, task in parts if task == 1 and task_of[p] is not None)
    head.grad[parts[head, 1]].view(-1)[0] = float("inf")
    next(p for p, tasks in task_of.items() if tasks is None).grad[2, 0] = float("nan")
    norms = bank.clip_grad_norm_(1.0)
    assert norms[[0, 3]].isfinite().all() and not norms[[1, 2]].isfinite().any()
    for (param, task), part in parts.items():
        if task in (0, 3):
            assert param.grad[part].isfinite().all(), "a clipped gradient of a healthy task"
    bank.optimizer(lr=1e-2).step(list(bank.tasks))
    for (param, task), part in parts.items():
        if task in (0, 3):
            assert param[part].isfinite().all(), "a healthy task's step"


def _computing_ops(function, views: bool = False) -> int:
    """How many operations that compute (not views, not host scalars; with ``views``, every operation)
    ``function()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not views and (not func._schema.is_mutable and func.is_view or func.__name__.startswith(
                    ("view", "_unsafe_view", "lift_fresh", "_local_scalar_dense", "detach", "alias"))):
                return func(*args, **(kwargs or {}))
            Count.count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        function()
    return Count.count


@pytest.mark.parametrize("operation", ["optimizer step", "gradient clipping"])
def test_a_bank_training_step_costs_the_same_operations_for_any_number_of_tables_and_heads(operation):
    """On a GPU every operation is a kernel launch and a step's host time: the optimizer step and the per-task
    clipping must not run a set of them per parameter (for a bert-mini bank of 64 tasks they ran 2,050 and 908)."""
    counts = {}
    for layers, tasks in ((1, 2), (3, 6)):
        bank = _bank_with_gradients(layers, tasks)
        optimizer = bank.optimizer(lr=1e-3)
        optimizer.step(list(bank.tasks))  # the first step builds the state
        run = ((lambda opt=optimizer, names=list(bank.tasks): opt.step(names)) if operation == "optimizer step"
               else (lambda bank=bank: bank.clip_grad_norm_(0.5)))
        counts[layers, tasks] = _computing_ops(run)
    assert counts[1, 2] == counts[3, 6], counts


def test_a_whole_bank_training_step_dispatches_the_same_operations_for_any_number_of_tasks():
    """On a GPU even a view or a detach costs the host a dispatch: a training step (forward, loss, backward, per-task
    clipping, optimizer step) on the same batch of two tasks dispatches as many operations in a bank of 2 tasks as
    in one of 6. Linear heads held one per task cost a concatenation's input, a gradient slice and its accumulation
    each (on a 12-layer bank of 64 tasks, a step without clipping as host_ops counts it: 2,617 operations, 2,235 with
    the heads concatenated)."""
    counts = {}
    for tasks in (2, 6):
        torch.manual_seed(0)
        bank = TaskBank.new(MODELS["bert"](num_labels=3, num_hidden_layers=1),
                            {f"task{t}": 2 + t % 3 for t in range(tasks)})
        batch = padded_batch(bank.model, (5, 3, 4, 6, 2, 5), num_labels=2)
        labels = batch.pop("labels")
        names = ["task0", "task1"] * 3
        optimizer = bank.optimizer(lr=1e-3)

        def step(bank=bank, optimizer=optimizer, batch=batch, labels=labels, names=names):
            optimizer.zero_grad()
            bank.loss(bank(names, **batch), labels, names).backward()
            bank.clip_grad_norm_(1.0)
            optimizer.step(names)

        step()  # the first step builds the optimizer's state
        counts[tasks] = _computing_ops(step, views=True)
    assert counts[2] == counts[6], counts


@pytest.mark.gpu
def test_past_its_forward_a_bank_training_step_never_waits_for_the_gpu():
    """The loss, backward, per-task clipping and optimizer step queue their work without a host sync: one there
    waits for the whole forward or backward queued before it (a task index copied from pageable memory did, in
    the loss and the optimizer step). The forward's unpadding asks for the batch's lengths and is not checked. The
    default backend on a GPU: the Triton kernels."""
    bank = TaskBank.new(MODELS["bert"](num_labels=3), WIDTHS).train()
    optimizer = bank.optimizer(lr=1e-3)
    batch = padded_batch(bank.model, LENGTHS)
    labels = torch.zeros(len(TASKS), dtype=torch.long, device=DEVICE)
    for _ in range(2):  # the first step and one with the optimizer's state built
        optimizer.zero_grad()
        logits = bank(TASKS, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.cuda.set_sync_debug_mode("error")
        try:
            bank.loss(logits, labels, TASKS).backward()
            bank.clip_grad_norm_(0.5)
            optimizer.step(TASKS)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_tasks_trained_in_other_memory_modes_or_paths_share_a_bank(tmp_path):
    """memory and fuse_layers change how a model runs, not what it trains: such tasks serve together."""
    base = MODELS["bert"](num_labels=3)
    lean = trained_tasks(base, tmp_path / "lean", {"topic": 3}, memory="lean", backend="torch")
    modules = trained_tasks(base, tmp_path / "modules", {"sentiment": 2}, fuse_layers=False, backend="torch")
    tasks = {**lean, **modules}
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch")
    batch = padded_batch(base, (3, 2, 4))
    batch.pop("labels")
    check_mixed_equals_single(bank, tasks, batch, ["topic", "sentiment", "topic"], atol=1e-5, rtol=1e-5)


def test_a_task_saved_from_the_bank_loads_onto_a_fresh_base(tmp_path):
    base = MODELS["bert"](num_labels=3)
    tasks = trained_tasks(base, tmp_path, backend="torch")
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch").eval()
    saved = bank.save_task("sentiment", tmp_path / "saved")
    alone = bitfit_fast.load_biases(with_head(base, 2), saved, backend="torch").eval()
    batch = padded_batch(base, LENGTHS)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(alone(**batch).logits, bank(["sentiment"] * len(LENGTHS), **batch)[:, :2])
        torch.testing.assert_close(alone(**batch).logits, tasks["sentiment"][0].eval()(**batch).logits)


def test_mistakes_name_the_problem(tmp_path, monkeypatch):
    base = MODELS["bert"](num_labels=3)
    tasks = trained_tasks(base, tmp_path, backend="torch")
    sources = {name: directory for name, (_, directory) in tasks.items()}
    bank = TaskBank.load(copy.deepcopy(base), sources, backend="torch")
    batch = padded_batch(base, (3, 2))
    batch.pop("labels")
    with pytest.raises(ValueError, match=r"unknown task 'weather'; the bank holds \['topic', 'sentiment', 'intent'\]"):
        bank(["topic", "weather"], **batch)
    # merge would leave vanilla layers holding every task's biases as one [T, N] bias, which save_pretrained writes
    with pytest.raises(ValueError, match=r"this model is a TaskBank's \(its biases are task tables, bert.embeddings"):
        bitfit_fast.merge(bank.model)
    assert isinstance(bank.model.bert.embeddings.LayerNorm, bitfit_fast.modules.BitFitLayerNorm), "left as it was"
    for names in (["topic"] * 3, ["topic"]):  # too many or too few
        with pytest.raises(ValueError, match=f"the batch has 2 examples but {len(names)} example tasks"):
            bank(names, **batch)
    for indices in ([-1, 0], [0, 3], torch.tensor([-1, 0])):  # a negative index would take the last task's biases
        with pytest.raises(ValueError, match=r"task indices must be in \[0, 3\), got \[-?\d, -?\d\]"):
            bank(indices, **batch)
    with pytest.raises(ValueError, match=r"TaskBank returns logits, not a loss: .* bank.loss\(logits, labels, tasks\)"):
        bank(["topic", "topic"], labels=torch.tensor([0, 1]), **batch)
    fresh = copy.deepcopy(base)
    for no_head in (dict(train_head=False), dict(head=[])):  # head=[]: no head module, as untrained
        with pytest.raises(ValueError, match=r"no head trained .* head of 3 labels, but \{'sentiment': 2\} differ"):
            TaskBank.new(fresh, {"topic": 3, "sentiment": 2}, **no_head)
        assert not hasattr(fresh, "bitfit_fast_config")
    with pytest.raises(ValueError, match="needs each row's task: run the model through bitfit_fast.TaskBank"):
        bank.model(**batch)
    subset = bitfit_fast.apply(with_head(base, 2), biases="subset", announce=False)
    bitfit_fast.save_biases(subset, tmp_path / "subset")
    with pytest.raises(ValueError, match=r"other BitFit options than task 'topic' .*: biases 'subset' vs 'all'"):
        TaskBank.load(copy.deepcopy(base), {**sources, "subset": tmp_path / "subset"}, backend="torch")
    assert isinstance(bank.model.classifier, TaskHeads)
    # The head named (as `bitfit-fast train` names it) or found by apply(): the same modules, one bank.
    named = bitfit_fast.apply(with_head(base, 2), head=["classifier", "dropout"], announce=False)
    bitfit_fast.save_biases(named, tmp_path / "named")
    TaskBank.load(copy.deepcopy(base), {**sources, "named": tmp_path / "named"}, backend="torch")
    only_classifier = bitfit_fast.apply(with_head(base, 2), head=["classifier"], announce=False)
    bitfit_fast.save_biases(only_classifier, tmp_path / "only-classifier")
    with pytest.raises(ValueError, match=r"head \['classifier'\] vs \['classifier', 'dropout'\]"):
        TaskBank.load(copy.deepcopy(base), {**sources, "c": tmp_path / "only-classifier"}, backend="torch")
    # What a user may pass by mistake gets a message, not a wrong answer or a bare exception.
    with pytest.raises(ValueError, match=r"got one path, .*: pass \["):
        TaskBank.load(copy.deepcopy(base), str(sources["topic"]), backend="torch")
    with pytest.raises(ValueError, match=r"got the string 'topic': pass \['topic'\] \* the number of examples"):
        bank("topic", **batch)
    with pytest.raises(ValueError, match="task indices are integers, got a torch.float32 tensor"):
        bank(torch.tensor([0.9, 1.7]), **batch)
    with pytest.raises(ValueError, match="a task is a name or an integer index, got 1.7"):
        bank([0, 1.7], **batch)
    with pytest.raises(ValueError, match="a task is a name or an integer index, got True"):  # as a bool tensor is
        bank([True, 0], **batch)
    with pytest.raises(ValueError, match=r"the batch is empty: pass the model's inputs"):
        bank(["topic", "topic"])
    with pytest.raises(ValueError, match=r"the batch holds no tensor: pass the model's inputs"):
        bank(["topic", "topic"], input_ids=None)
    # An input left None ahead of the others is no device to read.
    torch.testing.assert_close(bank(["topic", "topic"], token_type_ids=None, **batch),
                               bank(["topic", "topic"], **batch))
    with pytest.raises(ValueError, match=r"unknown task 'weather'; the bank holds"):
        bank.save_task("weather", tmp_path / "weather")
    assert not (tmp_path / "weather").exists()
    with pytest.raises(ValueError, match=r"positive integer .*got \{'none': 0, 'half': 1.5, 'flag': True\}"):
        TaskBank.new(copy.deepcopy(base), {"topic": 3, "none": 0, "half": 1.5, "flag": True})
    with pytest.raises(ValueError, match="task indices are integers, got a torch.bool tensor"):
        bank(torch.tensor([True, False]), **batch)
    with pytest.raises(ValueError, match="got one path"):
        TaskBank.load(copy.deepcopy(base), sources["topic"], backend="torch")  # a Path

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for parent, name in (("a", "topic"), ("b", "intent")):
        bitfit_fast.save_biases(tasks[name][0], tmp_path / parent / "best")
    with pytest.raises(ValueError, match=r"two tasks would be named 'best' .*: pass \{name: directory\} instead"):
        TaskBank.load(copy.deepcopy(base), [tmp_path / "a" / "best", tmp_path / "b" / "best"], backend="torch")
    with monkeypatch.context() as patch:  # "." is named as the directory it is
        patch.chdir(tmp_path / "a" / "best")
        assert list(TaskBank.load(copy.deepcopy(base), ["."], backend="torch").tasks) == ["best"]

    wider = MODELS["bert"](num_labels=3, intermediate_size=64)  # trained on another size, refused before any change
    bitfit_fast.save_biases(bitfit_fast.apply(wider, announce=False), tmp_path / "wider")
    plain = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"task 'wider' .* was trained on a model of other sizes: .*intermediate"):
        TaskBank.load(plain, {"topic": sources["topic"], "wider": tmp_path / "wider"}, backend="torch")
    deeper = MODELS["bert"](num_labels=3, num_hidden_layers=3)  # another number of layers: other parameters
    bitfit_fast.save_biases(bitfit_fast.apply(deeper, announce=False), tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"task 'deeper' .* differ. It was trained on a model of other sizes \(another "
                                         r"number of layers\?\): load it onto the base model it was trained from$"):
        TaskBank.load(plain, {"topic": sources["topic"], "deeper": tmp_path / "deeper"}, backend="torch")
    other = MODELS["bert"](num_labels=3)  # the same sizes, other weights: biases meaningless on this base
    bitfit_fast.save_biases(bitfit_fast.apply(other, announce=False), tmp_path / "other")
    with pytest.raises(ValueError, match=r"task 'other': the biases in .*other were trained on another base model: "
                                         r"this model's bert\..*weight holds other values; load it onto the base"):
        TaskBank.load(plain, {"topic": sources["topic"], "other": tmp_path / "other"}, backend="torch")
    assert not hasattr(plain, "bitfit_fast_config") and all(p.requires_grad for p in plain.parameters())
    with torch.device("meta"):  # no weights loaded yet: the tasks' values would be copied into nothing
        empty = type(base)(base.config)
    with pytest.raises(ValueError, match="on the meta device, with no values to load into"):
        TaskBank.load(empty, sources, backend="torch")


def test_mistakes_of_the_python_api_name_the_problem_and_leave_the_model_unchanged(tmp_path):
    # Found by an audit of the public API's bad inputs: each was a silent wrong result or an error from deep inside.
    base = MODELS["bert"](num_labels=3)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"tasks are named by non-empty strings .*; got 1"):
        TaskBank.new(fresh, {1: 2, 0: 3})  # bank([1]) would have run task 0, the first named
    with pytest.raises(ValueError, match=r"tasks are named by non-empty strings .*; got ''"):
        TaskBank.new(fresh, {"": 2})
    with pytest.raises(ValueError, match=r"num_labels is \{task name: number of labels\} .*; got list"):
        TaskBank.new(fresh, ["a", "b"])
    assert not bitfit_fast.model.is_applied(fresh)
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="a TaskBank holds a Hugging Face model with a task head .*got a Sequential"):
        TaskBank.new(sequential, {"a": 2})
    assert type(sequential[0]) is torch.nn.Linear
    bank = TaskBank.new(copy.deepcopy(base), {"pair": 2, "topic": 4, "score": 1}, backend="torch")
    batch = padded_batch(base, (3, 2, 4, 1))
    batch.pop("labels")
    tasks = ["pair", "topic", "pair", "score"]
    logits = bank(tasks, **batch)
    for bad in (torch.tensor([[0, 1]]), torch.tensor(0), None, 0):
        with pytest.raises(ValueError, match="tasks are one per example"):
            bank(bad, **batch)
    # Its first per-task layer is FC1: the attention met the count first, in a bmm.
    few = TaskBank.new(deberta_v2(num_labels=2), {"a": 2, "b": 3}, biases=["intermediate.dense"], backend="torch")
    with pytest.raises(ValueError, match="the batch has 4 examples but 2 example tasks were given"):
        few(["a", "b"], input_ids=batch["input_ids"])
    labels = torch.tensor([1.0, 3.0, 0.0, 0.25])
    assert torch.isfinite(bank.loss(logits, labels, tasks))
    with pytest.raises(ValueError, match=r"example 2's label is 3.0, but its task 'pair' has classes 0 to 1"):
        bank.loss(logits, torch.tensor([1.0, 3.0, 3.0, 0.25]), tasks)  # within the widest task's 4: NaN before
    for label in (-1.0, 2.0, 0.5):  # below, at its width, between two classes
        with pytest.raises(ValueError, match=rf"example 0's label is {label}, but its task 'pair' has classes 0 to 1"):
            bank.loss(logits, torch.tensor([label, 3.0, 0.0, 0.25]), tasks)
    for labels, got in ((torch.tensor([1]), r"labels \(1,\)"), (torch.zeros(4, 1), r"labels \(4, 1\)"),
                        ([1, 3, 0, 0.25], "labels list")):  # one label broadcast to every example before
        with pytest.raises(ValueError, match=rf"one label per example, shape \(4,\) .*; got {got} and 4 tasks"):
            bank.loss(logits, labels, tasks)
    with pytest.raises(ValueError, match="got labels \\(4,\\) and 3 tasks"):
        bank.loss(logits, torch.tensor([1.0, 3.0, 0.0, 0.25]), tasks[:3])
    bank.loss(logits, torch.tensor([1.0, 3.0, 0.0, 0.25]), tasks).backward()
    for options, message in ((dict(lr=-1e-3), "lr is a learning rate, 0 or more; got -0.001"),
                             (dict(lr=float("nan")), "lr is a learning rate, 0 or more; got nan"),
                             (dict(lr=1e-3, weight_decay=-0.1), "weight_decay and eps of 0 or more"),
                             (dict(lr=1e-3, betas=(0.9, 1.0)), r"two betas in \[0, 1\); .*betas=\(0.9, 1.0\)"),
                             (dict(lr=1e-3, eps=-1.0), "weight_decay and eps of 0 or more"),
                             (dict(lr=None), "lr is a learning rate, 0 or more; got None"),  # a TypeError before
                             (dict(lr="1e-3"), "lr is a learning rate, 0 or more; got '1e-3'"),
                             (dict(lr=1e-3, weight_decay=None), "weight_decay and eps of 0 or more"),
                             (dict(lr=1e-3, betas=0.9), r"two betas in \[0, 1\); .*betas=0.9")):
        with pytest.raises(ValueError, match=message):
            bank.optimizer(**options)
    for max_norm in (0, -1.0, float("nan"), True):  # 0 zeroes every gradient, a negative bound flips them
        with pytest.raises(ValueError, match=r"max_norm bounds the gradients' norm: a positive number; got"):
            bank.clip_grad_norm_(max_norm)
    # Its model's tables are every task's biases as one [T, N] bias: no single-task model could load them.
    with pytest.raises(ValueError, match=r"this model is a TaskBank's .*: save each task with bank.save_task"):
        bitfit_fast.save_biases(bank.model, tmp_path / "all")
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize("shape", [(5, 8), (5, 3, 8)])  # one row per example; a row per token (token heads)
def test_task_heads_give_each_example_its_own_heads_output_and_gradient(shape):
    """Linear heads run as one GEMM over every head, held concatenated: each example still gets exactly its own
    head's output and gradient, zeros past its width, and nothing from another task's columns (not even an
    overflowed one)."""
    torch.manual_seed(0)
    originals = [torch.nn.Linear(8, width, device=DEVICE) for width in (3, 1, 5, 2)]
    with torch.no_grad():
        originals[3].bias.fill_(float("inf"))  # task 3 is in no example: its columns must not leak
    heads = TaskHeads(originals)
    assert heads.heads is None and heads.rows_per_task == (3, 1, 5, 2)
    tasks = torch.tensor([2, 0, 1, 2, 0], device=DEVICE)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    with task_rows.example_tasks(tasks):
        out = heads(x)
    assert out.shape == (*shape[:-1], 5)
    weights = torch.randn(out.shape, device=DEVICE)
    (out * weights).sum().backward()
    x_grad, x.grad = x.grad.clone(), None
    for i, task in enumerate(tasks.tolist()):
        head = originals[task]
        alone = head(x[i])
        torch.testing.assert_close(out[i, ..., :head.out_features], alone)
        assert not out[i, ..., head.out_features:].any()
        (alone * weights[i, ..., :head.out_features]).sum().backward()
    torch.testing.assert_close(x.grad, x_grad)
    for task, head in enumerate(originals):
        part = task_part(heads.rows_per_task, task)
        for name in ("weight", "bias"):
            want, got = getattr(head, name).grad, getattr(heads, name).grad[part]
            if want is None:  # task 3's
                assert not got.any(), f"task {task}'s {name} got a gradient without examples"
            else:
                torch.testing.assert_close(got, want, msg=f"task {task}'s {name}")
    # 16-bit rows without autocast (a bank on a bf16 base): the fp32 heads run in the rows' dtype, as nn.Linear
    # heads cast to it would.
    with torch.no_grad(), task_rows.example_tasks(tasks):
        half = heads(x.detach().bfloat16())
    for i, task in enumerate(tasks.tolist()):
        head = originals[task]
        want = torch.nn.functional.linear(x[i].detach().bfloat16(), head.weight.bfloat16(), head.bias.bfloat16())
        torch.testing.assert_close(half[i, ..., :head.out_features], want)


@pytest.mark.parametrize("biases,pooling", [("all", "cls"), ("subset", "cls"), ("all", "mean")])
def test_a_bias_free_modernbert_bank_matches_each_tasks_own_model(biases, pooling, tmp_path):
    """Added zero biases become tables too; with "subset" the packed q/k/v table trains its query rows only. With
    "mean" pooling the final LayerNorm reads every real token's row (with "cls", each sequence's first only)."""
    from test_bias_free import tiny_modernbert

    base = tiny_modernbert(3, classifier_pooling=pooling).eval()
    tasks = {}
    for seed, (name, width) in enumerate({"topic": 3, "sentiment": 2}.items()):
        model = copy.deepcopy(base)
        model.classifier = torch.nn.Linear(model.classifier.in_features, width,
                                           bias=model.classifier.bias is not None, device=DEVICE)
        model.config.num_labels = width
        bitfit_fast.apply(model, biases=biases, backend="torch", announce=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in trainable(model).values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        tasks[name] = (model.eval(), bitfit_fast.save_biases(model, tmp_path / name))
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend="torch").eval()
    input_ids = torch.randint(5, base.config.vocab_size, (4, 9), device=DEVICE)
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = mask[3, 2:] = 0
    example_tasks = ["topic", "sentiment", "sentiment", "topic"]
    with torch.no_grad():
        mixed = bank(example_tasks, input_ids=input_ids, attention_mask=mask)
        for i, name in enumerate(example_tasks):
            alone = tasks[name][0](input_ids=input_ids, attention_mask=mask).logits[i]
            torch.testing.assert_close(mixed[i, :alone.shape[0]], alone, atol=1e-5, rtol=1e-5)


# Every layer path on the torch backend in fp16, two in bf16; the Triton backend (interpreted: slow, and no bf16 dot)
# on the default one in fp16.
@pytest.mark.parametrize("backend,path,precision", [
    *[("torch", path, torch.float16) for path in PATHS], ("triton", "fused", torch.float16),
    ("torch", "fused", torch.bfloat16), ("torch", "fused-minimal", torch.bfloat16)], ids=str)
def test_mixed_batch_gradients_on_real_minilm_under_autocast(backend, path, precision, tmp_path, gemm_dtypes):
    """One backward of the bank's loss on a mixed batch of real text under autocast: each task's gradients (its
    table rows, its head) against its own model's in fp32, by flash-attention's rule: no worse than twice the error
    of its own model under the same autocast. With the Triton backend the tables' rows are the kernels' per-task
    sums (summed in fp32 before any rounding)."""
    widths = {"topic": 3, "sentiment": 2}
    example_tasks = ["topic", "sentiment", "sentiment", "topic", "topic"]
    base = real_minilm(num_labels=3, layers=[0, 5], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       classifier_dropout=0.0)
    tasks = trained_tasks(base, tmp_path, widths, backend=backend, **PATHS[path])
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend=backend).train()
    batch = real_batch(bbc_titles("business", 3) + bbc_titles("politics", 2), [2, 1, 0, 0, 1])
    labels = batch.pop("labels")
    gemm_dtypes.clear()
    with torch.autocast(DEVICE, dtype=precision):
        bank.loss(bank(example_tasks, **batch), labels, example_tasks).backward()
    assert_gemms_ran_in(precision, gemm_dtypes)
    # A step of plain SGD with lr 1 leaves each parameter at value - gradient: the bank's gradients, per task.
    before = {name: {n: v.detach().clone() for n, v in bank.task_tensors(name).items()} for name in widths}
    torch.optim.SGD([p for p in bank.parameters() if p.requires_grad], lr=1.0).step()
    for name, (model, _) in tasks.items():
        rows = torch.tensor([i for i, t in enumerate(example_tasks) if t == name], device=DEVICE)
        grads = {}
        for dtype in (torch.float32, precision):
            model.train().zero_grad()
            with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
                model(**{k: v[rows] for k, v in batch.items()}, labels=labels[rows]).loss.backward()
            grads[dtype] = {n: p.grad.float().clone() for n, p in trainable(model).items()}
        after = bank.task_tensors(name)
        truths = grads[torch.float32]
        # The key bias's true gradient is zero (softmax ignores a shift per query): it is held to the same rule.
        assert sum(bool(truth.any()) for truth in truths.values()) > len(truths) // 2
        for param_name, truth in truths.items():
            ours = (before[name][param_name] - after[param_name]).float()
            ours_error = (ours - truth).abs().max()
            their_error = (grads[precision][param_name] - truth).abs().max()
            # The slack relative to each gradient's own scale: they span 3e-3 (query biases) to 0.5 (the head).
            atol = ATOL[precision] * truth.abs().max()
            assert ours_error <= 2 * their_error + atol, (name, param_name, ours_error, their_error)


def _task_gradients(bank, task: int) -> list[torch.Tensor]:
    """Task ``task``'s gradients as its own run holds them: its row of every table, then its heads' parameters."""
    return [p.grad[part] for (p, t), part in _parts(bank).items() if t == task and p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("heads", HEAD_KINDS)
@pytest.mark.parametrize("max_norm,gain", [(0.5, 1.0), (1e-6, 1e-6)])
def test_clipping_leaves_a_task_under_the_max_norm_alone_and_clips_the_others_as_torch_does(max_norm, gain, heads,
                                                                                          dtype):
    """Each task's gradients against torch.nn.utils.clip_grad_norm_ on that task's own tensors, with tasks on both
    sides of max_norm: a task whose norm is under it keeps its gradients exactly (torch's clamp of the scale at 1).
    Norms of the size of torch's 1e-6 (in max_norm / (norm + 1e-6)) too. A float64 bank's norms and scales are
    float64, as torch's are for float64 gradients."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=2, tasks=4, heads=heads).to(dtype)  # casts the gradients too, exactly
    gains = [1e-3 * gain, gain, 2e-3 * gain, 3.0 * gain]  # tasks 0 and 2 under max_norm, 1 and 3 over it
    for task, factor in enumerate(gains):
        for grad in _task_gradients(bank, task):
            grad.mul_(factor)
    references = []  # each task's gradients on stand-in parameters, for torch's clipping
    for task in range(4):
        references.append([torch.zeros_like(grad, requires_grad=True) for grad in _task_gradients(bank, task)])
        for own, grad in zip(references[-1], _task_gradients(bank, task)):
            own.grad = grad.clone()
    expected_norms = torch.stack([torch.nn.utils.clip_grad_norm_(own, max_norm) for own in references])
    assert (expected_norms[[0, 2]] < max_norm).all() and (expected_norms[[1, 3]] > max_norm).all()
    norms = bank.clip_grad_norm_(max_norm)
    rtol = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(norms, expected_norms, rtol=10 * rtol, atol=0)
    for task in range(4):
        for got, own in zip(_task_gradients(bank, task), references[task], strict=True):
            torch.testing.assert_close(got, own.grad, rtol=rtol, atol=0, msg=f"task {task}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_task_losses_are_each_tasks_own_loss_in_the_logits_precision(dtype):
    """Each task's mean cross-entropy over its own classes (mean squared error for a regression task) against torch's
    on that task's examples alone, in the logits' precision: fp32 for half-precision logits, float64 for a float64
    bank's."""
    torch.manual_seed(0)
    bank = TaskBank.new(MODELS["bert"](num_labels=3, num_hidden_layers=1), {"pair": 2, "topic": 5, "score": 1},
                        backend="torch")
    tasks = ["topic", "pair", "score", "topic", "pair", "topic", "score"]
    logits = torch.randn(len(tasks), 5, dtype=dtype) * 4
    labels = torch.tensor([4.0, 1.0, 0.3, 0.0, 0.0, 2.0, -1.7], dtype=dtype)
    losses = bank.task_losses(logits, labels, tasks)
    rtol = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    for name, task in bank.tasks.items():
        rows = [i for i, t in enumerate(tasks) if t == name]
        own = logits[rows, :task.num_labels]
        expected = (F.mse_loss(own[:, 0], labels[rows]) if task.num_labels == 1
                    else F.cross_entropy(own, labels[rows].long()))
        torch.testing.assert_close(losses[task.index], expected, rtol=rtol, atol=0, msg=name)
    logits[2, 0] = float("inf")  # an overflow of task "score" stays in its own loss (inf · 0 made all three NaN)
    losses = bank.task_losses(logits, labels, tasks)
    assert losses[bank.tasks["score"].index].isinf() and losses[[bank.tasks["pair"].index,
                                                                  bank.tasks["topic"].index]].isfinite().all()


def test_the_bank_optimizer_steps_tiny_gradients_as_torch_adamw_with_its_eps():
    """Gradients of the size of eps: there the eps (passed through bank.optimizer, added after the bias-corrected
    square root) decides the step. Every table row and head against torch's AdamW on it alone."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    options = dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-7)
    optimizer = bank.optimizer(**options)
    task_of = bank.parameter_tasks()
    alone = _alone(bank, options)
    names = list(bank.tasks)
    for example_tasks in (names, names[1:], names):
        gradients = {p: torch.randn_like(p) * 1e-7 for p in task_of}
        for p, grad in gradients.items():
            p.grad = grad
        optimizer.step(example_tasks)
        _step_alone(alone, gradients, {bank.tasks[name].index for name in example_tasks})
    _check_alone(alone)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_bank_and_its_optimizer_copied_mid_training_go_on_as_the_originals(how, tmp_path):
    """deepcopy((bank, optimizer)) or torch.save of both, after some steps: the copy's next steps are the
    original's, to the bit (torch's Optimizer pickles its state and param groups alone, and the copy had no bank)."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    optimizer = bank.optimizer(lr=1e-2, weight_decay=0.1)
    names = list(bank.tasks)
    schedule = [names, names[:2], names[1:], names[2:]]
    gradients = [{name: torch.randn_like(p) for name, p in bank.named_parameters() if p.requires_grad}
                 for _ in schedule]

    def step(bank, optimizer, index):
        for name, param in bank.named_parameters():
            if param.requires_grad:
                param.grad = gradients[index][name].clone()
        optimizer.step(schedule[index])

    step(bank, optimizer, 0)
    step(bank, optimizer, 1)
    if how == "deepcopy":
        twin, twin_optimizer = copy.deepcopy((bank, optimizer))
    else:
        torch.save((bank, optimizer), tmp_path / "both.pt")
        twin, twin_optimizer = torch.load(tmp_path / "both.pt", weights_only=False)
    for index in (2, 3):
        step(bank, optimizer, index)
        step(twin, twin_optimizer, index)
    for (name, param), other in zip(bank.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(param, other), name


def test_a_banks_state_dict_loads_into_a_bank_of_its_tasks_only():
    """The state_dict names the tasks in row order: into a bank of the same shapes but its tasks in another order
    (or others), a load put each task's rows into another task's without a word; it is refused, the bank
    unchanged. Into a bank of the same tasks, every value comes back."""
    torch.manual_seed(0)
    saved = TaskBank.new(MODELS["bert"](num_labels=3), {"x": 3, "y": 3})
    with torch.no_grad():
        for param in saved.parameters():
            param.add_(torch.randn_like(param))
    state = saved.state_dict()
    same = TaskBank.new(MODELS["bert"](num_labels=3), {"x": 3, "y": 3})
    same.load_state_dict(state)
    for (name, value), loaded in zip(saved.state_dict().items(), same.state_dict().values(), strict=True):
        assert value == loaded if name == "_extra_state" else torch.equal(value, loaded), name
    swapped = TaskBank.new(MODELS["bert"](num_labels=3), {"y": 3, "x": 3})
    before = copy.deepcopy(swapped.state_dict())
    with pytest.raises(ValueError, match=r"a bank of the tasks \['x', 'y'\] \(in row order\), this bank's are "
                                        r"\['y', 'x'\]"):
        swapped.load_state_dict(state)
    for name, value in swapped.state_dict().items():
        assert value == before[name] if name == "_extra_state" else torch.equal(value, before[name]), name


def test_an_optimizer_that_stepped_goes_back_to_a_loaded_state_dict():
    """load_state_dict into an optimizer that has already stepped (a rewind to an earlier state): its next step is
    the step the earlier state took, not one from the moments it held before the load."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    optimizer = bank.optimizer(lr=1e-2, weight_decay=0.1)
    params = [p for p in bank.parameters() if p.requires_grad]
    names = list(bank.tasks)
    schedule = [names, names[:2], names[1:], names]
    gradients = [[torch.randn_like(p) for p in params] for _ in schedule]

    def step(index):
        for p, grad in zip(params, gradients[index]):
            p.grad = grad.clone()
        optimizer.step(schedule[index])

    step(0)
    step(1)
    saved_state = copy.deepcopy(optimizer.state_dict())
    saved_params = [p.detach().clone() for p in params]
    step(2)
    after_first = [p.detach().clone() for p in params]
    step(3)
    with torch.no_grad():
        for p, value in zip(params, saved_params):
            p.copy_(value)
    optimizer.load_state_dict(saved_state)
    step(2)
    for p, want in zip(params, after_first):
        torch.testing.assert_close(p, want, rtol=0, atol=0)
    other = _bank_with_gradients(layers=1, tasks=4)  # the same parameters, tables of another number of tasks
    other_optimizer = other.optimizer(lr=1e-2)
    other_optimizer.step(list(other.tasks))
    with pytest.raises(ValueError, match=r"holds a moment of shape \(4, 36\) for a parameter of shape \(3, 36\): it "
                                        "is of a bank of other tasks"):
        optimizer.load_state_dict(other_optimizer.state_dict())
    step(3)  # the state it had


@pytest.mark.parametrize("heads", HEAD_KINDS)
def test_parameters_without_a_gradient_change_from_step_to_step(heads):
    """Another parameter lacks a gradient at each step (the kept mask of the segments that step must follow it):
    each table row and head still ends where torch's AdamW on it alone ends."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3, heads=heads)
    options = dict(lr=1e-2, weight_decay=0.1)
    optimizer = bank.optimizer(**options)
    task_of = bank.parameter_tasks()
    alone = _alone(bank, options)
    tables = [p for p, t in task_of.items() if t is None]
    heads = [p for p, t in task_of.items() if t is not None]
    for without in ([tables[0]], [tables[1], heads[0]], [tables[0]], []):
        gradients = {p: None if any(p is w for w in without) else torch.randn_like(p) for p in task_of}
        for p, grad in gradients.items():
            p.grad = grad
        optimizer.step(list(bank.tasks))
        _step_alone(alone, gradients, range(len(bank.tasks)))
    _check_alone(alone)


@pytest.mark.parametrize("heads", HEAD_KINDS)
def test_the_bank_optimizer_keeps_torchs_state_layout(heads):
    """state_dict as torch's AdamW lays it out: a parameter of one task's head has a 0-d step (its count), a table
    or concatenated heads a [T] step (each task's), in float64 even where a loaded state held float32 (as torch's
    AdamW saves them)."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3, heads=heads)
    optimizer = bank.optimizer(lr=1e-2)
    names = list(bank.tasks)
    optimizer.step(names)
    optimizer.step(names[:1])
    for param, task in bank.parameter_tasks().items():
        step = optimizer.state[param]["step"]
        if not isinstance(task, int):
            assert step.shape == (len(names),) and step.tolist() == [2.0, 1.0, 1.0]
        else:
            assert step.shape == () and float(step) == (2.0 if task == 0 else 1.0)
    state = copy.deepcopy(optimizer.state_dict())
    for entry in state["state"].values():
        entry["step"] = entry["step"].float()
    optimizer.load_state_dict(state)
    optimizer.step(names)
    assert {optimizer.state[p]["step"].dtype for p in bank.parameter_tasks()} == {torch.float64}


@pytest.mark.parametrize("key", ["step", "exp_avg", "exp_avg_sq"])
def test_a_state_tensor_replaced_by_hand_is_the_one_stepped(key):
    """optimizer.state[p][key] = a new tensor (not load_state_dict): the next step reads it, as a twin optimizer
    loaded with that state does."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    optimizer = bank.optimizer(lr=1e-2)
    names = list(bank.tasks)
    optimizer.step(names)
    param = next(iter(bank.parameter_tasks()))  # a table
    edited = optimizer.state[param][key].clone() * 3 + (1 if key == "step" else 0)
    state = copy.deepcopy(optimizer.state_dict())
    index = [p for g in optimizer.param_groups for p in g["params"]].index(param)
    state["state"][index][key] = edited.clone()
    twin = copy.deepcopy(bank)
    twin_optimizer = twin.optimizer(lr=1e-2)
    twin_optimizer.load_state_dict(state)
    optimizer.state[param][key] = edited
    trained = [p for p in bank.parameters() if p.requires_grad]
    twin_trained = [p for p in twin.parameters() if p.requires_grad]
    for p, q in zip(trained, twin_trained, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    optimizer.step(names)
    twin_optimizer.step(names)
    for p, q in zip(trained, twin_trained, strict=True):
        assert torch.equal(p, q)


def test_the_bank_optimizer_follows_its_state_to_the_parameters_dtype():
    """The bank cast after a step (or a state loaded from another device): the state joins its parameters."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    optimizer = bank.optimizer(lr=1e-2)
    names = list(bank.tasks)
    optimizer.step(names)
    bank.double()
    before = {p: p.detach().clone() for p in bank.parameter_tasks()}
    for p in before:
        p.grad = torch.randn_like(p)
    optimizer.step(names)
    for p, value in before.items():
        assert optimizer.state[p]["exp_avg"].dtype == torch.float64 and not torch.equal(p, value)


def test_a_capture_of_a_step_unlike_its_warmup_is_refused(monkeypatch):
    """The optimizer's and the clipping's tensors built on the host are made by the warmup steps: made while a CUDA
    graph captures, the graph would read freed host memory at every replay."""
    from bitfit_fast import graphs

    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3, heads="modules")
    optimizer = bank.optimizer(lr=1e-2)
    tasks = bank.task_index(list(bank.tasks))  # on the device (here the CPU), as GraphedStep gives them
    optimizer.step(tasks)
    bank.clip_grad_norm_(1.0)
    monkeypatch.setattr(graphs, "capturing", lambda: True)
    optimizer.step(tasks)  # as in the warmup: nothing to make
    bank.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="the tasks are given by name or as a list: a copy from the host"):
        optimizer.step(list(bank.tasks))
    task_of = bank.parameter_tasks()
    next(p for p, task in task_of.items() if task == 1).grad = None
    with pytest.raises(RuntimeError, match="the heads with a gradient differ from the warmup steps'"):
        bank.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="the parameters without a gradient differ from the warmup steps'"):
        optimizer.step(tasks)
    concatenated = _bank_with_gradients(layers=1, tasks=3)  # clipped for the first time while capturing
    with pytest.raises(RuntimeError, match="the concatenated heads' rows were not seen by a warmup step"):
        concatenated.clip_grad_norm_(1.0)


def test_clipping_follows_heads_whose_gradient_went_missing():
    """Clipping keeps the heads' tasks from call to call: a head without a gradient at a later call must not leave
    them stale. Against a twin that never clipped before."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3, heads="modules")
    twin = copy.deepcopy(bank)  # (a deep copy drops the gradients)
    for p, q in zip(bank.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    bank.clip_grad_norm_(1e9)  # scales nothing; its heads' tasks are kept
    for b in (bank, twin):
        next(p for p, t in b.parameter_tasks().items() if t == 1).grad = None
    torch.testing.assert_close(bank.clip_grad_norm_(0.5), twin.clip_grad_norm_(0.5), rtol=0, atol=0)
    for p, q in zip(bank.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))


@pytest.mark.gpu
def test_clipping_follows_the_bank_to_another_device():
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3).cpu()
    bank.clip_grad_norm_(0.5)
    bank.to(DEVICE)
    for p in bank.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    assert bank.clip_grad_norm_(0.5).device.type == torch.device(DEVICE).type


def test_the_bank_optimizer_steps_parameters_whose_memory_was_replaced():
    """``param.data = ...`` (what some module conversions do) gives a parameter new memory: the optimizer, which
    keeps flat views of the parameters, must step the new memory, as a twin bank's optimizer steps its own."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    twin = copy.deepcopy(bank)
    banks = (bank, twin)
    optimizers = [b.optimizer(lr=1e-2, weight_decay=0.1) for b in banks]
    names = list(bank.tasks)
    for index in range(3):
        if index == 1:
            for param in bank.parameters():
                param.data = param.data.clone()
        gradients = [torch.randn_like(p) for p in bank.parameters() if p.requires_grad]
        for b, optimizer in zip(banks, optimizers):
            for p, grad in zip([p for p in b.parameters() if p.requires_grad], gradients, strict=True):
                p.grad = grad.clone()
            optimizer.step(names[index:])
    for (name, param), twin_param in zip(bank.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(param, twin_param), name


def test_parameter_tasks_follow_the_trained_parameters():
    """parameter_tasks reads the parameters' names once: a parameter frozen or replaced since must show."""
    bank = TaskBank.new(MODELS["bert"](num_labels=3), {"topic": 3, "sentiment": 2})
    first = bank.parameter_tasks()
    replaced, frozen = list(first)[:2]
    name = next(n for n, p in bank.named_parameters() if p is replaced)
    module_name, _, attribute = name.rpartition(".")
    setattr(bank.get_submodule(module_name), attribute, torch.nn.Parameter(replaced.detach().clone()))
    now = bank.parameter_tasks()
    assert replaced not in now and dict(bank.named_parameters())[name] in now and len(now) == len(first)
    frozen.requires_grad_(False)
    assert frozen not in bank.parameter_tasks() and len(bank.parameter_tasks()) == len(first) - 1


def test_a_regression_tasks_scores_outside_the_class_range_are_its_own_mean_squared_error():
    """A score is no class index: scores past the widest head or negative, in a batch with a task of classes, give
    each task its own mean loss (cross-entropy over its classes; the score's mean squared error), each in its place
    of task_losses (0 for a task the batch does not hold), their sum the loss."""
    torch.manual_seed(0)
    base = MODELS["bert"](num_labels=3)
    bank = TaskBank.new(base, {"topic": 3, "absent": 2, "score": 1})
    batch = padded_batch(base, (5, 3, 4, 6, 2))
    batch.pop("labels")
    example_tasks = ["topic", "score", "score", "topic", "score"]
    labels = torch.tensor([2.0, 7.5, -1.25, 0.0, 3.0], device=DEVICE)
    logits = bank(example_tasks, **batch)
    topic, score = [0, 3], [1, 2, 4]
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[topic, :3], labels[topic].long()),
                            torch.zeros((), device=DEVICE),
                            torch.nn.functional.mse_loss(logits[score, 0], labels[score])])
    torch.testing.assert_close(bank.task_losses(logits, labels, example_tasks), expected)
    torch.testing.assert_close(bank.loss(logits, labels, example_tasks), expected.sum())


def test_a_bank_needs_a_task():
    base = MODELS["bert"](num_labels=3)
    for sources in ({}, []):
        with pytest.raises(ValueError, match="a TaskBank needs at least one task"):
            TaskBank.load(copy.deepcopy(base), sources)
    with pytest.raises(ValueError, match="a TaskBank needs at least one task"):
        TaskBank.new(copy.deepcopy(base), {})


def test_each_loaded_task_keeps_its_own_class_names(tmp_path):
    """Class names saved with each task's biases stay that task's (not the first task's); a regression task has
    none."""
    base = MODELS["bert"](num_labels=3)
    names = {"topic": ["business", "sport", "tech"], "sentiment": ["negative", "positive"], "score": None,
             "stale": ["a", "b", "c"]}  # "stale": a 2-label head saved with its model's old 3 names: not its own
    sources = {}
    for name, classes in names.items():
        model = with_head(base, 2 if name == "stale" else len(classes) if classes else 1)
        if classes:
            model.config.id2label = dict(enumerate(classes))
            model.config.label2id = {c: i for i, c in enumerate(classes)}
        sources[name] = bitfit_fast.save_biases(bitfit_fast.apply(model, announce=False), tmp_path / name)
    bank = TaskBank.load(copy.deepcopy(base), sources)
    assert {name: task.label_names for name, task in bank.tasks.items()} == {**names, "stale": ["0", "1"]}
    assert [task.num_labels for task in bank.tasks.values()] == [3, 2, 1, 2]


def test_new_tasks_heads_start_as_the_model_initialises_its_heads():
    """A new task's head is initialised by the model's own _init_weights (BERT: normal with initializer_range, zero
    bias), not torch's default Linear init."""
    torch.manual_seed(0)
    base = MODELS["bert"](num_labels=3, initializer_range=0.02)
    bank = TaskBank.new(base, {"a": 40, "b": 60})
    for name in bank.tasks:
        head = {key: t for key, t in bank.task_tensors(name).items() if key.startswith("classifier.")}
        assert not head["classifier.bias"].any()
        assert 0.015 < head["classifier.weight"].std().item() < 0.025, head["classifier.weight"].std()


def test_one_row_per_example_takes_the_tasks_tensor_itself():
    """A pooler's or a head's input [B, d]: its rows' tasks are the examples' tasks tensor, which every such op of
    the step shares (the kernels sort its rows once); a row per token repeats each example's task."""
    with task_rows.example_tasks(torch.tensor([2, 0, 1], device=DEVICE)):
        assert task_rows.of_module_input(torch.randn(3, 8, device=DEVICE)) is task_rows.current()
        assert task_rows.of_module_input(torch.randn(3, 2, 8, device=DEVICE)).tolist() == [2, 2, 0, 0, 1, 1]


def test_task_heads_refuse_a_batch_of_another_size_than_its_tasks():
    """Called on rows of another batch size than the example tasks, the heads say so (they would otherwise gather
    some example's task for another's row)."""
    heads = TaskHeads([torch.nn.Linear(8, width, device=DEVICE) for width in (3, 2)])
    with task_rows.example_tasks(torch.tensor([0, 1, 0], device=DEVICE)):
        with pytest.raises(ValueError, match="the batch has 5 examples but 3 example tasks"):
            heads(torch.randn(5, 8, device=DEVICE))


def test_heads_that_answer_no_labels_per_example_are_refused_saying_what_a_bank_takes():
    """Multiple choice runs each example's choices as rows of their own (its bank was built, then every batch
    refused), and next-sentence prediction has no head of num_labels outputs: both are refused, by what a bank
    mixes, not by asking for head= (naming a head could not help)."""
    import transformers

    config = transformers.BertConfig(**TINY, max_position_embeddings=64)
    for model_class, message in ((transformers.BertForMultipleChoice, "runs each example's choices as examples"),
                                 (transformers.BertForNextSentencePrediction,
                                  r"none of the head modules \['cls'\] outputs the model's 3 labels")):
        model = model_class(config) if model_class is transformers.BertForMultipleChoice else model_class(
            transformers.BertConfig(**TINY, max_position_embeddings=64, num_labels=3))
        with pytest.raises(ValueError, match=message):
            TaskBank.new(model, {"a": 1, "b": 1} if "Choice" in model_class.__name__ else {"a": 2, "b": 3})
        assert not bitfit_fast.model.is_applied(model)


def test_a_bank_whose_trained_heads_both_could_output_the_labels_says_to_name_them():
    """Two trained head modules with a linear layer of num_labels outputs (the pooler's 36 and a 36-label classifier):
    which one a task's width resizes is ambiguous, and the bank says so rather than picking one."""
    base = MODELS["bert"](num_labels=36)
    with pytest.raises(ValueError, match=r"cannot tell which of the head modules \['bert.pooler', 'classifier'\]"):
        TaskBank.new(base, {"a": 36, "b": 36}, head=["bert.pooler", "classifier"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["modules", "fused, a hook on a layer"])
def test_hugging_faces_checkpointing_recomputes_each_example_with_its_task(backend, path):
    """Hugging Face's activation checkpointing runs a layer's forward again in the backward, after the bank's
    forward has returned: the module path (every family not fused) and a fused layer with a hook (which runs
    Hugging Face's forward) recompute each example with its own task's biases, as the bank without checkpointing
    computes it (they raised that the table needs each row's task)."""
    torch.manual_seed(0)
    bank = TaskBank.new(MODELS["bert"](num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                        WIDTHS, backend=backend, fuse_layers=path != "modules").train()
    with torch.no_grad():
        for param in bank.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)  # tasks that differ
    if path != "modules":
        bank.model.bert.encoder.layer[1].register_forward_hook(lambda module, args, output: None)
    checkpointed = copy.deepcopy(bank)
    enable_hf_checkpointing(checkpointed.model)
    batch = padded_batch(bank.model, LENGTHS[:5])
    labels = torch.tensor([2, 1, 4, 0, 1])
    names = ["topic", "sentiment", "intent", "topic", "sentiment"]
    for model in (bank, checkpointed):
        model.loss(model(names, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), labels,
                   names).backward()
    for (name, param), twin in zip(bank.named_parameters(), checkpointed.parameters(), strict=True):
        if param.requires_grad:
            torch.testing.assert_close(twin.grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_classification_tasks_train_as_each_tasks_own_model(backend, tmp_path):
    """A bank of token classification tasks: labels [B, S] with -100 where a token is not scored (padding, here
    too a real token), each task's loss the mean over its scored tokens and its gradients its own model's
    (labels per token were refused, and labels per example failed in a shape error). A class outside the task's is
    refused naming the token."""
    import transformers

    config = transformers.BertConfig(**TINY, max_position_embeddings=64, num_labels=3)
    base = transformers.BertForTokenClassification(config)
    tasks = trained_tasks(base, tmp_path, backend=backend)
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()},
                         backend=backend).eval()
    batch = padded_batch(base, LENGTHS)
    batch.pop("labels")
    generator = torch.Generator().manual_seed(0)
    widths = torch.tensor([WIDTHS[name] for name in TASKS])
    labels = (torch.rand(batch["input_ids"].shape, generator=generator) * widths[:, None]).long()
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, 1] = -100
    before = {name: {key: value.clone() for key, value in bank.task_tensors(name).items()} for name in tasks}
    losses = bank.task_losses(bank(TASKS, **batch), labels, TASKS)
    losses.sum().backward()
    torch.optim.SGD([p for p in bank.parameters() if p.requires_grad], lr=1.0).step()  # moved by minus the gradient
    for name, (model, _) in tasks.items():
        rows = [i for i, task in enumerate(TASKS) if task == name]
        own = model.eval()(**{key: value[rows] for key, value in batch.items()}, labels=labels[rows]).loss
        torch.testing.assert_close(losses[bank.tasks[name].index], own, rtol=1e-5, atol=1e-6, msg=name)
        own.backward()
        after = bank.task_tensors(name)
        for key, param in trainable(model).items():
            torch.testing.assert_close(before[name][key] - after[key], param.grad, atol=1e-5, rtol=1e-4,
                                       msg=f"{name} {key}")
    labels[2, 0] = WIDTHS[TASKS[2]]
    with pytest.raises(ValueError, match=rf"example 2's token 0's label is {WIDTHS[TASKS[2]]}, but its task"):
        bank.task_losses(bank(TASKS, **batch), labels, TASKS)
    with pytest.raises(ValueError, match=r"one label per token, shape \(7, 7\) .*; got labels \(7,\)"):
        bank.loss(bank(TASKS, **batch), labels[:, 0], TASKS)
    with pytest.raises(ValueError, match=r"a token classification task has 2 classes or more .*; \['score'\] have 1"):
        TaskBank.new(copy.deepcopy(base), {"tags": 3, "score": 1})


def test_return_dict_false_gives_the_logits_and_hidden_states_are_refused_in_one_line():
    """The bank returns logits: from a tuple too (it read .logits of it), and a request for hidden states or
    attentions, which it would drop, is refused with where to get them."""
    torch.manual_seed(0)
    bank = TaskBank.new(MODELS["bert"](num_labels=3), WIDTHS, backend="torch").eval()
    batch = padded_batch(bank.model, LENGTHS[:3])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    names = ["topic", "intent", "sentiment"]
    torch.testing.assert_close(bank(names, **inputs, return_dict=False), bank(names, **inputs), rtol=0, atol=0)
    for option in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match="returns the logits alone: .* register a forward hook"):
            bank(names, **inputs, **{option: True})


@pytest.mark.parametrize("no_head", [dict(train_head=False), dict(head=[])], ids=["train_head=False", "head=[]"])
def test_tasks_saved_without_a_trained_head_load_with_the_models_labels(tmp_path, no_head):
    """train_head=False, or head=[] (no head module: the classifier is frozen as the body is, its bias trained with
    the others): every task answers through the base model's frozen head, so a bank of such save_biases
    directories has the model's labels per task, and each example's loss is its task's own model's (with
    head=[] a task loaded as of 0 labels had a NaN loss)."""
    base = MODELS["bert"](num_labels=3)
    tasks = trained_tasks(base, tmp_path, widths={"topic": 3, "genre": 3}, **no_head)
    bank = TaskBank.load(copy.deepcopy(base), {name: directory for name, (_, directory) in tasks.items()})
    assert [(task.num_labels, task.label_names) for task in bank.tasks.values()] == [(3, ["0", "1", "2"])] * 2
    batch = padded_batch(base, LENGTHS[:4])
    labels = batch.pop("labels")
    names = ["topic", "genre", "genre", "topic"]
    bank.eval()
    with torch.no_grad():
        loss = bank.loss(bank(names, **batch), labels, names)
        own = {name: model.eval()(**batch).logits for name, (model, _) in tasks.items()}
    rows = {name: [i for i, n in enumerate(names) if n == name] for name in tasks}  # the sum of each task's mean
    expected = sum(torch.nn.functional.cross_entropy(own[name][rows[name]], labels[rows[name]]) for name in tasks)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_clipping_follows_concatenated_heads_to_another_device():
    """The concatenated heads' rows' tasks are kept per device: a bank moved after a clip (here to the meta device,
    the one other device a CPU has) clips with rows' tasks made there."""
    torch.manual_seed(0)
    bank = _bank_with_gradients(layers=1, tasks=3)
    bank.clip_grad_norm_(0.5)
    bank.to("meta")
    for p in bank.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    assert bank.clip_grad_norm_(0.5).device.type == "meta"


def test_concatenated_heads_keep_each_parameters_requires_grad():
    """A head's frozen bias stays frozen once the heads are concatenated, its weight trained (and the other way)."""
    for frozen in ("bias", "weight"):
        heads = [torch.nn.Linear(4, width) for width in (2, 3)]
        for head in heads:
            getattr(head, frozen).requires_grad_(False)
        concatenated = TaskHeads(heads)
        assert {name: p.requires_grad for name, p in concatenated.named_parameters()} == {
            "weight": frozen != "weight", "bias": frozen != "bias"}


def mobilebert():  # NoNorm: MobileBERT's normalisation, a module of its own that adds its bias itself
    import transformers

    return transformers.MobileBertForSequenceClassification(transformers.MobileBertConfig(
        vocab_size=97, hidden_size=32, embedding_size=32, true_hidden_size=32, intra_bottleneck_size=32,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64))


def squeezebert():  # convolutions, whose biases are added by Conv1d
    import transformers

    return transformers.SqueezeBertForSequenceClassification(transformers.SqueezeBertConfig(
        vocab_size=97, hidden_size=32, embedding_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64))


def deberta():  # q_bias and v_bias: bias parameters of DeBERTa's attention, which adds them itself
    import transformers

    return transformers.DebertaForSequenceClassification(transformers.DebertaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64))


@pytest.mark.parametrize("make,owner", [(mobilebert, "NoNorm"), (squeezebert, "Conv1d"),
                                        (deberta, "DebertaLayerNorm")])
def test_a_bias_that_no_bitfit_layer_adds_is_refused_before_the_model_changes(make, owner):
    """Only bitfit_fast's layers add each row its task's bias. A module that adds its bias itself would get a task
    table [T, N] for its bias [N]: a shape error, or, where a batch's length is T, each position another task's
    bias (MobileBERT ran so before this check)."""
    model = make()
    with pytest.raises(ValueError, match=rf"is added by a {owner} in its own forward .* a TaskBank mixes tasks in "
                                         "bitfit_fast's linear and LayerNorm layers only"):
        TaskBank.new(model, {"a": 2, "b": 2})
    assert not bitfit_fast.model.is_applied(model)


def test_a_bias_parameter_of_a_modules_own_is_refused_in_a_bank_of_saved_tasks(tmp_path):
    model = deberta()
    for module in model.modules():  # LayerNorms of torch's: only the attention's own q_bias and v_bias are left
        for name, child in list(module.named_children()):
            if type(child).__name__ == "DebertaLayerNorm":
                setattr(module, name, torch.nn.LayerNorm(32))
    base = copy.deepcopy(model)
    bitfit_fast.save_biases(bitfit_fast.apply(model, announce=False), tmp_path / "a")
    with pytest.raises(ValueError, match=r"q_bias is added by a DisentangledSelfAttention in its own forward \(2 such"):
        TaskBank.load(base, [tmp_path / "a"])
    assert not bitfit_fast.model.is_applied(base)


def bert_of(task_class: str):
    import transformers

    return lambda: getattr(transformers, task_class)(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))


@pytest.mark.parametrize("make,message", [
    (bert_of("BertForQuestionAnswering"), "a BertForQuestionAnswering answers with QuestionAnsweringModelOutput, "
                                          "not logits per example"),
    (bert_of("BertModel"), "a BertModel answers with BaseModelOutputWithPoolingAndCrossAttentions, not logits"),
])
def test_a_model_whose_layers_do_not_see_the_examples_first_is_refused_before_it_changes(make, message):
    """A TaskBank answers with logits per example: a model which answers with something else is refused, found on
    the model's dummy inputs before it is applied (it had crashed at its first forward)."""
    model = make()
    with pytest.raises(ValueError, match=message):
        TaskBank.new(model, {"a": 2, "b": 2}, backend="torch")
    assert not bitfit_fast.model.is_applied(model)


@pytest.mark.parametrize("copyable", [True, False], ids=["copied", "a-lock-among-its-attributes"])
def test_the_probe_of_a_model_leaves_each_modules_mode_and_hooks_as_they_were(copyable):
    """The probe runs a copy of the model that shares its tensors (no second set of weights), or, where the model
    cannot be copied, the model itself, whose modes and hooks it leaves as they were."""
    import threading

    model = bert_of("BertForSequenceClassification")().train()
    model.bert.embeddings.eval()  # a user's choice for one part
    if not copyable:
        model.lock = threading.Lock()
    weights, own = [], model.classifier.weight.data_ptr()
    model.classifier.register_forward_pre_hook(lambda module, args: weights.append(module.weight.data_ptr()))
    TaskBank.new(model, {"a": 2, "b": 3}, backend="torch")
    assert model.training and model.bert.encoder.training and not model.bert.embeddings.training
    assert weights == [own], "the probe ran once, on the model's own weights"
    probes = [hook for module in model.modules() for hook in module._forward_pre_hooks.values()
              if "_probe_layer_inputs" in getattr(hook, "__qualname__", "")]
    assert not probes, "the probe's hooks are removed"


def test_a_probe_batch_as_long_as_it_is_large_still_tells_sequence_first_layers():
    """Dummy inputs of 4 examples of 4 tokens: a [S, B, d] layer input looks batch first; the probe tries twice
    the examples, and each row of a batch of 8 examples of 8 tokens gets its own task."""
    config_cls, model_cls, config = KEY_BIAS_FAMILIES["longformer"]

    class SquareDummies(model_cls):
        @property
        def dummy_inputs(self):
            return {"input_ids": torch.arange(3, 19).view(4, 4)}

    base = SquareDummies(config_cls(**config, num_labels=3)).to(DEVICE).eval()
    bank = TaskBank.new(copy.deepcopy(base), {"a": 3, "b": 3}, backend="torch").eval()
    assert bank.model.longformer.encoder.layer[0].attention.self.query.examples_dim == 1


def test_a_model_whose_logits_are_not_a_row_block_per_example_is_refused():
    import transformers
    from transformers.modeling_outputs import SequenceClassifierOutput

    class FlatLogits(transformers.BertForSequenceClassification):
        def forward(self, **kwargs):
            return SequenceClassifierOutput(logits=super().forward(**kwargs).logits.reshape(-1))

    model = FlatLogits(bert_of("BertForSequenceClassification")().config)
    with pytest.raises(ValueError, match=r"a FlatLogits answers with logits of shape \(6,\), not logits per example"):
        TaskBank.new(model, {"a": 2, "b": 2}, backend="torch")
    assert not bitfit_fast.model.is_applied(model)


def test_a_refused_or_failed_probe_leaves_each_modules_mode_and_no_hook():
    from bitfit_fast.task_bank import _check_rows_per_example

    model = bert_of("BertForQuestionAnswering")().train()
    model.qa_outputs.eval()
    with pytest.raises(ValueError, match="not logits per example"):
        TaskBank.new(model, {"a": 2, "b": 2}, backend="torch")
    assert model.training and model.bert.training and not model.qa_outputs.training
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())

    model = bert_of("BertForSequenceClassification")().train()

    def needs_other_inputs(*_):
        raise RuntimeError("needs other inputs")

    model.bert.pooler.register_forward_pre_hook(needs_other_inputs)
    query = model.bert.encoder.layer[0].attention.self.query
    _check_rows_per_example(model, {"bert.encoder.layer.0.attention.self.query.bias": query})  # not probed
    assert all(m.training for m in model.modules()) and not query._forward_pre_hooks
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 1, "only the test's own hook is left"


# Families whose biases a TaskBank cannot give each example its task's: the first such bias, and why.
BANK_REFUSES = {
    "deberta": "deberta.embeddings.LayerNorm.bias is added by a DebertaLayerNorm in its own forward",
    "funnel": "attention.r_w_bias is added by a FunnelRelMultiheadAttention in its own forward",
    "convbert": "key_conv_attn_layer.bias is added by a SeparableConv1D in its own forward",
    "mobilebert": "mobilebert.embeddings.LayerNorm.bias is added by a NoNorm in its own forward",
    # the adapters of languages absent from a batch get no rows: not a block per example
    "xmod": r"adapter_modules.de_DE.dense1.bias's layer takes an input of shape \(0, 5, 36\) for a batch of 3",
}


@pytest.mark.parametrize("family", [*FAMILIES, *KEY_BIAS_FAMILIES])
def test_a_bank_of_any_family_gives_each_example_its_tasks_logits_or_is_refused_before_it_changes(family, tmp_path):
    """Every family apply takes: a mixed batch's logits equal each task's own model's (the tasks saved from the
    bank, loaded onto their own applied base), or the bank is refused in one line with the model unchanged.
    Longformer's attention projects its states sequence first, [S, B, d]: a batch of 8 examples padded to 8
    tokens, whose rows a layer could not tell from batch-first ones by their shape, gets each row's task right."""
    config_cls, model_cls, config = {**FAMILIES, **KEY_BIAS_FAMILIES}[family]
    base = model_cls(config_cls(**config, num_labels=3)).to(DEVICE).eval()
    model = copy.deepcopy(base)
    if family in BANK_REFUSES:
        with pytest.raises(ValueError, match=BANK_REFUSES[family]):
            TaskBank.new(model, {"a": 3, "b": 3}, backend="torch")
        assert not bitfit_fast.model.is_applied(model)
        return
    bank = TaskBank.new(model, {"a": 3, "b": 3, "c": 3}, backend="torch").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainable(bank).values():
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.3)
    singles = {}
    for name in bank.tasks:
        bank.save_task(name, tmp_path / name)
        own = bitfit_fast.apply(copy.deepcopy(base), backend="torch", announce=False)
        singles[name] = (bitfit_fast.load_biases(own, tmp_path / name).eval(), None)
    for lengths in [KEY_BIAS_LENGTHS[family]] if family in KEY_BIAS_LENGTHS else [LENGTHS, (7, 3, 5, 1, 6, 2, 4, 8)]:
        batch = padded_batch(base, lengths)
        batch.pop("labels")
        example_tasks = [list(bank.tasks)[i % 3] for i in range(len(lengths))]
        check_mixed_equals_single(bank, singles, batch, example_tasks, atol=1e-5, rtol=1e-5)


def test_task_tensors_are_detached_views_of_the_bank():
    # Views with a gradient function would keep the parameters' AccumulateGrad nodes alive, bound to the stream they
    # were made on, which breaks a later GraphedStep's capture on a GPU (see test_bench.py).
    bank = TaskBank.new(MODELS["bert"](num_labels=3, num_hidden_layers=1), {"topic": 3, "score": 1})
    storages = {p.untyped_storage().data_ptr() for p in bank.parameters()}
    for name in bank.tasks:
        tensors = bank.task_tensors(name)
        assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors.values())
        assert all(t.untyped_storage().data_ptr() in storages for t in tensors.values()), "views, not copies"

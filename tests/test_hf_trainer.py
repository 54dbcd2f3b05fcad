"""The Hugging Face Trainer trains an applied model, unchanged."""

import copy

import torch
import transformers
from bitfit_reference import padded_batch, reference_bitfit, tiny_bert, trainable, zero_gradient_bias

import bitfit_fast


class Batches(torch.utils.data.Dataset):
    def __init__(self, model, n):
        batch = padded_batch(model, lengths=(7,) * n)
        self.rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_runs_and_moves_only_the_biases_and_head(tmp_path):
    model = bitfit_fast.apply(tiny_bert())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
    )
    result = transformers.Trainer(model=model, args=args, train_dataset=Batches(model, 16)).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach().cpu(), before[name].cpu())
        # The key bias trains but its gradient is exactly zero: from its zero init it does not move.
        assert changed == (param.requires_grad and not zero_gradient_bias(name)), name


def test_trainer_ends_where_reference_bitfit_ends_and_resumes_from_its_checkpoints(tmp_path):
    """Under the Trainer, with gradient accumulation, weight decay, clipping and a warm-up schedule, the applied
    model ends with the parameters reference BitFit (the same model, non-bias weights frozen) ends with; and a fresh
    applied model resumed from the run's checkpoint after step 2 ends there too (the checkpoint's weights, packed q/k/v
    included, and its optimizer state load back)."""
    base = tiny_bert()
    reference = reference_bitfit(copy.deepcopy(base))
    for name, param in reference.named_parameters():
        if zero_gradient_bias(name):  # its true gradient is zero: rounding noise would become lr-sized steps
            param.register_hook(torch.zeros_like)
    data = Batches(base, 24)

    def train(model, out, resume_from=None):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.05, warmup_steps=1, save_strategy="steps",
            save_steps=2, report_to=[], logging_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume_from)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    ours = train(bitfit_fast.apply(copy.deepcopy(base), announce=False), tmp_path / "ours")
    expected = train(reference, tmp_path / "reference")
    assert set(ours) == set(expected)
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=1e-5, msg=name)
        moved += not torch.allclose(value, trainable(base)[name], atol=1e-4)
    assert moved > len(expected) // 2, "the steps must move the parameters for the comparison to mean much"
    resumed = train(bitfit_fast.apply(copy.deepcopy(base), announce=False), tmp_path / "resumed",
                    resume_from=str(tmp_path / "ours" / "checkpoint-2"))
    for name, value in ours.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-7, rtol=1e-6, msg=name)

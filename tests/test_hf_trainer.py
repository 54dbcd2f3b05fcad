"""The Hugging Face Trainer trains an applied model, unchanged."""

import torch
import transformers
from bitfit_reference import padded_batch, tiny_bert, zero_gradient_bias

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

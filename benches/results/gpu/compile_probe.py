"""Which layer of the modules path breaks dynamo on the GPU (torch 2.11, triton backend)? Each BitFit layer of
one tiny BERT layer compiled alone (aot_eager), forward and backward, on 3-D and 2-D inputs. Ran from the
repository root with the packages on PYTHONPATH as gpu_run.sh sets them; output in compile-probe.txt."""

import sys

import torch

sys.path.insert(0, "tests")
from bitfit_reference import PATHS, tiny_bert  # noqa: E402

import bitfit_fast  # noqa: E402

model = bitfit_fast.apply(tiny_bert(), backend="triton", announce=False, **PATHS["modules"]).train()
layer = model.bert.encoder.layer[0]
hidden = model.config.hidden_size
cases = {"query": layer.attention.self.query, "key(zero grad)": layer.attention.self.key,
         "value": layer.attention.self.value, "attn.out.dense": layer.attention.output.dense,
         "attn.out.LayerNorm": layer.attention.output.LayerNorm, "intermediate.dense": layer.intermediate.dense}
for name, module in cases.items():
    features = getattr(module, "in_features", hidden)
    for shape in ((2, 5, features), (10, features)):
        torch._dynamo.reset()
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        try:
            out = torch.compile(module, backend="aot_eager")(x)
            out.float().sum().backward()
            print(f"OK   {name} {shape}")
        except Exception as error:
            print(f"FAIL {name} {shape}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")

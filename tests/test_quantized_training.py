"""Training through NF4 layers gets the same gradients after an evaluation as before it.

bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit layer for its inference kernel the first time the layer runs
in eval mode, and that kernel has no backward: training after an evaluation (every eval_steps, and the baseline at
step 0) silently lost the gradient through every quantized layer. On a CPU without AVX512-BF16 nothing is repacked
and the test holds either way.
"""

import torch

from loraflow.adapters import LoraAdapter
from loraflow.models import native


def _lora_gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_lora_gradients_through_nf4_layers_are_unchanged_by_an_evaluation(tiny_model):
    model = native.load_causal_lm(tiny_model, "cpu", "bf16", native.bnb_config(False, "bf16"))
    model = native.prepare_for_training(model, quantized=True, gradient_checkpointing=False)
    model, _ = native.inject_adapter(model, LoraAdapter(r=8, target="all-linear"), seed=0)
    ids = torch.randint(4, 1000, (2, 48), generator=torch.Generator().manual_seed(0))

    before = _lora_gradients(model, ids)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False)  # an evaluation pass, as the Trainer runs one
    after = _lora_gradients(model, ids)

    first_layer = [name for name in before if ".layers.0." in name and before[name].abs().max() > 0]
    assert first_layer  # the gradient reaches the first layer (through every quantized layer above it)
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, rtol=1e-3, atol=1e-6), name


def test_a_process_that_imports_bitsandbytes_through_loraflow_compiles_nothing_until_a_kernel_runs():
    """bitsandbytes wraps its fallback kernels in torch.compile at import, and that call imports TorchDynamo and Inductor
    (about 1 s of CPU in each trainer, flow process and command). loraflow.models.native imports it with the call put off
    to a kernel's first call: a trainer's and a flow's imports leave Inductor unimported, and a wrapped kernel still
    compiles, with its options, when it first runs."""
    import subprocess
    import sys

    script = """
import sys
import loraflow.train, flows.sft  # (a trainer's and a flow process's imports)
print("inductor after imports:", "torch._inductor.compile_fx" in sys.modules)
from loraflow.models import native
calls = []
native._torch_compile = lambda function, **options: calls.append(options) or function  # (records torch.compile's calls)
kernel = native._compile_at_first_call(dynamic=False)(lambda x: x * 2)  # (as bitsandbytes decorates a kernel)
before = list(calls)
print("compiled at import:", before, "first call:", kernel(3), "compiled then:", calls)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines() == ["inductor after imports: False",
                                        "compiled at import: [] first call: 6 compiled then: [{'dynamic': False}]"], result.stdout + result.stderr[-3000:]

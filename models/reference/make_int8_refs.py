"""LLM.int8() references from the real stack (bitsandbytes 0.50.2, torch 2.15.0, transformers 5.24.0, CPU;
transformers needs accelerate (1.15.0) for 8-bit loading).

Run from the repository root:

    /tmp/refenv/bin/python models/reference/make_int8_refs.py

It writes

* `tests/fixtures/int8-layer/gate_proj.safetensors`: outputs of a real `bnb.nn.Linear8bitLt`
  (threshold 6.0, has_fp16_weights=False, eval mode, CPU) whose weight is SmolLM2-135M layer 0
  `mlp.gate_proj` in f32 (`input.model.layers.0.mlp.gate_proj.float32` of
  `tests/fixtures/smollm2/real-weights.safetensors`, quantized by `Int8Params(w).to("cpu")`). For each
  case `<case>` (`r7`: 7 rows with outliers, `r1`: 1 row with outliers, `r1n`: 1 row without) and each
  activation dtype `<dt>` in float32 / bfloat16 / float16: `x.<case>.<dt>` (the input, cast to `<dt>`,
  stored as f32: exact) and `y.<case>.<dt>` (the layer's output in `<dt>`, stored as f32: exact). Int8Params' codes equal `int8.model.layers.0.mlp.gate_proj.{cb,scb}` of the
  real-weights fixture (asserted). Metadata: versions, the outlier columns per case.
* `tests/fixtures/logits-int8.safetensors`: `input_ids` (those of `tests/fixtures/logits.safetensors`)
  and `logits_int8` [35, 512] f32: `models/tiny-llama` loaded by transformers with
  `BitsAndBytesConfig(load_in_8bit=True)` (llm_int8_threshold 6.0), dtype float32, on the CPU.

The CPU here has AVX-512 (incl. avx512_bf16 / VNNI), so bitsandbytes' int8 matmul is `torch._int_mm`
(exact either way: int32 sums) and bf16 `addmm` goes through oneDNN.
"""
import json
import os

import bitsandbytes as bnb
import torch
import transformers
from safetensors.torch import load_file, save_file

torch.manual_seed(0)
import accelerate

META = {"accelerate": accelerate.__version__, "bitsandbytes": bnb.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_refs():
    w = load_file("tests/fixtures/smollm2/real-weights.safetensors")["input.model.layers.0.mlp.gate_proj.float32"]
    out_f, in_f = w.shape
    lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=6.0)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    lin.eval()
    # The codes Int8Params stores are those of `int8.model.layers.0.mlp.gate_proj.{cb,scb}` in the
    # real-weights fixture (checked here, so this file need not repeat their 0.9 MB).
    ref = load_file("tests/fixtures/smollm2/real-weights.safetensors")
    assert torch.equal(lin.weight.data, ref["int8.model.layers.0.mlp.gate_proj.cb"])
    assert torch.equal(lin.weight.SCB, ref["int8.model.layers.0.mlp.gate_proj.scb"])
    tensors = {}
    # Activations like a hidden state: N(0, 1), with a few outlier columns as LLM.int8() expects
    # (values at and above the threshold, and ordinary values in an outlier column of other rows).
    x7 = torch.randn(7, in_f)
    for r, c, v in [(0, 7, 8.5), (1, 7, -12.25), (2, 123, 6.0), (4, 400, -30.0), (6, 400, 7.75), (3, 575, 9.0)]:
        x7[r, c] = v
    x1 = torch.randn(1, in_f)
    x1[0, 50], x1[0, 300] = 11.0, -6.5
    x1n = torch.randn(1, in_f).clamp(-5.0, 5.0)
    cases = {"r7": x7, "r1": x1, "r1n": x1n}
    meta = dict(META)
    with torch.inference_mode():
        for case, x in cases.items():
            for name, dt in DTYPES.items():
                xd = x.to(dt)
                y = lin(xd)
                assert y.dtype == dt, (y.dtype, dt)
                tensors[f"x.{case}.{name}"] = xd.float().contiguous()
                tensors[f"y.{case}.{name}"] = y.float().contiguous()
                cols = torch.argwhere((xd.to(torch.float16).abs() >= 6.0).any(dim=0)).view(-1).tolist()
                meta[f"outlier_cols.{case}.{name}"] = json.dumps(cols)
    os.makedirs("tests/fixtures/int8-layer", exist_ok=True)
    save_file(tensors, "tests/fixtures/int8-layer/gate_proj.safetensors", metadata=meta)


def logits_refs():
    ids = load_file("tests/fixtures/logits.safetensors")["input_ids"]
    q = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        "models/tiny-llama", quantization_config=q, dtype=torch.float32
    )
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float().contiguous()
    save_file({"input_ids": ids, "logits_int8": logits}, "tests/fixtures/logits-int8.safetensors", metadata=META)


if __name__ == "__main__":
    layer_refs()
    logits_refs()

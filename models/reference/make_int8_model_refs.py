"""LLM.int8() layer references on real activations: SmolLM2-135M-Instruct loaded by transformers 5.24.0
with `BitsAndBytesConfig(load_in_8bit=True)` (threshold 6.0, bitsandbytes 0.50.2, torch 2.15.0, CPU,
attn sdpa), run on the first 256 tokens of `tests/fixtures/ppl-text.txt`, once per model dtype
(float32, bfloat16, float16). Forward hooks capture the real input and output of a few
`Linear8bitLt` layers (256 rows, large outlier dimensions).

Run from the repository root (about a minute per dtype on 2 cores):

    /tmp/refenv/bin/python models/reference/make_int8_model_refs.py

It writes `tests/fixtures/int8-model/layers.safetensors`. To stay small the file keeps, per layer,
the first `OUT` output features and `ROWS` of the 256 rows: the first row holding an outlier (|x| >= 6 in f16) of each outlier column, which fixes the same
outlier columns, and then the first rows. Each output
feature depends only on its own weight row, and a row's output only on its own values and the
outlier columns, so the kept outputs are exactly bnb's outputs for the kept inputs (asserted
below by rerunning the layer on the subset). Tensors, for layer `<l>` and dtype `<dt>`:

* `cb.<l>` int8 [OUT, in], `scb.<l>` f32 [OUT]: `weight` / `weight.SCB` of the loaded model (the
  same for every dtype, asserted);
* `x.<l>.<dt>` [ROWS, in] and `y.<l>.<dt>` [ROWS, OUT] in `<dt>`: the captured input and output.

Metadata: versions, `outlier_cols.<l>.<dt>` (JSON), `rows.<l>.<dt>` (the kept rows, JSON).
"""
import json
import os

import accelerate
import bitsandbytes as bnb
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

torch.set_num_threads(int(os.environ.get("NT", "2")))
MODEL = "models/smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# layer -> (rows kept, output features kept): layer 12 k_proj has one outlier column in every
# dtype (f32's single-column addmm case), layer 1 down_proj eight.
LAYERS = {"model.layers.12.self_attn.k_proj": (128, 64), "model.layers.1.mlp.down_proj": (48, 64)}
META = {"accelerate": accelerate.__version__, "bitsandbytes": bnb.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "tokens": "256"}


def main():
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = tok(open("tests/fixtures/ppl-text.txt").read(), return_tensors="pt").input_ids[:, :256]
    tensors, meta = {}, dict(META)
    for name, dt in DTYPES.items():
        model = AutoModelForCausalLM.from_pretrained(
            MODEL, dtype=dt, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
            device_map="cpu", attn_implementation="sdpa")
        model.eval()
        cap, mods = {}, {}
        for lname in LAYERS:
            m = model.get_submodule(lname)
            mods[lname] = m
            m.register_forward_hook(lambda mod, i, o, lname=lname: cap.__setitem__(lname, (i[0][0].clone(), o[0].clone())))
        with torch.inference_mode():
            model(ids)
        for lname, (rows_kept, out_kept) in LAYERS.items():
            m = mods[lname]
            x, y = cap[lname]
            assert x.shape[0] == 256 and x.dtype == dt and y.dtype == dt
            out_mask = (x.to(torch.float16).abs() >= 6.0)
            cols = torch.argwhere(out_mask.any(dim=0)).view(-1).tolist()
            # One row per outlier column (its first) fixes the same outlier columns.
            outlier_rows = sorted({int(torch.argwhere(out_mask[:, c])[0]) for c in cols})
            rest = [r for r in range(256) if r not in outlier_rows]
            rows = sorted(outlier_rows + rest[: rows_kept - len(outlier_rows)])
            assert len(rows) == rows_kept
            # After a forward the codes live in the layer's state (`weight.SCB` is cleared).
            cb, scb = m.state.CB[:out_kept].contiguous(), m.state.SCB[:out_kept].contiguous()
            if f"cb.{lname}" in tensors:
                assert torch.equal(tensors[f"cb.{lname}"], cb) and torch.equal(tensors[f"scb.{lname}"], scb)
            tensors[f"cb.{lname}"], tensors[f"scb.{lname}"] = cb, scb
            xs, ys = x[rows].contiguous(), y[rows, :out_kept].contiguous()
            # The subset is self-consistent: the same layer on the kept rows gives the kept outputs.
            with torch.inference_mode():
                assert torch.equal(m(xs)[:, :out_kept], ys), lname
            tensors[f"x.{lname}.{name}"], tensors[f"y.{lname}.{name}"] = xs, ys
            meta[f"outlier_cols.{lname}.{name}"] = json.dumps(cols)
            meta[f"rows.{lname}.{name}"] = json.dumps(rows)
            print(name, lname, "outlier cols", len(cols), "outlier rows", len(outlier_rows))
    os.makedirs("tests/fixtures/int8-model", exist_ok=True)
    save_file(tensors, "tests/fixtures/int8-model/layers.safetensors", metadata=meta)


if __name__ == "__main__":
    main()

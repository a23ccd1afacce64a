"""Reference logits for Phi-3 with partial rotary embeddings (partial_rotary_factor 0.5).

The shared tiny Phi-3 (`models/tiny-phi3`) rotates whole heads; this takes the same weights with
`partial_rotary_factor` 0.5 in `rope_parameters` (16 of each head's 32 dimensions rotate) and
writes transformers' float32 logits of the shared 52-token prompt to
`tests/fixtures/arch/tiny-phi3-partial/logits.safetensors` (`input_ids`, `logits_f32`).

Run from the repository root with the reference venv (torch 2.15, transformers 5.24; see
`ppl_spread.py`): `/tmp/refenv/bin/python models/reference/make_phi3_partial_refs.py`.
"""
import json
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

src = "models/tiny-phi3"
ids = load_file("tests/fixtures/arch/tiny-phi3/logits.safetensors")["input_ids"]
with tempfile.TemporaryDirectory() as d:
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(f"{src}/{f}", d)
    cfg = json.load(open(f"{d}/config.json"))
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    json.dump(cfg, open(f"{d}/config.json", "w"))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    with torch.no_grad():
        logits = model(ids.reshape(1, -1)).logits[0].float().contiguous()
save_file({"input_ids": ids, "logits_f32": logits}, "tests/fixtures/arch/tiny-phi3-partial/logits.safetensors",
          metadata={"partial_rotary_factor": "0.5", "transformers": __import__("transformers").__version__})
print("wrote", logits.shape)

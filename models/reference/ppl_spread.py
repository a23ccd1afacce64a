"""transformers' own perplexity spread on SmolLM2 (the figures of docs/quantization.md, "How close").

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.15.0 transformers==5.24.0 bitsandbytes==0.50.2 accelerate==1.15.0 safetensors
    cd models/reference
    /tmp/refenv/bin/python ppl_spread.py DTYPE QUANT COMPUTE PATCH ATTN

DTYPE: float32|bfloat16|float16; QUANT: none|nf4|nf4_dq|fp4|int8; COMPUTE: the 4-bit compute dtype
(ignored otherwise); PATCH: `patch` turns off bitsandbytes' AVX512-BF16 packed 4-bit path (as on a CPU
without avx512_bf16, where the reference was made) or `nopatch`; ATTN: sdpa|eager. Environment: NT
(torch threads, default 2), MKLDNN=0 (torch's own GEMM instead of oneDNN), and torch's own
ATEN_CPU_CAPABILITY=avx2 (its AVX2 kernels on an AVX-512 machine). Perplexity of the first 256 tokens
of tests/fixtures/ppl-text.txt, `exp(model(ids, labels=ids).loss)`, on models/smollm2-135m-instruct.
"""
import sys, json, torch, transformers, bitsandbytes as bnb
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
import os
torch.set_num_threads(int(os.environ.get("NT","2")))
if os.environ.get("MKLDNN")=="0": torch.backends.mkldnn.enabled=False
HERE = os.path.dirname(os.path.abspath(__file__))
path = os.path.join(HERE, "../smollm2-135m-instruct")
dtype, quant, comp, patch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]=="patch"
if patch:
    bnb.nn.Linear4bit.support_avx512bf16_for_cpu = False
    import bitsandbytes.nn.modules as m
    orig_init = m.Linear4bit.__init__
    def init(self,*a,**k):
        orig_init(self,*a,**k); self.support_avx512bf16_for_cpu=False
    m.Linear4bit.__init__=init
tok=AutoTokenizer.from_pretrained(path)
text=open(os.path.join(HERE, "../../tests/fixtures/ppl-text.txt")).read()
ids=tok(text, return_tensors="pt").input_ids[:, :256]
dt={"float32":torch.float32,"bfloat16":torch.bfloat16,"float16":torch.float16}
q=None
if quant in ("nf4","fp4","nf4_dq"):
    q=BitsAndBytesConfig(load_in_4bit=True,bnb_4bit_quant_type=quant[:3],bnb_4bit_use_double_quant=quant.endswith("dq"),bnb_4bit_compute_dtype=dt[comp])
elif quant=="int8":
    q=BitsAndBytesConfig(load_in_8bit=True)
attn=sys.argv[5] if len(sys.argv)>5 else "sdpa"
model=AutoModelForCausalLM.from_pretrained(path, dtype=dt[dtype], quantization_config=q, device_map="cpu", attn_implementation=attn)
with torch.no_grad():
    out=model(ids, labels=ids)
print(dtype,quant,comp,patch, torch.exp(out.loss).item())

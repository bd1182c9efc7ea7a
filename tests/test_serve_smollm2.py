"""`python -m lima_jax.serve` on the real SmolLM2-135M-Instruct (the demo's cached import), in its
own ChatML template: the served greedy answer is `generate`'s, streamed and whole agree, and
chat and echoed prompt logprobs are our forward's. Skipped, saying why, when the weights cannot
be fetched."""

import argparse

import numpy as np
import pytest

from lima_jax.decoding import Decoding, Generator
from lima_jax.serve import loading
from serve_process import Server, forward_logprobs

FLAGS = ["--chat_format=template", "--eot_token=<|im_end|>", "--context=512"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def weights(smollm2_import):
  return smollm2_import


@pytest.fixture(scope="module")
def server(weights):
  s = Server(f"--model={weights}", *FLAGS, "--served_model_name=smollm2", "--slots=2")
  yield s
  s.stop()


@pytest.fixture(scope="module")
def local(weights):
  """The same model in this process, loaded as the server loads it: (loaded, log-softmax)."""
  loaded = loading.load(argparse.Namespace(model=weights, workdir=None, epoch=None, step=None,
                                           chat_format="template", eot_token="<|im_end|>",
                                           context=512))
  return loaded, forward_logprobs(loaded.trainer, loaded.params)


def test_smollm2_greedy_answer_stream_and_logprobs(server, local):
  loaded, logprobs = local
  client = server.client()
  got = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                       max_tokens=12, logprobs=True, top_logprobs=3,
                                       extra_body={"return_token_ids": True})
  choice = got.choices[0]
  prompt = loaded.tokenizer.encode_prompt([QUESTION[0]["content"]])
  assert got.prompt_token_ids == prompt.tolist()
  want = Generator(loaded.trainer, loaded.tokenizer.eot_id, 1).generate(
      loaded.params, [prompt], max_new=12, context=512,
      decoding=Decoding.from_config(dict(loaded.generate, greedy=True)))[0]
  assert choice.token_ids == want.tolist()
  assert "Paris" in choice.message.content
  table = logprobs(prompt.tolist() + choice.token_ids)
  for i, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs.content)):
    row = table[len(prompt) - 1 + i]
    np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
    np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(row)[::-1][:3],
                               atol=1e-4)
  chunks = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                          max_tokens=12, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_smollm2_completion_echo_logprobs(server, local):
  loaded, logprobs = local
  text = "The capital of France is Paris. The capital of Italy is"
  got = server.client().completions.create(model="smollm2", prompt=text, max_tokens=1,
                                            echo=True, logprobs=1, temperature=0)
  ids = loaded.tokenizer.backend.encode(text)
  if loaded.tokenizer.bos_id is not None:
    ids = [loaded.tokenizer.bos_id] + ids
  table = logprobs(ids)
  want = [table[i - 1, ids[i]] for i in range(1, len(ids))]
  np.testing.assert_allclose(got.choices[0].logprobs.token_logprobs[1:len(ids)], want, atol=1e-4)
  assert got.choices[0].text.startswith(text)

"""The tokenizer a GGUF import rebuilds from the file's metadata, against llama.cpp's reading of
the same fields (src/llama-vocab.cpp) and the references that agree with it: transformers' GGUF
loader, a release's tokenizer.json, tiktoken (Meta's LLaMA-3 tokenizer). Tiny files written here.
"""

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

# pylint: disable=wrong-import-position
from tokenizers import Tokenizer, models, pre_tokenizers

from lima_jax import convert
from lima_jax.errors import LimaError
from lima_jax.weights import gguf as gguf_weights
from lima_jax.weights import pretrained
from test_gguf import SPECIALS, bpe, random_llama, write_gguf  # pylint: disable=unused-import
# pylint: enable=wrong-import-position


def test_gguf_import_honours_add_bos_and_add_eos_token(tmp_path, bpe):
  """`convert gguf-to-orbax` of a file with tokenizer.ggml.add_bos_token = false (SmolLM2's
  metadata): the lima format prepends nothing; it prepended the file's bos_token
  (<|im_start|>) to every conversation before. Each add_bos / add_eos setting frames a
  conversation as llama.cpp frames a text (BOS before, EOS after; transformers' GGUF loader
  agrees where the keys are set), and a key left out takes llama.cpp's default: BOS for the
  LLaMA-3 pre-tokenizers only."""
  from lima_jax import data  # pylint: disable=import-outside-toplevel
  model = random_llama(bpe.get_vocab_size(), seed=4)
  turns = ["Hello there, 12 + 30?", "It is 42."]
  plain = [i for t in turns for i in bpe.encode(t).ids + [2]]  # EOT: <|im_end|>, id 2
  path = str(tmp_path / "nobos.gguf")
  write_gguf(path, model, bpe, add_bos=False)
  assert convert.main(["gguf-to-orbax", path, str(tmp_path / "ckpt")]) == 0
  imported = pretrained.OrbaxParams(str(tmp_path / "ckpt")).tokenizer()
  assert imported.bos_id is None and imported.eos_append_id is None
  assert imported.encode_conversation(turns, 1000, False)[0].tolist() == plain
  assert imported.encode_prompt(turns[:1]).tolist() == plain[:len(bpe.encode(turns[0]).ids) + 1]

  cases = {  # name: (write_gguf options, llama.cpp's BOS, its EOS)
      "bos": (dict(add_bos=True), [1], []),
      "bos-eos": (dict(add_bos=True, add_eos=True, eos=0), [1], [0]),
      "eos": (dict(add_bos=False, add_eos=True, eos=0), [], [0]),
      "unset-smollm": (dict(add_bos=None), [], []),
      "unset-llama-bpe": (dict(add_bos=None, pre="llama-bpe"), [1], []),
  }
  for name, (options, bos, eos) in cases.items():
    path = str(tmp_path / f"{name}.gguf")
    write_gguf(path, model, bpe, **options)
    source = gguf_weights.GgufSource(path)  # its tokenizer directory lives as long as it
    tok = data.load_tokenizer(source.tokenizer(), eot_token="<|im_end|>")
    ids, mask = tok.encode_conversation(turns, 1000, False)
    assert ids.tolist() == bos + plain + eos, name
    assert mask[:len(bos)].sum() == 0 and mask[len(mask) - len(eos):].sum() == 0
    assert tok.encode_prompt(turns[:1]).tolist()[:len(bos) + 1] == bos + plain[:1]  # no EOS
    if options["add_bos"] is not None:
      reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                             gguf_file=f"{name}.gguf")
      assert reference(turns[0])["input_ids"] == bos + bpe.encode(turns[0]).ids + eos, name
  write_gguf(str(tmp_path / "bad.gguf"), model, bpe, add_bos=True, add_eos=True, eos=9999)
  with pytest.raises(LimaError, match="add_eos_token is true, but tokenizer.ggml.eos_token_id "
                                      "is not set"):
    gguf_weights.GgufSource(str(tmp_path / "bad.gguf")).tokenizer()


def llama3_style_vocabulary():
  """A tiny byte-level BPE laid out as LLaMA-3's: the 256 bytes (id = byte value), three merges,
  the whole token " Việt" that no merge reaches (llama.cpp issue 7193's example), then SPECIALS.
  Returns (ranks, merges) as bytes."""
  ranks = {bytes([b]): b for b in range(256)}
  merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he")]
  for left, right in merges:
    ranks[left + right] = len(ranks)
  ranks[" Việt".encode()] = len(ranks)
  return ranks, merges


def release_tokenizer(ranks, merges, split: str, ignore_merges: bool):
  """The vocabulary as an HF release's tokenizer.json builds it: LLaMA-3's (Split by its regex,
  then ByteLevel, BPE with ignore_merges: Meta's tokenizer.json), SmolLM's (digits, then the
  GPT-2 regex) or GPT-2's."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Regex
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  from lima_jax.data.tokenizer import LLAMA3_PATTERN
  chars = bytes_to_unicode()
  text = lambda raw: "".join(chars[b] for b in raw)
  tokenizer = Tokenizer(models.BPE({text(t): i for t, i in ranks.items()},
                                   [(text(a), text(b)) for a, b in merges],
                                   ignore_merges=ignore_merges))
  gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.pre_tokenizer = {
      "llama3": pre_tokenizers.Sequence(
          [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
      "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]),
      "gpt2": gpt2}[split]
  tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
  return tokenizer


def test_byte_level_pre_tokenizers_encode_as_llama_cpp_and_the_release(tmp_path):
  """Every `tokenizer.ggml.pre` we accept, on a vocabulary holding a whole token no merge
  reaches (" Việt"): the rebuilt tokenizer gives the ids of the release's tokenizer.json with
  llama.cpp's split and ignore_merges for that name (llama-vocab.cpp: on for the LLaMA-3 names,
  off for smaug-bpe, dbrx and the GPT-2 / digit-first ones). For the LLaMA-3 names that is also
  what tiktoken gives on the same ranks (Meta's tokenizer): " Việt" one token, where the rebuild
  without ignore_merges split it into 7 bytes. Names we cannot reproduce are refused by name:
  llama.cpp's 'default' (and a file without the key), 'gpt2' (not a llama.cpp name), others."""
  import tiktoken  # pylint: disable=import-outside-toplevel
  from lima_jax.data.tokenizer import LLAMA3_PATTERN  # pylint: disable=import-outside-toplevel
  ranks, merges = llama3_style_vocabulary()
  meta = tiktoken.Encoding("llama3-tiny", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                           special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIALS)})
  model = random_llama(len(ranks) + len(SPECIALS), seed=6)
  texts = ["Xin chào Việt Nam!", " Việt", "Việt",
           "the theory: 2023 + 42 = 2065?\n\n  Việtnam", "<|im_start|>user\n Việt<|im_end|>\n"]
  whole = ranks[" Việt".encode()]
  for pre, (split, ignore_merges, _) in sorted(gguf_weights.PRE_TOKENIZERS.items()):
    release = release_tokenizer(ranks, merges, split, ignore_merges)
    path = str(tmp_path / f"{pre}.gguf")
    write_gguf(path, model, release, pre=pre, add_bos=False, eos=len(ranks) + 2)
    ours = Tokenizer.from_file(gguf_weights.GgufSource(path).write_tokenizer(str(tmp_path / pre)))
    for text in texts:
      assert ours.encode(text).ids == release.encode(text).ids, (pre, text)
      if split == "llama3" and ignore_merges:
        assert ours.encode(text).ids == meta.encode(text, allowed_special="all"), (pre, text)
    assert (ours.encode(" Việt").ids == [whole]) == ignore_merges, pre
  assert len(release_tokenizer(ranks, merges, "llama3", False).encode(" Việt").ids) == 7

  refused = {"default": "tokenizer.ggml.pre='default' is not supported",
             "gpt2": "tokenizer.ggml.pre='gpt2' is not supported",
             "qwen2": "tokenizer.ggml.pre='qwen2' is not supported",
             None: "tokenizer.ggml.pre is missing"}
  for pre, message in refused.items():
    path = str(tmp_path / f"refused-{pre}.gguf")
    write_gguf(path, model, release_tokenizer(ranks, merges, "gpt2", False), pre=pre,
               add_bos=False, eos=len(ranks) + 2)
    with pytest.raises(LimaError, match=message.replace("(", r"\(")):
      gguf_weights.GgufSource(path).write_tokenizer(str(tmp_path / "refused"))

"""LLaMA weights from other formats into training, and back out.

  safetensors_io  read (memory-mapped) and write safetensors files without a framework
  layout          our param tree vs per-layer tensors: views, streaming placement, EOT rows
  hf              Hugging Face directories: config.json + safetensors, both directions
  meta            Meta's original release: params.json + consolidated.*.pth
  gguf            llama.cpp's GGUF files: dequantised tensors, tokenizer.json from the metadata
  pretrained      our params-only Orbax directory, and `init_from` for training
"""

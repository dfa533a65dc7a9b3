"""Weights in and out: the one rule for naming a model (``spec``), building and loading models (``factory``),
pretrained downloads (``pretrained``), any checkpoint into a model (``checkpoints``), weights files
(``tensors``), our folder format and run layout (``folder``, ``runs``), and one module per foreign format:
OpenAI's TorchScript archives (``openai``), OpenCLIP (``open_clip``), Hugging Face (``hf``), ONNX (``onnx``)."""

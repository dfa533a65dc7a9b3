"""Weights in and out: the one rule for naming a model (``spec``), building and loading models (``factory``),
pretrained downloads (``pretrained``), our folder format and run layout (``checkpoints``, ``runs``), and one
module per foreign format: OpenAI's TorchScript archives (``openai``), Hugging Face (``hf``), ONNX (``onnx``)."""

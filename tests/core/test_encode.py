"""Batched, normalised encoding: the same features as one direct call, normalised once, eval mode restored,
inputs moved to the model's device."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.encode import context_length, encode_images, encode_texts, eval_mode, model_device
from clipforge.models import CLIP, get_model_config
from clipforge.tokenizer import tokenize


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP(get_model_config("tiny-vit")).eval()


class RecordingModel(nn.Module):
    """Features = flattened inputs scaled by a parameter, in float64; records each call's mode and input."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.gain = nn.Parameter(torch.full((), 2.0, device=device))
        self.dropout = nn.Dropout(0.5)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def encode_image(self, images):
        self.seen.append((self.training, images))
        return (images.flatten(1) * self.gain).double()

    def encode_text(self, tokens):
        self.seen.append((self.training, tokens))
        return tokens[:, :4].float() * self.gain + 1.0


def test_batched_features_equal_one_direct_batch(tiny):
    images = torch.randn(5, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a green star", "a photo of a dog", "x"]
    tokens = tokenize(texts, context_length=32)
    with torch.no_grad():
        direct_images = F.normalize(tiny.encode_image(images), dim=-1)
        direct_texts = F.normalize(tiny.encode_text(tokens), dim=-1)
    for batch_size in (1, 2, 5, 256):
        torch.testing.assert_close(encode_images(tiny, images, batch_size), direct_images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encode_texts(tiny, texts, batch_size=batch_size), direct_texts,
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode_texts(tiny, tokens, batch_size=2), direct_texts, atol=1e-5, rtol=1e-5)


def test_iterable_of_batches_as_from_a_data_loader(tiny):
    images = torch.randn(6, 3, 32, 32)
    loader = [(torch.tensor([0, 2]), images[[0, 2]]), (torch.tensor([3, 4, 5]), images[3:])]  # image 1 unreadable
    kept = []

    def batches():
        for index, batch in loader:
            kept.append(index)
            yield batch

    features = encode_images(tiny, batches())
    torch.testing.assert_close(features, encode_images(tiny, images[torch.cat(kept)]), atol=1e-5, rtol=1e-5)
    assert torch.cat(kept).tolist() == [0, 2, 3, 4, 5]


def test_features_are_float32_and_normalised_once():
    model = RecordingModel()
    images = torch.arange(24.0).reshape(2, 3, 2, 2)
    raw = encode_images(model, images, normalize=False)
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, images.flatten(1) * 2.0)
    torch.testing.assert_close(encode_images(model, images, batch_size=1), F.normalize(raw, dim=-1))
    tokens = torch.tensor([[3, 4, 0, 0], [1, 1, 1, 1]])
    expected = F.normalize(tokens.float() * 2.0 + 1.0, dim=-1)
    torch.testing.assert_close(encode_texts(model, tokens, batch_size=1), expected)


def test_eval_mode_inside_and_the_mode_restored_after():
    model = RecordingModel().train()
    encode_images(model, torch.ones(3, 3, 2, 2), batch_size=2)
    encode_texts(model, torch.ones(2, 4, dtype=torch.long))
    assert [training for training, _ in model.seen] == [False, False, False]
    assert model.training and model.dropout.training
    with pytest.raises(ValueError, match="nothing to encode"):
        encode_images(model, iter([]))
    assert model.training
    with eval_mode(model.eval()):
        assert not model.training
    assert not model.training


def test_eval_mode_leaves_a_model_in_eval_mode_untouched_and_restores_each_module():
    model = RecordingModel().eval()
    model.train = lambda mode=True: pytest.fail("a model already in eval mode was switched")
    with eval_mode(model):
        assert not model.training
    del model.train
    model.train()
    model.dropout.eval()  # a module kept in eval mode inside a training model (a frozen tower)
    with eval_mode(model):
        assert not model.training and not model.dropout.training
    assert model.training and not model.dropout.training


def test_inputs_move_to_the_model_device_and_features_stay_there():
    model = RecordingModel(device="meta")
    assert model_device(model) == torch.device("meta") and model_device(object()) == torch.device("cpu")
    features = encode_images(model, torch.ones(2, 3, 2, 2))
    assert model.seen[0][1].device == torch.device("meta") and features.device == torch.device("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_features_match_cpu(tiny):
    images, texts = torch.randn(4, 3, 32, 32), ["a red circle", "a blue square"]
    on_gpu = CLIP(get_model_config("tiny-vit")).cuda()
    on_gpu.load_state_dict(tiny.state_dict())
    gpu_images, gpu_texts = encode_images(on_gpu, images), encode_texts(on_gpu, texts)
    assert gpu_images.device.type == "cuda" and gpu_texts.device.type == "cuda"
    torch.testing.assert_close(gpu_images.cpu(), encode_images(tiny, images), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu_texts.cpu(), encode_texts(tiny, texts), atol=1e-4, rtol=1e-4)


def test_autocast_wraps_each_batch_and_texts_use_the_context_length():
    entered = []

    @contextmanager
    def autocast():
        entered.append(True)
        yield

    model = RecordingModel()
    model.context_length = 12
    encode_texts(model, ["a", "b", "c"], batch_size=2, autocast=autocast)
    assert len(entered) == 2 and [tokens.shape for _, tokens in model.seen] == [(2, 12), (1, 12)]
    assert context_length(model) == 12 and context_length(object()) == 77

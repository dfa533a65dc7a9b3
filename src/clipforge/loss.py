"""CLIP's symmetric contrastive loss (Radford et al. 2021) and SigLIP's sigmoid loss (Zhai et al. 2023), and
the paper's predictive baselines (sec. 2.3): bag-of-words and caption (language-model) losses.

The contrastive loss has a plain form, a memory-efficient tiled form (log-sum-exp accumulated tile by
tile and tiles recomputed in backward, as in Inf-CL, Cheng et al. 2024) and a distributed global
batch (all-gathered features, optionally the "local loss" of OpenCLIP).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforge.runtime.distributed import all_gather_with_grad, process_env

SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0
DEFAULT_TILE_SIZE = 2048


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                     tile_size: int | None = None, *, gather: bool = False,
                     local_loss: bool = False) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss: ``(CE(logits, labels) + CE(logits.T, labels)) / 2``.

    ``logits = logit_scale * image_features @ text_features.T`` and ``labels = arange(n)``: image
    ``i`` belongs with text ``i``. Features are ``(n, d)`` and assumed L2-normalised; ``logit_scale``
    is the multiplier (``model.logit_scale.exp()``), a float or a one-element tensor, and receives a
    gradient when it is a tensor that requires one.

    ``tile_size=None`` builds the ``n x n`` logits; an integer computes the same loss and gradients in
    ``tile_size x tile_size`` tiles, memory ``O(n * d + tile_size**2)`` (``DEFAULT_TILE_SIZE`` is a
    good CPU value; larger tiles suit GPUs). ``gather=True`` uses the global batch of all ranks
    (``torch.distributed``): every rank computes the loss of the concatenated batch.
    ``local_loss=True`` (with ``gather``) makes rank ``r`` compute only its own image rows and text
    columns against the global batch; the mean over ranks is the global loss and memory grows
    linearly with the global batch. Gradients, once DDP averages them over ranks, equal those of one
    process on the concatenated batch (see ``clipforge.runtime.distributed.all_gather_with_grad``).
    """
    scale = _check_inputs("contrastive_loss", image_features, text_features, logit_scale)
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int)
                                  or tile_size < 1):
        raise ValueError(f"contrastive_loss: tile_size must be a positive int or None, got {tile_size!r}")
    if local_loss and not gather:
        raise ValueError("contrastive_loss: local_loss=True needs gather=True (it only changes how the "
                         "global batch is split over ranks)")
    env = process_env()
    rank, world_size = env.rank, env.world_size
    if gather and world_size > 1:
        all_images = all_gather_with_grad(image_features)
        all_texts = all_gather_with_grad(text_features)
        if local_loss:
            offset = rank * image_features.shape[0]
            return _local_loss(image_features, text_features, all_images, all_texts, scale, offset,
                               tile_size)
        image_features, text_features = all_images, all_texts
    if tile_size is None:
        return _plain_loss(image_features, text_features, scale)
    return _tiled_loss(image_features, text_features, scale, tile_size)


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                 gather: bool = False) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)) / n``.

    ``z_ij`` is +1 for matching pairs (``i == j``) and -1 otherwise; the sum over all ``n x n``
    pairs is divided by the number of images. ``logit_scale`` is the multiplier ``t`` (the model
    learns ``log t``, initialised to ``SIGLIP_INIT_LOGIT_SCALE``), ``logit_bias`` is ``b``
    (initialised to ``SIGLIP_INIT_LOGIT_BIAS``); each is a float or a one-element tensor.
    ``gather=True`` pairs this rank's images with the texts of all ranks; the mean over ranks is the
    loss of the concatenated batch.
    """
    scale = _check_inputs("sigmoid_loss", image_features, text_features, logit_scale)
    bias = _as_scalar("sigmoid_loss", "logit_bias", logit_bias, image_features)
    env = process_env()
    rank, world_size = env.rank, env.world_size
    offset = 0
    if gather and world_size > 1:
        offset = rank * text_features.shape[0]
        text_features = all_gather_with_grad(text_features)
    n = image_features.shape[0]
    logits = scale * image_features @ text_features.T + bias  # (n, n * world_size)
    signs = torch.full_like(logits, -1.0)
    signs[:, offset:offset + n].fill_diagonal_(1.0)
    return -F.logsigmoid(signs * logits).sum() / n


def word_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) True at a caption's word tokens: after start-of-text (column 0), before end-of-text (the
    row's largest id, as the tokenizer writes it); padding after end-of-text is never a word."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # (1, L)
    return (positions > 0) & (positions < tokens.argmax(dim=-1, keepdim=True))


def bow_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Bag-of-words prediction (CLIP sec. 2.3): ``mean_n -sum_v target[n, v] * log_softmax(logits[n])[v]``.

    ``target[n]`` is the multi-hot vector of the word tokens of caption ``n`` (each distinct word once, see
    ``word_token_mask``) divided by its sum. ``logits`` (N, V); ``tokens`` (N, L). Captions without a
    word are left out of the mean (a batch of only such captions gives 0 with a zero gradient).
    """
    _check_token_logits("bow_loss", logits, tokens, 2)
    log_probs = _log_softmax(logits)
    words = word_token_mask(tokens).to(log_probs.dtype)
    target = torch.zeros_like(log_probs).scatter_add_(1, tokens, words).clamp_(max=1.0)  # (N, V) multi-hot
    counts = target.sum(dim=-1)
    has_words = counts > 0
    per_caption = -(target * log_probs).sum(dim=-1) / counts.clamp(min=1)
    return (per_caption * has_words).sum() / has_words.sum().clamp(min=1)


def caption_log_likelihood(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) log-probability of each caption's tokens 1..end-of-text (inclusive) under next-token ``logits``
    (N, L, V), where position t predicts token t + 1; padding after end-of-text is not counted."""
    _check_token_logits("caption_log_likelihood", logits, tokens, 3)
    targets = tokens[:, 1:]  # (N, L - 1): token t + 1 predicted at position t
    log_probs = _log_softmax(logits[:, :-1]).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_probs * predicted_token_mask(tokens)).sum(dim=-1)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced language-model loss (CLIP sec. 2.3, VirTex): the next-token cross-entropy of
    positions 1..end-of-text (inclusive), averaged over all predicted tokens of the batch.

    ``logits`` are (N, L, V), or (P, V) at only the P positions of ``predicted_token_mask`` in row-major
    order (``CLIP.caption_logits(..., predicted_only=True)``), which gives the same loss for less work.
    """
    if logits.ndim == 2:
        targets = tokens[:, 1:][predicted_token_mask(tokens)]
        if len(logits) != len(targets):
            raise ValueError(f"caption_loss: {len(logits)} rows of logits for {len(targets)} predicted tokens; "
                             "pass (N, L, V) logits or those at the predicted positions only")
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0
    return -caption_log_likelihood(logits, tokens).sum() / predicted_token_mask(tokens).sum().clamp(min=1)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Over the vocabulary, in at least float32 (half-precision logits are upcast)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def predicted_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L - 1) True at the positions t whose target token t + 1 lies at or before the row's end-of-text:
    the positions ``caption_loss`` counts."""
    positions = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]
    return positions <= tokens.argmax(dim=-1, keepdim=True)


def _check_token_logits(caller: str, logits: torch.Tensor, tokens: torch.Tensor, logits_ndim: int) -> None:
    expected = "(N, V)" if logits_ndim == 2 else "(N, L, V)"
    if logits.ndim != logits_ndim or tokens.ndim != 2 or len(tokens) == 0 or len(logits) != len(tokens) \
            or (logits_ndim == 3 and logits.shape[1] != tokens.shape[1]):
        raise ValueError(f"{caller}: logits must be {expected} and tokens (N, L) with the same N"
                         f"{' and L' if logits_ndim == 3 else ''}, got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    if tokens.dtype != torch.long:
        raise ValueError(f"{caller}: tokens must be int64 token ids, got {tokens.dtype}")


def clamp_logit_scale_(param: torch.Tensor, max_value: float = math.log(100)) -> torch.Tensor:
    """Clamp the learned log-temperature in place to ``[0, max_value]`` (CLIP caps the scale at 100).

    Call it on ``model.logit_scale`` after each optimiser step. Returns ``param``.
    """
    with torch.no_grad():
        param.clamp_(0.0, max_value)
    return param


def _as_scalar(caller: str, name: str, value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{caller}: {name} must be a scalar or one-element tensor, "
                             f"got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        dtype = torch.promote_types(like.dtype, torch.float32)
        return torch.tensor(float(value), dtype=dtype, device=like.device)
    raise ValueError(f"{caller}: {name} must be a float or a one-element tensor, got {type(value).__name__}")


def _check_inputs(caller: str, image_features: torch.Tensor, text_features: torch.Tensor,
                  logit_scale) -> torch.Tensor:
    for name, feats in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] == 0:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"{caller}: {name} must be a non-empty (batch, dim) tensor, got {shape}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"{caller}: image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (one text per image)")
    return _as_scalar(caller, "logit_scale", logit_scale, image_features)


def _plain_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # the n x n products run in the autocast (or the features') half precision, as a plain matmul would;
    # the logits, their log-sum-exps and gradients are float32
    matmul_dtype = _autocast_dtype(images.device.type)
    if matmul_dtype is None and images.dtype in (torch.float16, torch.bfloat16):
        matmul_dtype = images.dtype
    return _PlainContrastive.apply(*_upcast(images, texts, scale), matmul_dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives matrix multiplies on ``device_type`` now, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return a @ b if dtype is None else (a.to(dtype) @ b.to(dtype)).float()


class _PlainContrastive(torch.autograd.Function):
    """The symmetric loss over the materialised ``n x n`` logits, with a hand-written backward.

    Forward: ``logits = scale * images @ texts.T`` (the products in ``matmul_dtype`` if given), the
    log-sum-exp of every row and column (no softmax over a strided transpose) and
    ``loss = (mean(lse_rows - diag) + mean(lse_cols - diag)) / 2``.
    Backward: ``dloss/dlogits = (softmax over rows + softmax over columns - 2 I) / 2n`` built in one
    ``n x n`` buffer, so the peak is about two ``n x n`` matrices where autograd of the definition holds
    four or five.
    """

    @staticmethod
    def forward(ctx, images, texts, scale, matmul_dtype):
        with torch.autocast(images.device.type, enabled=False):
            logits = _mm(scale * images, texts.T, matmul_dtype)  # (n, n)
            lse_rows, lse_cols = logits.logsumexp(1), logits.logsumexp(0)
            matched = logits.diagonal()
            loss = ((lse_rows - matched).mean() + (lse_cols - matched).mean()) / 2
        ctx.save_for_backward(images, texts, scale, logits, lse_rows, lse_cols)
        ctx.matmul_dtype = matmul_dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        images, texts, scale, logits, lse_rows, lse_cols = ctx.saved_tensors
        n = logits.shape[0]
        with torch.autocast(images.device.type, enabled=False):
            d_logits = torch.sub(logits, lse_rows[:, None]).exp_()  # softmax over each row
            for r0, r1 in _blocks(n, max(1, 2**22 // n)):  # + softmax over each column, a few rows at a time
                d_logits[r0:r1] += logits[r0:r1].sub(lse_cols).exp_()
            d_logits.diagonal().sub_(2)
            d_logits.mul_(grad / (2 * n))
            need_images, need_texts, need_scale, _ = ctx.needs_input_grad
            d_images = d_texts = d_scale = None
            if need_images or need_scale:
                d_images = _mm(d_logits, texts, ctx.matmul_dtype)  # d loss / d (scale * images)
                if need_scale:
                    d_scale = torch.dot(images.flatten(), d_images.flatten()).reshape(scale.shape)
                d_images = d_images.mul_(scale) if need_images else None
            if need_texts:  # not with a locked text tower
                d_texts = _mm(d_logits.T, images, ctx.matmul_dtype).mul_(scale)
        return d_images, d_texts, d_scale, None


def _local_loss(images, texts, all_images, all_texts, scale, offset: int, tile_size: int | None):
    """Rank-local rows (own images vs all texts) and columns (own texts vs all images)."""
    n = images.shape[0]
    if tile_size is None:
        labels = torch.arange(offset, offset + n, device=images.device)
        per_image = F.cross_entropy(scale * images @ all_texts.T, labels)  # logits (n, N)
        per_text = F.cross_entropy(scale * texts @ all_images.T, labels)  # logits (n, N)
        return (per_image + per_text) / 2
    images, texts, all_images, all_texts, scale = _upcast(images, texts, all_images, all_texts, scale)
    lse_images, _, matched = _TiledLogSumExp.apply(images, all_texts, scale, tile_size, False, offset)
    lse_texts, _, matched_too = _TiledLogSumExp.apply(texts, all_images, scale, tile_size, False, offset)
    return (lse_images.sum() + lse_texts.sum() - scale * (matched + matched_too)) / (2 * n)


def _tiled_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, tile_size: int) -> torch.Tensor:
    n = images.shape[0]
    images, texts, scale = _upcast(images, texts, scale)
    lse_rows, lse_cols, matched = _TiledLogSumExp.apply(images, texts, scale, tile_size, True, 0)
    return (lse_rows.sum() + lse_cols.sum()) / (2 * n) - scale * matched / n


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The plain and tiled paths accumulate in at least float32 (half-precision features are upcast)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _blocks(size: int, tile: int):
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def _merge_lse(acc: torch.Tensor, tile: torch.Tensor, dim: int, scratch: torch.Tensor) -> None:
    """acc <- logaddexp(acc, logsumexp(tile, dim)), the tile's exp written into ``scratch``."""
    peak = tile.amax(dim, keepdim=True).clamp_(min=torch.finfo(tile.dtype).min)
    torch.sub(tile, peak, out=scratch).exp_()
    part = scratch.sum(dim).log_().add_(peak.squeeze(dim))
    torch.logaddexp(acc, part, out=acc)


class _TiledLogSumExp(torch.autograd.Function):
    """Log-sum-exps of ``S = scale * q @ k.T`` over rows (and columns) without materialising ``S``.

    Returns ``(lse_rows, lse_cols, matched)`` with ``matched = sum_i q_i . k_(offset + i)`` (unscaled),
    the labelled pairs' similarities, so that all gradients land in one buffer per input. Forward
    sweeps ``tile x tile`` blocks, merging each block's log-sum-exp into running per-row and
    per-column values; only the inputs and the log-sum-exps are saved. Backward recomputes each
    block and its softmax weights ``exp(S - lse) * grad_lse`` and accumulates ``dq``, ``dk`` and
    ``dscale = sum_ij dS_ij (q_i . k_j)``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, tile: int, with_cols: bool, offset: int):
        ctx.set_materialize_grads(False)
        with torch.autocast(q.device.type, enabled=False):
            lse_rows, lse_cols = _tiled_lse_forward(q, k, scale, tile, with_cols)
            matched = torch.dot(q.flatten(), k[offset:offset + q.shape[0]].flatten())
        ctx.tile, ctx.offset = tile, offset
        ctx.save_for_backward(q, k, scale, lse_rows, lse_cols)
        return lse_rows, lse_cols, matched

    @staticmethod
    def backward(ctx, grad_rows, grad_cols, grad_matched):
        q, k, scale, lse_rows, lse_cols = ctx.saved_tensors
        if lse_cols.numel() == 0:
            grad_cols = None
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dscale = _tiled_lse_backward(q, k, scale, lse_rows, lse_cols, grad_rows, grad_cols,
                                                 ctx.tile)
            if grad_matched is not None:
                rows = slice(ctx.offset, ctx.offset + q.shape[0])
                dq.addcmul_(k[rows], grad_matched)
                dk[rows].addcmul_(q, grad_matched)
        return dq, dk, dscale, None, None, None


def _tiled_lse_forward(q, k, scale, tile: int, with_cols: bool):
    lse_rows = q.new_full((q.shape[0],), -math.inf)
    lse_cols = q.new_full((k.shape[0] if with_cols else 0,), -math.inf)
    scratch = q.new_empty(tile * tile)
    for (r0, r1), (c0, c1), _, block in _logit_tiles(q, k, scale, tile):
        work = scratch[:block.numel()].view(block.shape)
        _merge_lse(lse_rows[r0:r1], block, 1, work)
        if with_cols:
            _merge_lse(lse_cols[c0:c1], block, 0, work)
    return lse_rows, lse_cols


def _logit_tiles(q, k, scale, tile: int):
    """Yield ((r0, r1), (c0, c1), scale * q[r0:r1], scale * q[r0:r1] @ k[c0:c1].T) for every tile, computing
    each tile into one reused buffer (so a tile is only valid until the next one is yielded)."""
    buffer = q.new_empty(tile * tile)
    for r0, r1 in _blocks(q.shape[0], tile):
        q_scaled = q[r0:r1] * scale  # (rows, d)
        for c0, c1 in _blocks(k.shape[0], tile):
            shape = (r1 - r0, c1 - c0)
            yield (r0, r1), (c0, c1), q_scaled, torch.mm(q_scaled, k[c0:c1].T,
                                                         out=buffer[:shape[0] * shape[1]].view(shape))


def _tiled_lse_backward(q, k, scale, lse_rows, lse_cols, grad_rows, grad_cols, tile: int):
    """Gradients of ``sum(grad_rows * lse_rows) + sum(grad_cols * lse_cols)``, tile by tile."""
    dq_unscaled = torch.zeros_like(q)  # sum_j dS_ij k_j; dq = scale * this
    dk = torch.zeros_like(k)
    weights = q.new_empty(tile * tile)
    for (r0, r1), (c0, c1), q_scaled, block in _logit_tiles(q, k, scale, tile):
        d_block = weights[:block.numel()].view(block.shape)  # dLoss / dS for this tile
        if grad_rows is None:
            d_block.zero_()
        else:
            torch.sub(block, lse_rows[r0:r1, None], out=d_block).exp_().mul_(grad_rows[r0:r1, None])
        if grad_cols is not None:
            block.sub_(lse_cols[None, c0:c1]).exp_()
            d_block.addcmul_(block, grad_cols[None, c0:c1])
        dq_unscaled[r0:r1].addmm_(d_block, k[c0:c1])
        dk[c0:c1].addmm_(d_block.T, q_scaled)
    dscale = torch.dot(q.flatten(), dq_unscaled.flatten()).reshape(scale.shape)
    return dq_unscaled.mul_(scale), dk, dscale

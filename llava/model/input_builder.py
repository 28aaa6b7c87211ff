"""Build the language model's input: expand each image placeholder into that image's visual tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

Embedder = Callable[[torch.Tensor], torch.Tensor]  # token ids (T,) -> (T, C)


@dataclass
class ImageTokens:
    """One image's visual tokens and where they stand.

    Attributes:
        tokens: (n, C).
        positions: None: packed, the tokens take n consecutive positions. Else (n,) int64: each token's offset within
            the image's ``span`` positions (VisionZip's ``positions="original"``: its place among all the image's
            tokens, see :mod:`llava.model.positions`); -1 is the slot of the token before the image.
        span: positions the image advances the sequence by (the vanilla token count); None: n.
    """

    tokens: torch.Tensor
    positions: torch.Tensor | None = None
    span: int | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and tuple(self.positions.shape) != (self.tokens.shape[0],):
            raise ValueError(
                f"ImageTokens.positions must be ({self.tokens.shape[0]},), got {tuple(self.positions.shape)}"
            )

    @property
    def length(self) -> int:
        """Positions this image advances the sequence by."""
        return self.tokens.shape[0] if self.span is None else self.span


ImageInput = torch.Tensor | ImageTokens  # a bare (n, C) tensor is packed


def _tokens(image: ImageInput) -> torch.Tensor:
    return image.tokens if isinstance(image, ImageTokens) else image


def sample_positions(input_ids: torch.Tensor, images: list[ImageInput], start: int = 0) -> torch.Tensor:
    """Position ids of one spliced sample (:func:`splice_sample`): a text token advances by 1, an image by its
    ``span``; an image's tokens take ``start of the image + their offsets`` (consecutive when packed).

    Args:
        input_ids: (L,) without padding, one ``IMAGE_TOKEN_INDEX`` per image.
        images: one tensor or :class:`ImageTokens` per placeholder, in order.
        start: position of the first token.

    Returns:
        (L',) int64, L' the spliced length.
    """
    is_image = (input_ids == IMAGE_TOKEN_INDEX).cpu()
    if int(is_image.sum()) != len(images):
        raise ValueError(f"a sample has {int(is_image.sum())} image placeholders but {len(images)} images were given")
    spans = torch.tensor([image.length if isinstance(image, ImageTokens) else image.shape[0] for image in images])
    advance = torch.ones(input_ids.shape[0], dtype=torch.long)
    advance[is_image] = spans.long()
    first = start + advance.cumsum(0) - advance  # (L,) position of each id's first token
    pieces, previous = [], 0
    for k, index in enumerate(is_image.nonzero().flatten().tolist()):
        offsets = images[k].positions if isinstance(images[k], ImageTokens) else None
        offsets = torch.arange(_tokens(images[k]).shape[0]) if offsets is None else offsets.cpu().long()
        pieces += [first[previous:index], first[index] + offsets]
        previous = index + 1
    pieces.append(first[previous:])
    return torch.cat(pieces).to(input_ids.device)


@dataclass
class MultimodalBatch:
    """Padded LLM input: embeddings (B, L, C), attention_mask (B, L), position_ids (B, L), labels (B, L) or None,
    image_ids (B, L): the image each token belongs to, counted within its sample from 0, -1 for text and padding
    (what methods that prune image tokens inside the language model read)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    image_ids: torch.Tensor | None = None


def sample_image_ids(input_ids: torch.Tensor, images: list[ImageInput]) -> torch.Tensor:
    """(L',) the image of each token of one spliced sample (:func:`splice_sample`), -1 for text.

    Args:
        input_ids: (L,) without padding, one ``IMAGE_TOKEN_INDEX`` per image.
    """
    is_image = input_ids == IMAGE_TOKEN_INDEX
    lengths = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    lengths[is_image] = torch.tensor([_tokens(image).shape[0] for image in images], device=input_ids.device).long()
    ids = torch.full_like(input_ids, -1, dtype=torch.long)
    ids[is_image] = torch.arange(len(images), device=input_ids.device)
    return ids.repeat_interleave(lengths)


def splice_sample(
    input_ids: torch.Tensor, labels: torch.Tensor, images: list[ImageInput], embed: Embedder
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: text embeddings with each ``IMAGE_TOKEN_INDEX`` replaced by an image's tokens.

    Args:
        input_ids: (L,) without padding; labels: (L,).
        images: one (n_i, C) tensor (or :class:`ImageTokens`) per placeholder, in order; their count sets the
            sequence length.
        embed: token ids (T,) -> (T, C).

    Returns:
        embeds (L', C) and labels (L',), image positions labelled ``IGNORE_INDEX``.
    """
    positions = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(positions) != len(images):
        raise ValueError(f"a sample has {len(positions)} image placeholders but {len(images)} images were given")
    bounds = [-1, *positions, input_ids.shape[0]]
    text_ids = [input_ids[a + 1 : b] for a, b in pairwise(bounds)]
    text_labels = [labels[a + 1 : b] for a, b in pairwise(bounds)]
    text_embeds = embed(torch.cat(text_ids)).split([t.shape[0] for t in text_ids])
    pieces, piece_labels = [], []
    for i, (chunk, chunk_labels) in enumerate(zip(text_embeds, text_labels, strict=True)):
        pieces.append(chunk)
        piece_labels.append(chunk_labels)
        if i < len(images):
            # the tower and the projector may sit elsewhere
            image = _tokens(images[i]).to(device=chunk.device, dtype=chunk.dtype)
            pieces.append(image)
            piece_labels.append(torch.full((image.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
    return torch.cat(pieces), torch.cat(piece_labels)


def pad_samples(
    embeds: list[torch.Tensor], labels: list[torch.Tensor], padding_side: str, max_length: int | None,
    positions: list[torch.Tensor] | None = None, image_ids: list[torch.Tensor] | None = None,
) -> MultimodalBatch:  # fmt: skip
    """Truncate to ``max_length`` and pad to the longest sample on ``padding_side``.

    ``positions``: each sample's position ids (L_i,) (:func:`sample_positions`); None: 0, 1, 2... per sample.
    Padding gets position 0. ``image_ids``: each sample's (L_i,) (:func:`sample_image_ids`); padding gets -1.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"tokenizer_padding_side must be 'left' or 'right', got {padding_side!r}")
    if positions is None:
        positions = [torch.arange(e.shape[0], device=e.device) for e in embeds]
    if image_ids is None:
        image_ids = [torch.full((e.shape[0],), -1, dtype=torch.long, device=e.device) for e in embeds]
    if max_length is not None:
        embeds, labels = [e[:max_length] for e in embeds], [lab[:max_length] for lab in labels]
        positions, image_ids = [p[:max_length] for p in positions], [i[:max_length] for i in image_ids]
    batch, longest, channels = len(embeds), max(e.shape[0] for e in embeds), embeds[0].shape[1]
    device, dtype = embeds[0].device, embeds[0].dtype
    out = torch.zeros(batch, longest, channels, device=device, dtype=dtype)
    out_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=labels[0].dtype, device=device)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    out_positions = torch.zeros(batch, longest, dtype=torch.long, device=device)
    out_images = torch.full((batch, longest), -1, dtype=torch.long, device=device)
    for i, (emb, lab, pos, img) in enumerate(zip(embeds, labels, positions, image_ids, strict=True)):
        n = emb.shape[0]
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        out[i, span], out_labels[i, span], mask[i, span], out_positions[i, span] = emb, lab, 1, pos.to(device)
        out_images[i, span] = img.to(device)
    return MultimodalBatch(out, mask, out_positions, out_labels, out_images)


def build_multimodal_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
    image_features: list[ImageInput], embed: Callable[[torch.Tensor], torch.Tensor],
    padding_side: str = "right", max_length: int | None = None,
) -> MultimodalBatch:  # fmt: skip
    """The whole input step for a batch (LLaVA's ``prepare_inputs_labels_for_multimodal``).

    Args:
        input_ids: (B, L) with ``IMAGE_TOKEN_INDEX`` placeholders; attention_mask: (B, L) or None.
        labels: (B, L) or None (inference).
        image_features: one (n_i, C) tensor (packed positions) or :class:`ImageTokens` per placeholder across the
            batch, in reading order; samples may hold any number of images, including none.

    Returns:
        :class:`MultimodalBatch`; ``labels`` is None when none were given.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    given_labels = labels
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    counts = (input_ids == IMAGE_TOKEN_INDEX).logical_and(mask).sum(dim=1).tolist()
    if sum(counts) != len(image_features):
        raise ValueError(f"the batch has {sum(counts)} image placeholders but {len(image_features)} images were given")
    embeds, sample_labels, positions, image_ids, start = [], [], [], [], 0
    for i, count in enumerate(counts):
        ids, lab = input_ids[i][mask[i]], labels[i][mask[i]]
        images = image_features[start : start + count]
        emb, lab = splice_sample(ids, lab, images, embed)
        embeds.append(emb)
        sample_labels.append(lab)
        positions.append(sample_positions(ids, images).to(emb.device))
        image_ids.append(sample_image_ids(ids, images).to(emb.device))
        start += count
    batch = pad_samples(embeds, sample_labels, padding_side, max_length, positions, image_ids)
    if given_labels is None:
        batch.labels = None
    return batch

"""FLOPs of LLaVA's stages, counted exactly from the shapes.

Counted: 2 FLOPs per multiply-accumulate of every matrix product the forward runs (linear layers, the patch
convolution, attention scores Q K^T and values A V, VisionZip's [CLS] score row and key similarities), as
``torch.utils.flop_counter.FlopCounterMode`` counts them. Not counted: elementwise work (norms, activations,
softmax, residuals, bias adds, rotary embeddings), gathers, sorts and top-k, and SparseVLM's rank (an SVD)
and clustering distances (``cdist``), which FlopCounterMode does not count either.

The encoder's attention is bidirectional: every query against every key. The LLM's attention is causal: counted
``dense`` (every query against every key, as eager attention computes it and then masks half away; what
FlopCounterMode sees) or ``causal`` (only the pairs a query may attend to, as the SDPA and FlashAttention kernels
compute it, skipping the masked blocks). The benchmark counts causal pairs unless the LLM runs eager attention.

Notation. B batch. Vision: V views per image, p patch side, P = (image / p)^2 patches, N = P + 1 tokens, C width,
h heads, M MLP width, layers run L_v. Language: S new tokens, K cached tokens, D width, H heads, G key-value heads,
Dh head width, F MLP width, L layers, W vocabulary. VisionZip per view: d dominant, c contextual, R = N - d.

    encoder      = 2 B V P (3 p^2) C  +  L_v [ 2 B V N (4 C^2 + 2 C M)  +  4 B V N^2 C ]
                   (patch convolution; per layer: q, k, v, o and the MLP, then Q K^T and A V)
    ours' scores = 2 B V N C                       (the [CLS] query row against every key, all heads)
    merge        = 2 B V (R - c) c (C / h)         (cosine similarity of the head-mean keys to the c targets)
    projector    = 2 B T (C D + (depth - 1) D^2)   (mlp{depth}x_gelu on the T tokens per image that enter it)
    LM forward   = B [ L ( 2 S D (2 H Dh + 2 G Dh) + 4 A H Dh + 6 S D F ) + 2 D W ]
                   (q, o, k, v; Q K^T and A V over A (query, key) pairs; SwiGLU; the last position's logits)
                   A = S (K + S) dense, S K + S (S + 1) / 2 causal

Encoder-side selections (DivPrune, VisPruner, CDPruner) run vanilla's encoder, their own step (counted by
FlopCounterMode on it: similarities, the DPP's kernel, CDPruner's text tower; added to the encoder stage), the
projector on every patch (VisPruner: on the kept ones) and the language model on the kept tokens.

In-LLM methods (FastV, PDrop, SparseVLM) run vanilla's encoder and projector; decoder layer i runs on
S_i = T + n_i tokens (T text tokens, n_i the visual tokens it takes in, as the measured prefill reports them: the
layers up to the first cut at full length, then shorter); at each layer after which the method scores, the scoring
rows come from q/k: Q query rows (1: the last prompt token; SparseVLM: its raters) against the S_i keys;
SparseVLM also picks its raters once by the affinity of the n_0 image embeddings to the T_a text tokens after the
image. Each decode step attends, in layer i, to that layer's own cache (S_i + the tokens decoded so far):

    layer_i      = 2 S_i D (2 H Dh + 2 G Dh) + 4 A_i H Dh + 6 S_i D F
    scores_i     = 2 (Q D H Dh + S_i D G Dh + H Q S_i Dh)   (q_proj on Q rows, k_proj on all, Q K^T per head)
    raters       = 2 n_0 T_a D                               (SparseVLM only)

Vanilla runs the encoder up to LLaVA's select layer (``L_v = select + 1``, as our tower does); ours runs the same
layers plus its scores and the merge; the released path runs every layer (its attention maps cost no FLOPs, only
memory) plus the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llava.bench.shapes import LanguageShape, LlavaShape, visual_tokens
from visionzip.bench import EncoderShape
from visionzip.config import VisionZipConfig

PATH_NAMES = ("vanilla", "released", "ours", "hf")  # hf: transformers' class, VisionZip's encoder step as ours
HF_IMAGE_TOKEN_ROWS = 1  # transformers' class has a real <image> token: one more vocabulary row (llava.bench.hf)
IMAGE_CHANNELS = 3
MACS = 2  # FLOPs per multiply-accumulate


def encoder_flops(shape: EncoderShape, images: int, layers_run: int) -> int:
    """Patch convolution plus ``layers_run`` ViT layers, for ``images`` views."""
    patches = (shape.image_size // shape.patch_size) ** 2
    n, c = patches + 1, shape.hidden
    conv = MACS * images * patches * IMAGE_CHANNELS * shape.patch_size**2 * c
    linear = MACS * images * n * (4 * c * c + 2 * c * shape.intermediate)
    attention = 2 * MACS * images * n * n * c
    return conv + layers_run * (linear + attention)


def scores_flops(shape: EncoderShape, images: int) -> int:
    """Ours: the [CLS] query against every key, every head (:func:`visionzip.capture.cls_scores`)."""
    n = (shape.image_size // shape.patch_size) ** 2 + 1
    return MACS * images * n * shape.hidden


def merge_flops(shape: EncoderShape, images: int, cfg: VisionZipConfig) -> int:
    """Key similarity of the remaining non-targets to the contextual targets (:func:`visionzip.merge_contextual`)."""
    if cfg.contextual == 0:
        return 0
    remaining = (shape.image_size // shape.patch_size) ** 2 + 1 - cfg.dominant
    return MACS * images * (remaining - cfg.contextual) * cfg.contextual * (shape.hidden // shape.heads)


def projector_flops(tokens: int, mm_hidden: int, hidden: int, depth: int) -> int:
    """``mlp{depth}x_gelu`` (depth 1: ``linear``) on ``tokens`` tokens."""
    return MACS * tokens * (mm_hidden * hidden + (depth - 1) * hidden * hidden)


def layer_flops(shape: LanguageShape, new: int, cached: int, causal: bool = False) -> int:
    """One decoder layer on ``new`` tokens after ``cached`` ones, one sample.

    ``causal``: count only the (query, key) pairs that the causal mask keeps; otherwise all of them (dense).
    """
    d, dh = shape.hidden, shape.head_dim
    pairs = new * cached + (new * (new + 1) // 2 if causal else new * new)
    projections = MACS * new * d * (2 * shape.heads * dh + 2 * shape.kv_heads * dh)
    attention = 2 * MACS * pairs * shape.heads * dh
    mlp = 3 * MACS * new * d * shape.intermediate
    return projections + attention + mlp


def lm_flops(shape: LanguageShape, batch: int, new: int, cached: int, causal: bool = False) -> int:
    """One decoder forward of ``new`` tokens after ``cached`` ones, with the last position's logits only."""
    return batch * (shape.layers * layer_flops(shape, new, cached, causal) + MACS * shape.hidden * shape.vocab)


@dataclass(frozen=True)
class StageFlops:
    """FLOPs of one request (a batch) on one path: the stages of the first token, then ``decode_tokens`` steps."""

    encoder: int
    projector: int
    prefill: int
    decode: int
    decode_tokens: int

    @property
    def first_token(self) -> int:
        return self.encoder + self.projector + self.prefill

    @property
    def decode_per_token(self) -> float:
        """Mean over the decoding steps (the cache grows by one token each step)."""
        return self.decode / self.decode_tokens if self.decode_tokens else 0.0


def path_flops(
    shape: LlavaShape, path: str, cfg: VisionZipConfig | None, batch: int, text_tokens: int, decode_tokens: int,
    causal: bool = False,
) -> StageFlops:  # fmt: skip
    """FLOPs per stage of ``path`` ("vanilla", "released", "ours", "hf") with per-view budget ``cfg``.

    ``text_tokens``: text tokens per sample around the image; ``decode_tokens``: decoding steps after the first token;
    ``causal``: the LLM's attention counted by causal pairs (see the module docstring).
    """
    if path not in PATH_NAMES:
        raise ValueError(f"path must be one of {PATH_NAMES}, got {path!r}")
    if (cfg is None) != (path == "vanilla"):
        raise ValueError(f"the {path} path {'takes no' if path == 'vanilla' else 'needs a'} VisionZip config")
    v, images = shape.vision, batch * shape.views
    select = VisionZipConfig(layer=shape.select_layer).resolve_layer(v.layers)
    if cfg is None:
        encoder, into_projector = encoder_flops(v, images, select + 1), images * shape.patches
    else:
        layers = v.layers if path == "released" else select + 1
        encoder = encoder_flops(v, images, layers) + merge_flops(v, images, cfg)
        encoder += scores_flops(v, images) if path in ("ours", "hf") else 0
        into_projector = images * cfg.tokens
    seq = text_tokens + visual_tokens(shape, cfg)
    language = shape.language
    if path == "hf":
        language = replace(language, vocab=language.vocab + HF_IMAGE_TOKEN_ROWS)
    return StageFlops(
        encoder=encoder,
        projector=projector_flops(into_projector, v.hidden, shape.language.hidden, shape.projector_depth),
        prefill=lm_flops(language, batch, seq, 0, causal),
        decode=sum(lm_flops(language, batch, 1, seq + step, causal) for step in range(decode_tokens)),
        decode_tokens=decode_tokens,
    )


@dataclass(frozen=True)
class PrunedRun:
    """What an in-LLM method did in the measured prefill, as its FLOPs need it (one row; the rows are padded alike).

    Attributes:
        counts: visual tokens each decoder layer took in (``model.model.visual_counts``), layer 0 first.
        scored: 0-based layers after which the method scored (FastV, PDrop: its cuts; SparseVLM: its layers).
        queries: scoring query rows: 1 (the last prompt token) or SparseVLM's raters.
        rater_text: SparseVLM: the text tokens after the image its raters were chosen from (0 for the others).
    """

    counts: tuple[int, ...]
    scored: tuple[int, ...]
    queries: int
    rater_text: int = 0


def score_flops(shape: LanguageShape, queries: int, keys: int) -> int:
    """One scoring step, one sample: q_proj on ``queries`` rows, k_proj on ``keys`` rows, Q K^T in every head
    (:func:`visionzip.hf.pruned.cuts.attention_rows`)."""
    d, dh = shape.hidden, shape.head_dim
    return MACS * (queries * d * shape.heads * dh + keys * d * shape.kv_heads * dh + shape.heads * queries * keys * dh)


def pruned_lm_flops(
    shape: LanguageShape, run: PrunedRun, batch: int, text_tokens: int, decode_tokens: int, causal: bool = False
) -> tuple[int, int]:  # fmt: skip
    """(prefill, decode) FLOPs of the language model with an in-LLM method, layer by layer (module docstring)."""
    if len(run.counts) != shape.layers:
        raise ValueError(f"{len(run.counts)} per-layer counts for a language model of {shape.layers} layers")
    lengths = [text_tokens + count for count in run.counts]  # S_i
    logits = MACS * shape.hidden * shape.vocab
    prefill = sum(layer_flops(shape, length, 0, causal) for length in lengths) + logits
    prefill += sum(score_flops(shape, run.queries, lengths[layer]) for layer in run.scored)
    prefill += MACS * run.counts[0] * run.rater_text * shape.hidden
    steps = range(decode_tokens)  # each layer attends to its own cache, one token longer each step
    decode = sum(sum(layer_flops(shape, 1, length + step, causal) for length in lengths) + logits for step in steps)
    return batch * prefill, batch * decode


def pruned_path_flops(
    shape: LlavaShape, run: PrunedRun, batch: int, text_tokens: int, decode_tokens: int, causal: bool = False
) -> StageFlops:  # fmt: skip
    """FLOPs per stage of an in-LLM method: vanilla's encoder and projector, then :func:`pruned_lm_flops`."""
    vanilla = path_flops(shape, "vanilla", None, batch, text_tokens, 0, causal)
    prefill, decode = pruned_lm_flops(shape.language, run, batch, text_tokens, decode_tokens, causal)
    return StageFlops(vanilla.encoder, vanilla.projector, prefill, decode, decode_tokens)


def selection_path_flops(
    shape: LlavaShape, tokens: int, before_projector: bool, own: int, batch: int, text_tokens: int,
    decode_tokens: int, causal: bool = False,
) -> StageFlops:  # fmt: skip
    """FLOPs per stage of an encoder-side selection keeping ``tokens`` per view: vanilla's encoder plus ``own``, the
    selection's own FLOPs (:func:`llava.bench.selection.method_overhead`, CDPruner's text tower included); the
    projector on every patch, or on the kept ones where the selection chooses before it (``before_projector``:
    VisPruner, which also reads the [CLS] row's attention, :func:`scores_flops`); the language model on
    ``text_tokens`` + views x ``tokens``."""
    vanilla = path_flops(shape, "vanilla", None, batch, text_tokens, 0, causal)
    images = batch * shape.views
    into_projector = images * (tokens if before_projector else shape.patches)
    seq = text_tokens + shape.views * tokens
    scores = scores_flops(shape.vision, images) if before_projector else 0  # VisPruner reads the [CLS] row too
    return StageFlops(
        encoder=vanilla.encoder + scores + own,
        projector=projector_flops(into_projector, shape.vision.hidden, shape.language.hidden, shape.projector_depth),
        prefill=lm_flops(shape.language, batch, seq, 0, causal),
        decode=sum(lm_flops(shape.language, batch, 1, seq + step, causal) for step in range(decode_tokens)),
        decode_tokens=decode_tokens,
    )

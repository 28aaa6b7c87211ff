"""VisionZip's ``positions`` option: packed (the released code) or original (each kept token at its vanilla place).

References: vanilla LLaVA itself (every token kept), position ids restated by a loop over the prompt from the kept
encoder positions, vanilla's own NeXT layout (``spatial_layout``) on token ids, one prompt at a time against a batch,
and an argmax loop that reruns the whole sequence with explicit position ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers.batched import check_batched_equals_single
from helpers.bench import TEXT, TINY_15, TINY_NEXT
from PIL import Image

from eval.options import ModelOptions
from llava import cli_options
from llava.bench.measure import StageClock, make_cases, make_request, run_request
from llava.bench.shapes import build_model as build_bench
from llava.bench.shapes import visual_tokens
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.eval import run_llava
from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model.anyres import spatial_layout
from llava.model.builder import load_pretrained_model
from llava.serve import chat
from llava.train.arguments import parse_args
from llava.train.model_setup import build_model
from visionzip import VisionZipConfig, compress, contextual_targets, token_positions
from visionzip.anyres import Grid

PROMPT = "USER: Look at <image> and then at <image>. Which one is red? ASSISTANT:"
ORIGINAL = VisionZipConfig(6, 2, positions="original")


@pytest.fixture(scope="module")
def loaded(tiny_pair: dict[str, Path]) -> dict[str, tuple]:
    return {name: load_pretrained_model(str(path), device="cpu")[:3] for name, path in tiny_pair.items()}


def _inputs(tokenizer, processor, model, sizes=((64, 48), (40, 90))) -> tuple[torch.Tensor, list, list]:
    """(1, L) ids of PROMPT, its two images (processed), their sizes."""
    ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    colours = [(220, 20, 20), (20, 20, 220)]
    pictures = [Image.new("RGB", size, colour) for size, colour in zip(sizes, colours, strict=True)]
    return ids, [process_images([p], processor, model.config)[0] for p in pictures], [p.size for p in pictures]


def _prepared(model, ids, images, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L', C) spliced embeddings and (1, L') position ids."""
    prepared = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, sizes)
    return prepared[4], prepared[1]


def _reference_targets(keep: list[int], num_tokens: int, contextual: int) -> list[int]:
    """The contextual targets restated: the non-kept positions at a stride of max(1, R // contextual)."""
    rest = [p for p in range(num_tokens) if p not in keep]
    step = max(1, len(rest) // contextual) if contextual else 1
    return rest[::step][:contextual]


# --- the option ----------------------------------------------------------------------------------------------------
def test_option_is_validated_and_defaults_to_packed() -> None:
    assert VisionZipConfig().positions == "packed"
    with pytest.raises(ValueError, match="positions must be one of"):
        VisionZipConfig(positions="shifted")
    assert VisionZipConfig.from_dict(ORIGINAL.to_dict()) == ORIGINAL
    saved_before = {k: v for k, v in VisionZipConfig().to_dict().items() if k != "positions"}  # an older checkpoint
    assert VisionZipConfig.from_dict(saved_before).positions == "packed"


def test_option_round_trips_through_save_and_load(loaded: dict[str, tuple], tmp_path: Path) -> None:
    tokenizer, model, _ = loaded["v15"]
    model.set_visionzip(ORIGINAL)
    try:
        model.save_pretrained(tmp_path / "saved")
        tokenizer.save_pretrained(tmp_path / "saved")
    finally:
        model.set_visionzip(None)
    reloaded = load_pretrained_model(str(tmp_path / "saved"), device="cpu")[1]
    assert reloaded.config.visionzip_config() == ORIGINAL


# --- the method: where contextual tokens stand ---------------------------------------------------------------------
@pytest.mark.parametrize("contextual", [0, 3, 7])
def test_contextual_targets_match_a_loop(contextual: int) -> None:
    torch.manual_seed(0)
    n, dominant = 17, 5
    hidden, keys, scores = torch.randn(3, n, 8), torch.randn(3, n, 4), torch.rand(3, n)
    tokens, keep = compress(hidden, scores, keys, VisionZipConfig(dominant, contextual))
    targets = contextual_targets(keep, n, contextual)
    for b in range(3):
        assert targets[b].tolist() == _reference_targets(keep[b].tolist(), n, contextual)
    assert token_positions(keep, n, contextual).tolist() == torch.cat([keep, targets], 1).tolist()
    if contextual:
        # every remaining token a target (none assigned): each contextual token is exactly the token at its target
        everything = n - dominant
        tokens, keep = compress(hidden, scores, keys, VisionZipConfig(dominant, everything))
        where = token_positions(keep, n, everything)[:, dominant:]
        torch.testing.assert_close(tokens[:, dominant:], hidden.gather(1, where.unsqueeze(-1).expand(-1, -1, 8)))


# --- identity: every token kept ------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["original", "packed"])
def test_every_token_kept_gives_vanilla_logits(loaded: dict[str, tuple], positions: str) -> None:
    """With [CLS] in vanilla's features (cls_patch), VisionZip keeping all tokens is vanilla, positions included."""
    tokenizer, model, processor = loaded["v15"]
    tower = model.get_vision_tower()
    ids, images, sizes = _inputs(tokenizer, processor, model)
    tower.select_feature = "cls_patch"
    try:
        with torch.no_grad():
            vanilla = model(ids, images=images, image_sizes=sizes).logits
            model.set_visionzip(VisionZipConfig(tower.num_tokens, 0, positions=positions))
            kept = model(ids, images=images, image_sizes=sizes).logits
            if positions == "original":  # the ids themselves: a shift would not change logits of an unshifted prompt
                assert _prepared(model, ids, images, sizes)[1][0].tolist() == list(range(vanilla.shape[1]))
    finally:
        tower.select_feature = "patch"
        model.set_visionzip(None)
    assert kept.shape == vanilla.shape
    torch.testing.assert_close(kept, vanilla, rtol=0, atol=0)


# --- position ids of a compressed prompt ----------------------------------------------------------------------------
def _loop_positions(ids: list[int], keeps: list[list[int]], cfg: VisionZipConfig, num_tokens: int) -> list[int]:
    """Position ids restated by a loop: text +1 each; an image spans its N - 1 patches; kept token at start + e - 1."""
    out, position, image = [], 0, 0
    for token in ids:
        if token != IMAGE_TOKEN_INDEX:
            out.append(position)
            position += 1
            continue
        keep = keeps[image]
        stands_at = keep + _reference_targets(keep, num_tokens, cfg.contextual)
        out += [position + e - 1 for e in stands_at]  # [CLS] (e = 0): the slot before the first patch
        position += num_tokens - 1
        image += 1
    return out


def test_position_ids_of_a_compressed_prompt_match_a_loop(loaded: dict[str, tuple]) -> None:
    tokenizer, model, processor = loaded["v15"]
    tower = model.get_vision_tower()
    ids, images, sizes = _inputs(tokenizer, processor, model)
    with torch.no_grad():
        vanilla_embeds, vanilla_positions = _prepared(model, ids, images, sizes)
        model.set_visionzip(ORIGINAL)
        try:
            embeds, positions = _prepared(model, ids, images, sizes)
            packed = dataclasses.replace(ORIGINAL, positions="packed")
            model.set_visionzip(packed)
            packed_embeds, packed_positions = _prepared(model, ids, images, sizes)
        finally:
            model.set_visionzip(None)
        keeps = [tower.forward_visionzip(image[None], ORIGINAL)[1][0].tolist() for image in images]
    expected = _loop_positions(ids[0].tolist(), keeps, ORIGINAL, tower.num_tokens)
    assert positions[0].tolist() == expected
    assert packed_positions[0].tolist() == list(range(len(expected)))
    torch.testing.assert_close(embeds, packed_embeds, rtol=0, atol=0)  # the option moves nothing, only numbers
    # the text keeps the positions it has without compression: the next image and the answer start where they would
    is_text = ids[0] != IMAGE_TOKEN_INDEX
    text_vanilla = vanilla_positions[0][_text_columns(ids[0], [tower.num_patches_per_side**2] * 2)]
    text_ours = positions[0][_text_columns(ids[0], [ORIGINAL.tokens] * 2)]
    assert text_ours.tolist() == text_vanilla.tolist() and len(text_ours) == int(is_text.sum())
    assert vanilla_embeds.shape[1] == positions[0, -1] + 1


def _text_columns(ids: torch.Tensor, image_lengths: list[int]) -> torch.Tensor:
    """Columns of the text tokens in the spliced sequence, given each image's token count."""
    columns, column, image = [], 0, 0
    for token in ids.tolist():
        if token == IMAGE_TOKEN_INDEX:
            column += image_lengths[image]
            image += 1
        else:
            columns.append(column)
            column += 1
    return torch.tensor(columns)


# --- LLaVA-NeXT ------------------------------------------------------------------------------------------------------
def _vanilla_places(model, views: int, size: tuple[int, int]) -> tuple[dict[tuple[int, int], int], int, list]:
    """Where vanilla's spatial_unpad puts each (view, patch): from spatial_layout on the patches' ids."""
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    grid = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, tower.config.image_size)  # (nw, nh)
    ids = torch.arange(views * side * side, dtype=torch.float64).view(views, side * side, 1)
    rows_cols = Grid(rows=grid[1], cols=grid[0])
    layout = spatial_layout(ids, rows_cols, side, size, torch.tensor([-1.0]), unpad=True)[:, 0].long().tolist()
    places = {(i // (side * side), i % (side * side)): at for at, i in enumerate(layout) if i >= 0}
    return places, len(layout), grid


def _nearest_kept(places: dict, view: int, patch: int, side: int, grid: tuple[int, int]) -> int:
    """Vanilla place of a crop patch, or of the kept patch nearest in row and column when unpadding removed it."""
    nw = grid[0]
    cells = {}
    for (v, p), at in places.items():
        if v > 0:
            cells[((v - 1) // nw * side + p // side, (v - 1) % nw * side + p % side)] = at
    rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
    row = min(max((view - 1) // nw * side + patch // side, rows[0]), rows[-1])
    col = min(max((view - 1) % nw * side + patch % side, cols[0]), cols[-1])
    return cells[(row, col)]


@pytest.mark.parametrize("size", [(64, 128), (150, 60), (60, 150)], ids=["no-padding", "unpad-cols", "unpad-rows"])
def test_next_positions_are_the_vanilla_layout_places(loaded: dict[str, tuple], size: tuple[int, int]) -> None:
    """Each kept token of a multi-crop image at its place in vanilla's spatial_unpad layout (a patch unpadding
    removed: the nearest kept patch's place; a crop's [CLS]: the slot before its first patch; contextual: its
    target's); the image spans vanilla's token count."""
    _, model, processor = loaded["v16"]
    tower = model.get_vision_tower()
    side, n = tower.num_patches_per_side, tower.num_tokens
    cfg = VisionZipConfig(n * 2 // 3, n // 4, positions="original")  # most tokens: some in the removed padding
    noise = torch.Generator().manual_seed(0)
    picture = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=noise, dtype=torch.uint8).numpy())
    pixels = process_images([picture], processor, model.config)[0]
    with torch.no_grad():
        model.set_visionzip(cfg)
        try:
            image = model.image_tokens([pixels], [size])[0]
            per_view = model._visionzip_views([pixels], cfg)[0]
        finally:
            model.set_visionzip(None)
    places, span, grid = _vanilla_places(model, pixels.shape[0], size)
    if size != (64, 128):
        assert len(places) < pixels.shape[0] * side * side  # unpadding removed patches
    assert image.span == span
    views, keep = per_view[0], per_view[1]
    for token, position in zip(image.tokens, image.positions.tolist(), strict=True):
        pairs = [(v, j) for v in range(views.shape[0]) for j in range(views.shape[1])]
        matches = [(v, j) for v, j in pairs if torch.equal(views[v, j], token)]
        assert len(matches) == 1
        view, j = matches[0]
        stands_at = (keep[view].tolist() + _reference_targets(keep[view].tolist(), n, cfg.contextual))[j]
        patch = max(stands_at - 1, 0)
        place = places[(0, patch)] if view == 0 else _nearest_kept(places, view, patch, side, grid)
        assert position == (place - 1 if stands_at == 0 else place), (view, j)


# --- generation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "budget"), [("v15", "per_crop"), ("v16", "per_crop"), ("v16", "total")])
def test_batched_generate_with_original_positions_equals_one_by_one(
    loaded: dict[str, tuple], name: str, budget: str
) -> None:
    tokenizer, model, processor = loaded[name]
    model.set_visionzip(VisionZipConfig(14, 4, positions="original") if budget == "total" else ORIGINAL, budget)
    try:
        check_batched_equals_single(tokenizer, model, processor, "right")
    finally:
        model.set_visionzip(None)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_continues_at_the_vanilla_length(loaded: dict[str, tuple], use_cache: bool) -> None:
    """Greedy generate equals an argmax loop rerunning the whole sequence, new tokens at vanilla length + step."""
    tokenizer, model, processor = loaded["v15"]
    ids, images, sizes = _inputs(tokenizer, processor, model)
    steps = 4
    with torch.no_grad():
        vanilla_length = _prepared(model, ids, images, sizes)[0].shape[1]
        model.set_visionzip(ORIGINAL)
        try:
            out = model.generate(
                ids, images=images, image_sizes=sizes, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
            )  # fmt: skip
            embeds, positions = _prepared(model, ids, images, sizes)
            embed = model.get_input_embeddings()
            for step in range(steps):
                mask = torch.ones(positions.shape, dtype=torch.long)
                logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
                logits = logits.logits[0, -1]
                torch.testing.assert_close(out.logits[step][0], logits, rtol=0, atol=1e-5)
                token = int(logits.argmax())
                assert out.sequences[0, step] == token
                embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
                positions = torch.cat([positions, torch.tensor([[vanilla_length + step]])], dim=1)
        finally:
            model.set_visionzip(None)
    assert embeds.shape[1] < vanilla_length  # compressed: the positions skip ahead


def test_positions_that_skip_ahead_without_a_mask_are_one_sequence(loaded: dict[str, tuple]) -> None:
    """transformers reads a jump in position ids without a mask (and no cache) as a new packed sequence."""
    _, model, _ = loaded["v15"]
    torch.manual_seed(0)
    embeds = torch.randn(2, 10, model.config.hidden_size)
    positions = torch.arange(10).repeat(2, 1)
    positions[:, 5:] += 7
    with torch.no_grad():
        masked = model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(2, 10), use_cache=False)
        bare = model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    torch.testing.assert_close(bare.logits, masked.logits, rtol=0, atol=0)


def test_chat_session_numbers_turns_as_a_whole_forward(loaded: dict[str, tuple]) -> None:
    """The chat's cached turns run at the whole conversation's position ids: the second turn's first logits equal a
    forward of the whole rendered conversation (which numbers it from scratch)."""
    tokenizer, model, processor = loaded["v15"]
    image = Image.new("RGB", (50, 70), (200, 40, 40))
    model.set_visionzip(ORIGINAL)
    try:
        session = chat.ChatSession(model, tokenizer, processor, get_conv_template("vicuna_v1"), [image])
        seen: list[torch.Tensor] = []
        step = session._step
        session._step = lambda *args: seen.append(step(*args)) or seen[-1]  # record each step's logits
        session.ask("What is in the image?", temperature=0.0, max_new_tokens=3)
        first_turn = len(seen)
        session.ask("And what colour is it?", temperature=0.0, max_new_tokens=3)
        conv = get_conv_template("vicuna_v1")
        conv.messages = [list(m) for m in session.conv.messages[:-1]] + [[session.conv.roles[1], None]]
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixels, sizes = session.pixels, session.image_sizes
        with torch.no_grad():
            whole = model(ids, images=pixels, image_sizes=sizes).logits[0, -1]
    finally:
        model.set_visionzip(None)
    torch.testing.assert_close(seen[first_turn], whole, rtol=0, atol=1e-5)


# --- training, the command lines ---------------------------------------------------------------------------------
def test_training_flag_saves_the_option_and_right_padded_batches_equal_one_by_one(
    tiny_pair: dict[str, Path], loaded: dict[str, tuple], tmp_path: Path
) -> None:
    """VisionZip‡: ``--visionzip_positions original`` reaches the model's config (saved with it); the training input
    (right-padded, labels) numbers each sample as it numbers it alone."""
    flags = ["--visionzip_dominant", "6", "--visionzip_contextual", "2", "--visionzip_positions", "original"]
    model_args, data_args, args = parse_args(
        ["--model_name_or_path", str(tiny_pair["v15"]), "--data_path", "unused", "--output_dir", str(tmp_path),
         "--use_cpu", "True", *flags]
    )  # fmt: skip
    model = build_model(model_args, data_args, args)[0]
    assert model.config.visionzip_config() == dataclasses.replace(ORIGINAL, layer=model.get_vision_tower().select_layer)
    with pytest.raises(ValueError, match="positions"):
        dataclasses.replace(model_args, visionzip_positions="shifted").visionzip(-2)
    tokenizer, _, processor = loaded["v15"]
    ids, images, sizes = _inputs(tokenizer, processor, model)
    short = tokenizer_image_token(
        "USER: <image>\nColour? ASSISTANT:", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"
    )
    padded = tokenizer.pad({"input_ids": [ids[0].tolist(), short.tolist()]}, padding_side="right", return_tensors="pt")
    labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE_TOKEN_INDEX, -100)
    model.eval()
    with torch.no_grad():
        batch = model(**padded, labels=labels, images=[*images, images[1]], image_sizes=[*sizes, sizes[1]]).logits
        first = model(ids, images=images, image_sizes=sizes).logits[0]
        second = model(short[None], images=[images[1]], image_sizes=[sizes[1]]).logits[0]
    torch.testing.assert_close(batch[0, : first.shape[0]], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1, : second.shape[0]], second, rtol=0, atol=1e-5)
    assert second.shape[0] < first.shape[0]  # the second row is padded on the right


def test_command_line_and_model_args_take_the_option(loaded: dict[str, tuple]) -> None:
    opts = ModelOptions.from_kwargs(pretrained="p", budget=64, positions="original")
    assert opts.requested_visionzip(select_layer=-2).positions == "original"
    saved = VisionZipConfig(6, 2)
    assert ModelOptions(pretrained="p", positions="original").requested_visionzip(-2, saved) == ORIGINAL
    with pytest.raises(ValueError, match="positions must be one of"):
        ModelOptions.from_kwargs(pretrained="p", budget=64, positions="shifted")
    with pytest.raises(ValueError, match="change a VisionZip budget"):
        ModelOptions(pretrained="p", positions="original").requested_visionzip(-2)

    _, model, _ = loaded["v15"]
    parser = run_llava.build_parser()
    base = ["--model-path", "m", "--image-file", "x.jpg", "--query", "q"]
    args = parser.parse_args([*base, "--visionzip-dominant", "6", "--visionzip-contextual", "2",
                              "--visionzip-positions", "original"])  # fmt: skip
    assert cli_options.requested_visionzip(args, model) == dataclasses.replace(ORIGINAL, layer=-2)
    args = parser.parse_args([*base, "--visionzip_positions", "original"])
    with pytest.raises(ValueError, match="visionzip-positions"):
        cli_options.requested_visionzip(args, model)
    with pytest.raises(SystemExit):
        cli_options.check_visionzip_args(parser, parser.parse_args([*base, "--visionzip-positions", "original",
                                                                  "--no-visionzip"]))  # fmt: skip


@pytest.mark.parametrize("shape", [TINY_15, TINY_NEXT], ids=["v15", "next"])
def test_bench_runs_original_positions_from_the_vanilla_length(shape) -> None:
    """The benchmark's request with ``positions="original"``: the same token counts, the prefill's last position
    at the vanilla prompt's last, decoding one after another from there (both paths)."""
    bench = build_bench(shape, torch.device("cpu"), torch.float32, "sdpa")
    decode = 2
    request = make_request(shape, 1, TEXT, decode, torch.device("cpu"), torch.float32)
    seen: list[torch.Tensor] = []
    llm = bench.model.get_model()
    hook = llm.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            packed = [
                run_request(bench, c, request, StageClock(torch.device("cpu")))
                for c in make_cases(shape, [shape.budgets[-1]])
            ]
            seen.clear()
            cases = make_cases(shape, [shape.budgets[-1]], "original")
            original = [run_request(bench, c, request, StageClock(torch.device("cpu"))) for c in cases]
    finally:
        hook.remove()
    assert [run.seq_len for run in original] == [run.seq_len for run in packed]
    vanilla_last = TEXT + visual_tokens(shape, None) - 1
    for k, case in enumerate(cases[1:]):  # released and ours; vanilla (first) numbers its tokens itself
        assert case.visionzip.positions == "original"
        prefill, *steps = seen[(1 + k) * (1 + decode) : (2 + k) * (1 + decode)]
        assert int(prefill[0, -1]) == vanilla_last and prefill.shape[1] == packed[1 + k].seq_len
        assert [int(step) for step in steps] == [vanilla_last + 1 + i for i in range(decode)]


@pytest.mark.parametrize("layout", ["flat", "one-view-newline"])
def test_other_layouts_place_tokens_as_vanilla(loaded: dict[str, tuple], layout: str) -> None:
    """``flat`` multi-view: view v's patch p at v x P + p (P patches a view); one view under ``spatial_unpad``: the
    newline last, at P. Each token matched to its view and encoder position by value."""
    _, model, processor = loaded["v16"]
    tower = model.get_vision_tower()
    n = tower.num_tokens
    patches = tower.num_patches_per_side**2
    noise = torch.Generator().manual_seed(1)
    picture = Image.fromarray(torch.randint(0, 256, (128, 64, 3), generator=noise, dtype=torch.uint8).numpy())
    pixels = process_images([picture], processor, model.config)[0]
    if layout == "one-view-newline":
        pixels = pixels[:1]
    saved_merge = model.config.mm_patch_merge_type
    model.config.mm_patch_merge_type = "flat" if layout == "flat" else saved_merge
    try:
        with torch.no_grad():
            vanilla = model.image_tokens([pixels], [picture.size])[0]
            model.set_visionzip(ORIGINAL)
            image = model.image_tokens([pixels], [picture.size])[0]
            views, keep, _ = model._visionzip_views([pixels], ORIGINAL)[0]
    finally:
        model.config.mm_patch_merge_type = saved_merge
        model.set_visionzip(None)
    assert image.span == vanilla.tokens.shape[0] == pixels.shape[0] * patches + (layout != "flat")
    for token, position in zip(image.tokens, image.positions.tolist(), strict=True):
        pairs = [(v, j) for v in range(views.shape[0]) for j in range(views.shape[1])]
        matches = [(v, j) for v, j in pairs if torch.equal(views[v, j], token)]
        if not matches:  # the image_newline
            assert layout != "flat" and position == image.span - 1
            continue
        view, j = matches[0]
        stands_at = (keep[view].tolist() + _reference_targets(keep[view].tolist(), n, ORIGINAL.contextual))[j]
        assert position == view * patches + stands_at - 1


def test_static_cache_generate_with_original_positions_equals_one_by_one(loaded: dict[str, tuple]) -> None:
    tokenizer, model, processor = loaded["v16"]
    model.set_visionzip(ORIGINAL)
    try:
        check_batched_equals_single(tokenizer, model, processor, "left", cache_implementation="static")
    finally:
        model.set_visionzip(None)

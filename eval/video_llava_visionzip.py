"""The lmms-eval model ``video_llava_visionzip``: transformers' Video-LLaVA with VisionZip on images and video frames.

Usage (registered through the ``lmms_eval.models`` entry point, see ``eval.plugin``)::

    python -m lmms_eval --model video_llava_visionzip \
        --model_args pretrained=LanguageBind/Video-LLaVA-7B-hf,video_dominant=14,video_contextual=3 \
        --tasks activitynetqa --batch_size 4 --output_path playground/eval/table3

VisionZip model args are :class:`eval.options.ModelOptions`' (``budget`` or ``dominant``+``contextual`` for images,
``merge``, ``selection``, ``visionzip=off``...) plus :class:`eval.video_runner.VideoOptions`' (``num_frames``,
``video_dominant``, ``video_contextual``, ``video_split=per_frame|uniform|proportional``, ``video_total``).
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from tqdm import tqdm

from eval.options import ModelOptions
from eval.video_runner import VideoLlavaRunner, VideoOptions


def _as_list(visual: Any) -> list:
    """A task's ``doc_to_visual`` result -> a list (None and [] mean no visual)."""
    if visual is None:
        return []
    return list(visual) if isinstance(visual, (list, tuple)) else [visual]


class VideoLlavaVisionZip(lmms):
    """lmms-eval model: ``generate_until`` over video (and image) docs, batched; one process per GPU under
    ``accelerate launch`` (each loads the model on its own device)."""

    is_simple = True

    def __init__(
        self, pretrained: str, device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
        **model_args: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if max_batch_size is not None:
            raise ValueError("video_llava_visionzip takes a fixed --batch_size N, without --max_batch_size")
        video, rest = VideoOptions.split_kwargs(model_args)
        options = ModelOptions.from_kwargs(pretrained=pretrained, device=device, batch_size=batch_size, **rest)
        options.refuse_llm_method("video_llava_visionzip")  # no selections; in-LLM methods run (eval.plugin)
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = options.device if options.device and self._world_size == 1 else str(self.accelerator.device)
        self.options = options
        self.runner = VideoLlavaRunner.load(options, video, device)

    @property
    def batch_size(self) -> int:
        """Requests per forward pass (``--batch_size``)."""
        return self.options.batch_size

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in the requests' order; batches share generation kwargs and are sorted longest first."""
        collator = Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        answers: list[str] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="video_llava_visionzip generate") as bar:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_kwargs, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
                docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids, strict=True)]
                visuals = [_as_list(f(doc)) for f, doc in zip(to_visual, docs, strict=True)]
                answers.extend(self.runner.generate(list(contexts), visuals, dict(all_kwargs[0])))
                bar.update(len(chunk))
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list:
        """Not supported: Table 3's tasks are open-ended generation."""
        raise NotImplementedError("video_llava_visionzip answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: multi-round tasks feed answers back as new turns."""
        raise NotImplementedError("video_llava_visionzip answers single-turn generate_until tasks")

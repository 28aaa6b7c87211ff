"""The lmms-eval model ``llava_visionzip``: our LLaVA, VisionZip on or off, behind lmms-eval's ``lmms`` interface.

Usage (the plugin is found through the ``lmms_eval.models`` entry point, see ``eval.plugin``)::

    python -m lmms_eval --model llava_visionzip \
        --model_args pretrained=liuhaotian/llava-v1.5-7b,conv_template=vicuna_v1,dominant=54,contextual=10 \
        --tasks gqa --batch_size 8 --output_path playground/eval/run
    accelerate launch --num_processes 8 -m lmms_eval --model llava_visionzip ...   # one process per GPU

``budget=64`` is the paper's split (54+10); LLaVA-NeXT takes ``visionzip_budget=per_crop|total``. Without a budget
a checkpoint runs with the one it saves (VisionZip‡), or without VisionZip; ``visionzip=off`` turns it off.
``method=fastv|pdrop|sparsevlm`` (with ``budget``, a layer-average, and ``<method>_<option>=``) prunes inside the
language model instead; each run then logs and reports the visual tokens it achieved (:mod:`eval.visual_tokens`).
``method=divprune|vispruner|cdpruner`` (``budget``: tokens per image, per view on AnyRes) selects patches before it;
CDPruner reads each request's question without the benchmark's answer-format suffix (:mod:`eval.instructions`).
Docs with earlier turns (``history``, the two-turn tasks of :mod:`eval.multiturn`) are answered as one chat each in
the run's ``multiturn`` mode. Every option: :class:`eval.options.ModelOptions`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from loguru import logger as lmms_eval_logger  # lmms-eval's own log (its CLI shows INFO; Python logging's is unset)
from tqdm import tqdm

from eval.multiturn import answer_requests, history_of
from eval.options import ModelOptions
from eval.plugin import MODEL_NAME, SELECTION_MODELS
from eval.runner import LlavaRunner, Visuals
from eval.visual_tokens import REPORT_ENV, VisualTokenTally, write_report

logger = logging.getLogger(__name__)


def _as_list(visual: Any) -> list:
    """A task's ``doc_to_visual`` result -> a list of images (None and [] mean no image)."""
    if visual is None:
        return []
    return list(visual) if isinstance(visual, (list, tuple)) else [visual]


class LlavaVisionZip(lmms):
    """lmms-eval model: ``generate_until`` (batched, greedy by default) and ``loglikelihood`` (multiple choice).

    Data parallel under ``accelerate launch``: each process loads the model on its own GPU and lmms-eval hands it
    its share of the requests (``rank``, ``world_size``).
    """

    is_simple = True
    model_name = "llava_visionzip"  # its lmms-eval name (subclasses for other model classes set their own)

    def __init__(
        self, pretrained: str, device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
        **model_args: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if max_batch_size is not None:  # lmms-eval passes --max_batch_size on, for its batch size search
            raise ValueError(
                f"--max_batch_size {max_batch_size} bounds lmms-eval's batch_size=auto search, which "
                f"{self.model_name} does not support: expected a fixed --batch_size N and no --max_batch_size"
            )
        options = ModelOptions.from_kwargs(pretrained=pretrained, device=device, batch_size=batch_size, **model_args)
        if self.model_name != MODEL_NAME:
            options.refuse_llm_method(self.model_name, selections=self.model_name in SELECTION_MODELS)
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        # cuda:<local rank> under accelerate launch, else cuda or cpu; an explicit device only for one process
        device = options.device if options.device and self._world_size == 1 else str(self.accelerator.device)
        self.options = options
        self.runner = self.load_runner(options, device)

    def load_runner(self, options: ModelOptions, device: str) -> Any:
        """The object answering the requests: ``generate(contexts, visuals, task_kwargs) -> answers`` and
        ``loglikelihood(contexts, continuations, visuals) -> ContinuationScore``s (here our LLaVA's runner)."""
        return LlavaRunner.load(options, device)

    def visual_tokens(self) -> VisualTokenTally | None:
        """The run's achieved visual tokens so far, over every process (None without an in-LLM method). Under
        ``accelerate launch`` every process must call it (it gathers)."""
        tally = getattr(self.runner, "tally", None)
        if tally is None or self.world_size == 1:
            return tally
        merged, *others = [VisualTokenTally(**part) for part in gather_object([tally.to_json()])]
        for other in others:
            merged.merge(other)
        return merged

    def _report_visual_tokens(self) -> None:
        """Log the achieved visual tokens (rank 0) and, where ``eval.grid`` asks (``$LLAVA_VISIONZIP_VISUAL_TOKENS``),
        write them for the results file."""
        tally = self.visual_tokens()
        if tally is None or self.rank != 0:
            return
        lmms_eval_logger.info(f"{self.model_name} visual tokens: {tally.describe()}")
        if os.environ.get(REPORT_ENV):
            write_report(os.environ[REPORT_ENV], tally)

    @property
    def batch_size(self) -> int:
        """Requests per forward pass (``--batch_size``)."""
        return self.options.batch_size

    def _unpack(self, chunk: list[tuple]) -> tuple[list[str], list[Any], list[dict], list[Visuals]]:
        """Request args ``(context, kwargs or continuation, doc_to_visual, doc_id, task, split)`` of a batch ->
        (contexts, second arguments, docs, images)."""
        contexts, seconds, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
        docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids, strict=True)]
        visuals = [_as_list(f(doc)) for f, doc in zip(to_visual, docs, strict=True)]
        return list(contexts), list(seconds), docs, visuals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in the requests' order; batches share generation kwargs and are sorted longest first."""
        collator = Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        answers: list[str] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_name} generate") as bar:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_kwargs, docs, visuals = self._unpack(chunk)
                answers.extend(self._answers(contexts, visuals, docs, dict(all_kwargs[0])))
                bar.update(len(chunk))
        self._report_visual_tokens()
        return collator.get_original(answers)

    def _answers(self, contexts: list[str], visuals: list[Visuals], docs: list[dict], task_kwargs: dict) -> list[str]:
        """One batch's answers: docs with earlier turns (``history``, :mod:`eval.multiturn`) as one chat each in the
        run's ``multiturn`` mode, the others batched."""
        histories = [history_of(doc) for doc in docs]
        if not any(histories):
            return self.runner.generate(contexts, visuals, task_kwargs)
        if not isinstance(self.runner, LlavaRunner):
            raise ValueError(f"{self.model_name} answers single-turn docs; multi-turn tasks run on llava_visionzip")
        return answer_requests(self.runner, contexts, visuals, histories, task_kwargs, self.options.multiturn)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(loss, is greedy) per request, in the requests' order, as lmms-eval's own ``llava`` model returns them.

        The loss is the mean negative log-likelihood of the continuation as the assistant's reply, over its tokens
        and the template's end of turn (:meth:`eval.runner.LlavaRunner.loglikelihood`). lmms-eval 0.7.x ranks
        multiple choices by the argmin of these numbers. The greedy flag is ours: lmms-eval's ``llava`` compares
        each token with the argmax one position too late (inside the image tokens when there is an image). Its
        evaluator passes every response through ``unwrap_generation_output``, which turns a bare ``(float, bool)``
        into its string; only ``GenerationResult.text`` passes through untouched, so each pair is wrapped in one.
        """
        collator = Collator([r.args for r in requests], lambda a: (-len(a[0]) - len(str(a[1])), a[0]))
        results: list[GenerationResult] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_name} loglikelihood") as bar:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, targets, docs, visuals = self._unpack(chunk)
                if any(history_of(doc) for doc in docs):
                    raise ValueError(f"{self.model_name} scores multi-turn tasks by generated answers, not choices")
                continuations = [k if isinstance(k, str) else k(doc) for k, doc in zip(targets, docs, strict=True)]
                scores = self.runner.loglikelihood(contexts, continuations, visuals)
                pairs = [(score.loss, score.greedy) for score in scores]
                results.extend(GenerationResult(text=pair) for pair in pairs)  # type: ignore[arg-type]
                bar.update(len(chunk))
        self._report_visual_tokens()
        return collator.get_original(results)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: multi-round tasks feed the model's own answers back as new turns (the two-turn tasks of
        :mod:`eval.multiturn` answer earlier turns by their ground truth and run through ``generate_until``)."""
        raise NotImplementedError(f"{self.model_name} answers single-turn tasks (generate_until, loglikelihood)")

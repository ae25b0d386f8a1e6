"""lm-evaluation-harness backend `streamprune`: the harness's tasks, scored with each layer read once.

The harness gathers every request of one kind before it calls the model (evaluator.py), so all the
contexts are known up front: each call tokenizes all its requests exactly as the harness's `hf`
backend does (HFLM.tok_encode's BOS rule, _encode_pair, left truncation to max_length, the rolling
windows of loglikelihood_rolling), then pushes all of them through layer 0, then layer 1, ... with
evaluate.py's streamed buffer (its RAM check, --offload-dir, progress bar). Importing this module
registers the backend, so `lm_eval.simple_evaluate(model="streamprune", model_args="pretrained=DIR")`
works after `import streamprune.harness`; it needs the `eval` extra (pip install "streamprune[eval]").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import resolve_max_length
from tqdm import tqdm

from .config import check_choice, check_dtype, check_positive, parse_device
from .errors import BadInputError, ResourceError, UsageError
from .evaluate import Sequence, stream_logprobs
from .stream import _HEAD_CHUNK_BYTES, Head, open_source
from .tasks import hf_encode, prefix_token

DEFAULT_MAX_LENGTH = 2048  # HFLM._DEFAULT_MAX_LENGTH: when neither the config nor the tokenizer says


@dataclass
class StreamSettings:
    """What evaluate.stream_hidden reads besides the source (EvalConfig's fields of the same names)."""

    batch_tokens: int = 8192
    offload_dir: str | None = None
    overlap: bool = True
    quiet: bool = False


@register_model("streamprune")
class StreamedLM(TemplateLM):
    """model_args: pretrained (directory, hub id or alias), and as hf: max_length, add_bos_token,
    prefix_token_id; streamprune's own: device, dtype, batch_tokens, offload_dir, expert_weights,
    overlap, quiet. The harness's batch_size and max_batch_size are accepted and unused: micro-batches
    are sized in tokens (batch_tokens)."""

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        batch_tokens: int = 8192,
        offload_dir: str | None = None,
        expert_weights: str = "gpu",
        overlap: bool = True,
        quiet: bool = False,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
    ):
        from transformers import AutoTokenizer

        super().__init__()
        self.settings = StreamSettings(batch_tokens, None if offload_dir is None else str(offload_dir), overlap, quiet)
        check_positive(self.settings, "batch_tokens")
        check_choice("expert_weights", expert_weights, ("gpu", "cpu"))
        check_dtype(dtype)
        self.source = open_source(str(pretrained), parse_device(device), dtype)
        if expert_weights == "cpu":
            self.source.runner.expert_device = torch.device("cpu")
        kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}  # as HFLM._create_tokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source.directory, **kwargs)
        except Exception as err:
            raise BadInputError(f"cannot load the tokenizer from {self.source.directory}: {err}") from err
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = max_length

    # -- what the harness asks of a TemplateLM, with HFLM's answers -----------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tokenizer, self.custom_prefix_token_id)

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.source.runner.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """HFLM.tok_encode: the flag given, else add_bos_token, else the tokenizer's own default;
        never a second BOS on a string that already starts with it (tasks.hf_encode, which the
        built-in tasks use too)."""
        bos, prefix = self.add_bos_token, self.custom_prefix_token_id
        encoding = hf_encode(self.tokenizer, string, add_special_tokens, bos, prefix)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    # -- scoring ----------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.settings.quiet)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each (key, context tokens, continuation tokens), all of
        them streamed together."""
        sequences = [self._sequence(context, continuation) for _, context, continuation in requests]
        answers = streamed_answers(self.source, sequences, self.settings)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:  # rolling windows have none: loglikelihood_rolling caches their sum
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def _sequence(self, context: list[int], continuation: list[int]) -> Sequence:
        """HFLM._loglikelihood_tokens' input: context + continuation, left-truncated to max_length + 1."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise BadInputError(
                f"a request of {len(context)} context and {len(continuation)} continuation tokens cannot be scored: "
                f"both must be non-empty and the continuation at most max_length ({self.max_length}) tokens"
            )
        tokens = (context + continuation)[-(self.max_length + 1) :]
        return Sequence(tokens, len(tokens) - len(continuation))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's windows (disjoint, max_length tokens, the prefix token before the first), all the
        requests' windows streamed together; each request's sum."""
        windows, counts = [], []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.settings.quiet, desc="windows"):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )  # fmt: skip
            mine = [(None, *lm_utils.make_disjoint_window(pair)) for pair in pairs]
            windows += mine
            counts.append(len(mine))
        answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, first = [], 0
        for request, count in zip(requests, counts):
            totals.append(sum(ll for ll, _ in answers[first : first + count]))
            first += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        names = sorted({r.task_name for r in requests if getattr(r, "task_name", None)}) or ["(unnamed)"]
        raise UsageError(
            f"task(s) {', '.join(names)} generate text (generate_until), which the streamprune backend does not do: "
            "a layer-streamed model reads every weight once per generated token, so a 70B model would be read from "
            "disk hundreds of times per answer. It scores loglikelihood (multiple-choice) and loglikelihood_rolling "
            "(perplexity) tasks; run generation tasks with the harness's own backend on a machine that holds the "
            "model: lm_eval --model hf --model_args pretrained=DIR --tasks ..."
        )


@torch.no_grad()
def streamed_answers(source, sequences: list[Sequence], settings: StreamSettings) -> list[tuple[float, bool]]:
    """(sum of the scored tokens' log-probabilities, whether each is the argmax) per sequence."""
    return stream_logprobs(source, sequences, settings, score=scored) if sequences else []


def scored(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> tuple[float, bool]:
    """stream.token_logprobs' sum, and HFLM's is_greedy: every target is its position's argmax. A
    chunk of tokens at a time, so that float32 logits [chunk, vocab] stay small."""
    chunk = max(1, _HEAD_CHUNK_BYTES // (head.weight.shape[0] * 4))
    total, greedy = 0.0, True
    for first in range(0, len(targets), chunk):
        logits = head(hidden[first : first + chunk].to(head.weight.device)).float()  # [chunk, vocab]
        picked = targets[first : first + chunk].to(head.weight.device)
        logprobs = logits.log_softmax(-1).gather(1, picked.unsqueeze(1)).squeeze(1)
        total += float(logprobs.double().sum())
        greedy = greedy and bool((logits.argmax(-1) == picked).all())
    return total, greedy


def run_tasks(lm: StreamedLM, tasks: list[str], include_path: str | None, num_fewshot: int | None,
              limit: int | None) -> dict:  # fmt: skip
    """The harness's simple_evaluate of `tasks` on `lm`; the JSON-ready part of its results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(
                f"lm-evaluation-harness knows no task {task!r}{hint}; `lm_eval ls tasks` lists them, and "
                "--include-path DIR adds the task YAMLs in DIR"
            )
    try:
        output = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                 log_samples=False)  # fmt: skip
    except ConnectionError as err:  # datasets' own, when the hub cannot be reached or HF_DATASETS_OFFLINE=1
        raise ResourceError(
            f"lm-evaluation-harness could not fetch the data of {', '.join(tasks)} ({err}): its tasks read their "
            "datasets from the Hugging Face hub. Offline, warm its cache first where the hub is reachable "
            "(streamprune fetch-data DIR --tasks NAMES), or give --data-dir DIR for the built-in tasks (a data folder, "
            "docs/data.md), or --include-path DIR with task YAMLs over local files"
        ) from err
    keys = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "higher_is_better")
    return {key: output[key] for key in keys if key in output}


def results_table(results: dict) -> str:
    """The harness's own table of run_tasks' results (its metrics, with stderr), groups after."""
    tables = [lm_utils.make_table(results)]
    if results.get("groups"):
        tables.append(lm_utils.make_table(results, "groups"))
    return "\n".join(tables)

"""Self-distillation data for a chat model (`mtpd distill-data`): conversations the model writes itself.

Heads draft well in the contexts they were trained in, and an instruct model is used (and benchmarked, on
MT-Bench) through its chat template, on its own answers. Text the machine has (code, prose) is neither, so
this module makes the data from the model: Magpie-style (Xu et al. 2024, arXiv 2406.08464), the model is
given only its template's prefix up to the user's message (for SmolLM2, the default system turn then
`<|im_start|>user\\n`) and samples what a user would ask; then it answers each question through the same
template, exactly as `mtpd bench` prompts it. Nothing is downloaded, and no benchmark question is read.
A 135M model asks itself mostly one kind of question ("Can you provide ..."); by default each question
starts with the next of a list of first words (TASK_OPENINGS: kinds of request, written from the task types
of chat use, not from any benchmark's questions), and the model writes the rest: at equal data and training
tokens that raised SmolLM2's tau on MT-Bench from 1.43 to 1.49 (README); `--question-openings none` lets the
model write whole questions.

Each line of the output is `{"text": the whole conversation rendered by the chat template, ...}`, which
`mtpd train --data FILE.jsonl` reads (data.py): the heads then learn the exact token contexts they draft
in. Answers are greedy by default: a greedy benchmark verifies the main model's argmax continuation, so
those are the contexts to learn (the KL term teaches the main head's whole distribution at every position
anyway; the temperature only decides which positions are visited).

Generation is batched with mtpd's own KV-cached decoder, in bf16 where the device computes it natively, and
continuously (decode/continuous.py): a row whose question or answer ends takes the next request at once,
so short answers and dropped questions leave no row idle.
Lines are written one at a time and flushed, so an interrupted run keeps what it wrote and `--resume`
continues the file (sampling then starts from another seed, derived from the lines already there). Every
line records what made it (`made_with`: the model's digest and the flags that shape a conversation), and
`--resume` refuses a file made otherwise, so a file never mixes two kinds of conversation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mtpd.decode import make_rule
from mtpd.decode.continuous import Request, stream_generate
from mtpd.errors import MtpdError, require
from mtpd.prompts import PromptFormatter, PromptStyle, assistant_turn, user_turn

if TYPE_CHECKING:
    from mtpd.train import TrainConfig

# Stands in for the user's message while the template is rendered; what precedes it is the Magpie prefix.
_MESSAGE_PLACEHOLDER = "\x00MTPD-USER-MESSAGE\x00"
# A sampled question shorter than this (characters) is a fragment, not an instruction.
MIN_QUESTION_CHARS = 12
# Question batches in a row that may yield no usable question before the run gives up (instead of looping).
MAX_BARREN_BATCHES = 8
# `--question-openings tasks` (the default): first words of the questions, taken in turn (the model writes the rest).
TASK_OPENINGS = (
    "Write a short story", "Write a poem", "Write an email", "Write a blog post", "Rewrite the following",
    "Explain", "Explain why", "What is the difference between", "Describe", "Compare",
    "How do I", "Give me advice on", "Suggest", "Create a plan for", "List",
    "Solve", "Calculate", "If", "Prove that", "What is the probability",
    "Write a Python function", "Write a program", "Fix the bug in", "What does this code do",
    "Summarize", "Extract", "Classify", "Translate", "Answer in one sentence:",
    "Imagine you are", "Pretend to be", "You are a", "Act as",
)


@dataclass(frozen=True)
class DistillConfig:
    samples: int | None = None  # conversations the file holds when done (a total: --resume continues to it)
    time_budget: float | None = None  # seconds of generation in this run
    max_new_tokens: int = 256  # tokens of an answer at most (MT-Bench runs generate 256)
    question_tokens: int = 96  # tokens of a sampled question at most; longer ones are dropped as rambling
    batch_size: int = 16
    temperature: float = 0.0  # answers: 0 = greedy, the contexts a greedy benchmark drafts in
    question_temperature: float = 1.0  # Magpie samples the user's message at temperature 1
    question_top_p: float = 0.95  # ... here without the unlikeliest tail: a 135M model's tail is noise
    openings: tuple[str, ...] = TASK_OPENINGS  # first words of the questions, in turn (empty: the model writes all)
    seed: int = 0

    def validate(self) -> "DistillConfig":
        require([
            (self.samples is not None or self.time_budget is not None,
             "no budget: pass --samples N (conversations in the file) or --time-budget SECONDS"),
            (self.samples is None or self.samples >= 1, f"--samples must be >= 1 (got {self.samples})"),
            (self.time_budget is None or self.time_budget > 0,
             f"--time-budget must be > 0 seconds (got {self.time_budget})"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.question_tokens >= 1, f"--question-tokens must be >= 1 (got {self.question_tokens})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.question_temperature > 0,
             f"--question-temperature must be > 0: questions are sampled (got {self.question_temperature})"),
            (0 < self.question_top_p <= 1, f"--question-top-p must be in (0, 1] (got {self.question_top_p})"),
            (all(opening.strip() for opening in self.openings), "a question opening is blank: remove blank openings"),
        ])
        make_rule(self.temperature)  # the answers' rule: refuses a negative temperature in one line
        return self

    def made_with(self, model: dict) -> dict:
        """What shapes a conversation, recorded on each line (`model`: model.source.backbone_reference's):
        the model (by digest; its path is only named) and the flags, but not the budget, batch or seed."""
        from mtpd.model.source import json_digest

        return {"model": model["path"], "model_sha256": json_digest([model["config_sha256"], model["weights_sha256"]]),
                **{field: getattr(self, field) for field in _SHAPING_FLAGS},
                "openings_sha256": json_digest(list(self.openings))}


# The DistillConfig fields a --resume must keep (the flag of each is the field's name in kebab case).
_SHAPING_FLAGS = ("max_new_tokens", "question_tokens", "temperature", "question_temperature", "question_top_p")


def check_made_alike(path: Path, recorded: dict | None, line: int, wanted: dict) -> None:
    """Refuse to --resume a file whose conversations were made otherwise (one line naming the difference)."""
    fix = "--resume adds conversations made the same way; choose another --out for these"
    if recorded is None:
        raise MtpdError(f"{path} line {line} does not record how it was made (an older mtpd wrote it): {fix}")
    if recorded.get("model_sha256") != wanted["model_sha256"]:
        raise MtpdError(f"{path} was made by another model ({recorded.get('model')}): pass that --hf to resume "
                        f"it; {fix}")
    for field in _SHAPING_FLAGS:
        if recorded.get(field) != wanted[field]:
            flag = "--" + field.replace("_", "-")
            raise MtpdError(f"{path} was made with {flag} {recorded.get(field)}, not {wanted[field]}: pass "
                            f"{flag} {recorded.get(field)} to resume it; {fix}")
    if recorded.get("openings_sha256") != wanted["openings_sha256"]:
        raise MtpdError(f"{path} was made with other --question-openings: pass the ones it was made with to "
                        f"resume it; {fix}")


# ------------------------------------------------------------------------------------------- conversations


class ChatRenderer:
    """A model's chat template, rendered to text by transformers' `apply_chat_template` (the text is what the
    output file holds) and encoded with the tokenizer mtpd trains with (the prompt ids decoding starts from,
    the same ids `mtpd bench` prompts the model with)."""

    def __init__(self, hf_tokenizer, formatter: PromptFormatter):
        if not formatter.has_template:
            raise MtpdError("the model's tokenizer has no chat template, so there is no user turn to sample "
                            "questions in: distill-data is for chat models; train heads on a base model with "
                            "`mtpd train --hf MODEL --data TEXT` on text like the one it will continue")
        self.hf_tokenizer, self.formatter = hf_tokenizer, formatter

    def render(self, conversation: list[dict], generation_prompt: bool = False) -> str:
        return self.hf_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        # The rendered text spells its special tokens out (<|im_start|>, a BOS); the tokenizer matches them,
        # and adds nothing of its own, as apply_chat_template(tokenize=True) and data.py do.
        return self.formatter.tokenizer.encode(text, add_special_tokens=False).ids

    def user_prefix(self) -> str:
        """The template's text before the first user message (a default system turn included): the context in
        which the model writes a question."""
        text = self.render([user_turn(_MESSAGE_PLACEHOLDER)])
        return text[:text.index(_MESSAGE_PLACEHOLDER)]

    def answer_prompt(self, question: str) -> list[int]:
        return self.encode(self.render([user_turn(question)], generation_prompt=True))

    def conversation(self, question: str, answer: str, finished: bool) -> str:
        """The conversation as the template writes it; an answer cut at --max-new-tokens stays open (no end of
        turn: the model did not end it)."""
        if finished:
            return self.render([user_turn(question), assistant_turn(answer)])
        return self.render([user_turn(question)], generation_prompt=True) + answer


def load_chat_model(hf: str, device: torch.device, dtype: torch.dtype):
    """(backbone, renderer) for `--hf SPEC`; refuses a model without a chat template before loading weights."""
    from mtpd.model.backbone import load_backbone
    from mtpd.model.packed import pack_for_decoding
    from mtpd.model.source import load_hf_tokenizer, load_tokenizer, resolve_source

    source = resolve_source(hf)
    hf_tokenizer = load_hf_tokenizer(source)
    renderer = ChatRenderer(hf_tokenizer, PromptFormatter(PromptStyle.from_hf_tokenizer(hf_tokenizer),
                                                          load_tokenizer(source)))
    backbone = load_backbone(source, device, dtype)
    pack_for_decoding(backbone)  # bf16 on a CPU: the same tokens, faster (model/packed.py)
    return backbone, renderer


# ------------------------------------------------------------------------------------------- the output file


def is_fragment(question: str, written: str) -> bool:
    """Whether a sampled question is no instruction: shorter than MIN_QUESTION_CHARS, or (after an opening)
    the model wrote no word of its own (`written`: its part, e.g. "." after "Write a poem")."""
    return len(question) < MIN_QUESTION_CHARS or not any(ch.isalnum() for ch in written)


def _normalized(question: str) -> str:
    return " ".join(question.lower().split())


def read_existing(path: Path, made_with: dict) -> tuple[int, set[str]]:
    """For --resume: how many conversations `path` holds and their questions (normalized, to skip repeats).
    A last line cut short by an interruption (no newline, not JSON) is removed; any other bad line is an
    error, since the file is then not one this command wrote, and so is a line made otherwise than
    `made_with` (DistillConfig.made_with) says."""
    if not path.exists():
        return 0, set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:  # no newline at the end: the write of the last line was cut
        if _is_json(lines[-1]) is None:  # ... within it: drop it
            path.write_bytes(data[:len(data) - len(lines[-1])])
            lines = lines[:-1]
        else:  # ... before its newline: end it, so the next line does not run on
            path.write_bytes(data + b"\n")
    questions, count = set(), 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _is_json(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise MtpdError(f"{path} line {number} is not a conversation this command wrote (a JSON object with "
                            f"\"text\"): --resume appends to a distill-data file; choose another --out")
        if record.get("made_with") != made_with:
            check_made_alike(path, record.get("made_with"), number, made_with)
        count += 1
        if isinstance(record.get("question"), str):
            questions.add(_normalized(record["question"]))
    return count, questions


def _is_json(line: bytes):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _check_output(path: Path, resume: bool) -> None:
    """Refuse an --out this command would not write, before the model loads."""
    if path.suffix.lower() != ".jsonl":
        raise MtpdError(f"--out {path} must end in .jsonl (mtpd train --data reads JSONL by its suffix): "
                        f"choose a FILE.jsonl")
    if path.exists() and not resume:
        raise MtpdError(f"{path} exists: pass --resume to add to it, or choose another --out")


def _open_output(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise MtpdError(f"cannot write {path} ({exc.strerror}): choose another --out") from None


# ------------------------------------------------------------------------------------------- generation


def _seed_for(seed: int, lines_before: int) -> int:
    """A resumed run samples from a seed of its own (else it would sample the questions already written)."""
    return int.from_bytes(hashlib.sha256(f"distill seed={seed} lines={lines_before}".encode()).digest()[:8], "big")


class _Conversations:
    """The requests of a distill-data run and what becomes of them: a question sampled from the template's
    user prefix, then, if it is usable, its answer. Handed to `stream_generate` (continuous batching), so
    each row takes the next request as soon as its last one ends; questions wait for nothing."""

    def __init__(self, backbone, renderer: ChatRenderer, cfg: DistillConfig, made_with: dict, seen: set[str],
                 wanted: int | None):
        self.renderer, self.cfg, self.made_with, self.seen, self.wanted = renderer, cfg, made_with, seen, wanted
        self.stop_ids = renderer.formatter.stop_ids
        self.prefix = renderer.encode(renderer.user_prefix())
        self.openings = [renderer.encode(opening) for opening in cfg.openings] or [[]]
        self.question_rule = make_rule(cfg.question_temperature, None, cfg.question_top_p)
        self.answer_rule = make_rule(cfg.temperature)
        self.context = backbone.max_seq_len
        self.asking = 0  # questions being sampled
        self.to_answer: list[tuple[str, int]] = []  # (kept question, its conversation): answer not begun
        self.answering = 0
        self.written = 0
        self.tokens = 0  # generated so far, questions and answers, each up to its stop token
        self.rejected = 0  # sampled questions dropped: unfinished, too short, asked before, or too long
        self.barren = 0  # questions dropped in a row
        self.started: dict[int, float] = {}  # conversation -> when its question was asked
        self.kept = 0  # questions kept in this run
        self.longest = None  # seconds the longest conversation so far took, question to answer
        self.deadline = None if cfg.time_budget is None else time.perf_counter() + cfg.time_budget
        self.number = 0  # conversations begun

    def next_request(self) -> Request | None:
        if self.to_answer:
            question, number = self.to_answer.pop(0)
            self.answering += 1
            return Request(self.renderer.answer_prompt(question), self.cfg.max_new_tokens, self.answer_rule,
                           ("answer", question, number))
        if not self._may_ask():
            return None
        self.asking += 1
        self.number += 1
        self.started[self.number] = time.perf_counter()
        opening = self.openings[self.number % len(self.openings)]
        return Request(self.prefix + opening, self.cfg.question_tokens, self.question_rule,
                       ("question", opening, self.number))

    def _may_ask(self) -> bool:
        """Another conversation fits the target (--samples), and is expected to end within --time-budget (by the
        longest one so far); the first --batch-size conversations always run, so a run writes something."""
        planned = self.written + self.answering + len(self.to_answer) + self.asking
        if self.wanted is not None and planned >= self.wanted:
            return False
        if self.deadline is None or self.kept + self.asking < self.cfg.batch_size:
            return True
        return self.longest is not None and time.perf_counter() + self.longest <= self.deadline

    def finish(self, request: Request, tokens: list[int]) -> dict | None:
        """Take a finished request: a question is kept (queued for its answer) or dropped; an answer makes the
        record to write, returned."""
        kind, carried, number = request.tag  # an answer carries its question, a question its opening's tokens
        self.tokens += len(tokens)
        text = self.renderer.formatter.answer_text(tokens if kind == "answer" else carried + tokens)
        ended = bool(tokens) and tokens[-1] in self.stop_ids
        if kind == "answer":
            self.answering -= 1
            self.written += 1
            took = time.perf_counter() - self.started.pop(number)
            self.longest = took if self.longest is None else max(self.longest, took)
            return {"text": self.renderer.conversation(carried, text, ended), "question": carried,
                    "answer_tokens": len(tokens), "finished": ended, "made_with": self.made_with}
        self.asking -= 1
        key = _normalized(text)
        if (not ended or is_fragment(text, self.renderer.formatter.answer_text(tokens)) or key in self.seen
                or len(self.renderer.answer_prompt(text)) + self.cfg.max_new_tokens > self.context):
            self.rejected += 1
            self.started.pop(number)
            self.barren += 1
            if self.barren == MAX_BARREN_BATCHES * self.cfg.batch_size:
                raise MtpdError(f"the model wrote no usable question in {self.barren} tries (each must end its turn "
                                f"within --question-tokens {self.cfg.question_tokens}, not repeat an earlier one, "
                                f"and leave room for --max-new-tokens {self.cfg.max_new_tokens} in the context of "
                                f"{self.context}): raise --question-tokens or lower --max-new-tokens, or use a "
                                f"chat model")
            return None
        self.barren, self.kept = 0, self.kept + 1
        self.seen.add(key)
        self.to_answer.append((text, number))
        return None


def distill_data(hf: str, out: str | Path, cfg: DistillConfig, resume: bool = False, device: str = "auto",
                 dtype: str = "auto", show_progress: bool = True,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict:
    """Write the model's own conversations to `out` (JSONL) until `cfg.samples` lines are there or
    `cfg.time_budget` seconds have passed (no conversation starts that would not end by then, judged by
    the longest so far); returns a summary (lines, tokens, tokens/s)."""
    from mtpd.model.source import backbone_reference, resolve_source
    from mtpd.precision import dtype_reason, resolve_dtype
    from mtpd.run import resolve_device

    cfg, path = cfg.validate(), Path(out)
    dev = resolve_device(device)
    chosen, reason = resolve_dtype(dtype, dev), dtype_reason(dtype, dev)
    _check_output(path, resume)
    made_with = cfg.made_with(backbone_reference(resolve_source(hf)))
    existing, seen = read_existing(path, made_with) if resume else (0, set())
    if cfg.samples is not None and existing >= cfg.samples:
        log(f"{path} already holds {existing} conversations (--samples {cfg.samples}): nothing to do")
        return {"out": str(path), "lines": existing, "written": 0, "tokens": 0, "seconds": 0.0}
    backbone, renderer = load_chat_model(hf, dev, chosen)
    with _open_output(path) as file:  # once the model has loaded: a refused model leaves no empty file
        generator = torch.Generator(device=dev).manual_seed(_seed_for(cfg.seed, existing))
        work = _Conversations(backbone, renderer, cfg, made_with, seen,
                              None if cfg.samples is None else cfg.samples - existing)
        log(f"distill-data: {hf} in {str(chosen).removeprefix('torch.')} ({reason}); "
            f"{'appending to' if existing else 'writing'} {path}" + (f" ({existing} there)" if existing else ""))
        started = time.perf_counter()
        with tqdm(total=cfg.samples, initial=existing, disable=not show_progress, unit="conv",
                  dynamic_ncols=True) as bar:
            for request, tokens in stream_generate(backbone, work.next_request, cfg.batch_size, work.stop_ids,
                                                   generator):
                record = work.finish(request, tokens)
                if record is not None:
                    file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    file.flush()  # line by line: an interrupted run keeps every finished conversation
                    bar.update(1)
                    bar.set_postfix_str(f"{work.tokens / (time.perf_counter() - started):.1f} tokens/s, "
                                        f"{work.rejected} questions dropped")
    seconds = time.perf_counter() - started
    summary = {"out": str(path), "lines": existing + work.written, "written": work.written, "tokens": work.tokens,
               "seconds": round(seconds, 1), "tokens_per_s": round(work.tokens / seconds, 1),
               "questions_dropped": work.rejected, "dtype": str(chosen).removeprefix("torch.")}
    return summary


def own_conversations(hf_path: str | None, out_dir: str | Path, train_cfg: TrainConfig, device: str = "auto",
                      show_progress: bool = True, log=print) -> tuple[str | None, TrainConfig]:
    """What `train --hf` without --data trains on: for a chat model with a --time-budget, its own conversations
    (mtpd distill-data for `OWN_DATA_SHARE` of the budget, into OUT/chat.jsonl, finished once
    OUT/chat.jsonl.done is there) and the rest of the budget for training; else the standard library (None).
    A run in out_dir trained on another corpus keeps it (None: resume_run reads the one it recorded).
    `hf_path` None (`train --resume` without --hf): only a run in out_dir that trains on its own conversations
    is affected, and keeps the split."""
    from mtpd import distributed
    from mtpd.checkpoint import list_checkpoints, read_config
    from mtpd.config import OWN_DATA_FILE, OWN_DATA_SHARE
    from mtpd.model.source import load_hf_tokenizer, resolve_source

    out_dir = Path(out_dir)
    path, done = out_dir / OWN_DATA_FILE, out_dir / f"{OWN_DATA_FILE}.done"
    existing = list_checkpoints(out_dir)
    recorded = read_config(existing[-1][1]).get("data", {}).get("path") if existing else None
    if existing and (recorded is None or Path(recorded).resolve() != path.resolve()):
        return None, train_cfg
    if not existing and hf_path is None:  # a new run of the built-in model: its data is --data or the stdlib
        return None, train_cfg
    if train_cfg.time_budget is None:
        if not existing:
            log("no --data: training on the Python standard library (with --time-budget a chat model trains on "
                "its own conversations, which gave the most acceptance: README, 'Training data for a chat model')")
        return (str(path) if existing else None), train_cfg
    if not existing and PromptStyle.from_hf_tokenizer(load_hf_tokenizer(resolve_source(hf_path))).chat_template is None:
        log("no --data and no chat template: training on the Python standard library")
        return None, train_cfg
    if distributed.is_distributed():
        raise MtpdError("under torchrun, pass --data: make the model's own conversations first with "
                        "`mtpd distill-data --hf MODEL --out FILE --time-budget SECONDS`")
    seconds = OWN_DATA_SHARE * train_cfg.time_budget
    if not done.exists():
        if hf_path is None:  # (its checkpoints were written after the data was finished: the marker was deleted)
            raise MtpdError(f"{path} is not marked finished ({done} is missing): pass --hf MODEL to go on making it, "
                            f"or `touch {done}` to train on it as it is")
        log(f"no --data: {seconds:.0f} s of the {train_cfg.time_budget:.0f} s budget go to the model's own "
            f"conversations (mtpd distill-data) in {path}, the rest to training on them")
        out_dir.mkdir(parents=True, exist_ok=True)
        distill_data(hf_path, path, DistillConfig(time_budget=seconds), resume=path.exists(), device=device,
                     show_progress=show_progress, log=log)
        done.touch()
    return str(path), dataclasses.replace(train_cfg, time_budget=train_cfg.time_budget - seconds)

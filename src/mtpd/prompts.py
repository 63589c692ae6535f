"""The prompt layer: how text and conversations become the token ids a model is prompted with, and which
tokens end its answer.

A `PromptStyle` is a model's way of being prompted: its chat template (None: plain text only), whether its
tokenizer starts every text with a BOS token, and the tokens that end an answer. An instruct model ends its
turn with a token of its own (<|im_end|> for SmolLM2) rather than the end-of-text token that separates
training documents, so decoding stops at a set of tokens, not one. Every checkpoint records its style
(config.json "prompt_style"): heads trained with --hf their model's, read from its tokenizer; built-in models
(and checkpoints older than the field) the default: plain text, no BOS, the end-of-text token.

Conversations go through the template with transformers' own `apply_chat_template`, on the checkpoint's
tokenizer, so a rendered prompt is exactly what Hugging Face would feed the model; transformers is imported
only when a template is used.

Prompt files for `mtpd bench --prompts`: plain text, one prompt per line, or Spec-Bench / MT-Bench question
files (.jsonl, one question a line: `question_id`, `category`, `turns`). A question's first turn is a user
message; Spec-Bench asks the second after the model's own answer to the first (`PromptSet.second_turns`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from mtpd.data import eos_id
from mtpd.errors import MtpdError, first_line

QUESTION_FILE_SUFFIX = ".jsonl"
UNCATEGORIZED = "uncategorized"  # the category of a question that names none
# How a conversation reads without a template: its messages one after another, as paragraphs.
PLAIN_TURN_SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------- prompt style


@dataclass(frozen=True)
class PromptStyle:
    """How a model is prompted (see the module's docstring); saved with the checkpoint."""

    chat_template: str | None = None  # a Jinja chat template (Hugging Face's); None: plain text only
    bos_token: str | None = None  # the tokenizer's BOS, which templates may write as {{ bos_token }}
    eos_token: str | None = None  # the tokenizer's EOS, which templates may write as {{ eos_token }}
    add_bos: bool = False  # plain-text prompts start with bos_token, as the tokenizer starts every text it encodes
    stop_tokens: tuple[str, ...] = ()  # tokens that end an answer, besides the end-of-text token

    def to_dict(self) -> dict:
        return {**asdict(self), "stop_tokens": list(self.stop_tokens)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "PromptStyle":
        """The style a checkpoint recorded (config.json "prompt_style"); None: the default, plain text."""
        if data is None:
            return cls()
        try:
            style = cls(**{**data, "stop_tokens": tuple(data.get("stop_tokens", ()))})
        except TypeError as exc:
            raise MtpdError(f"the checkpoint's prompt_style is not one this mtpd understands ({exc}): upgrade mtpd, "
                            f"or retrain the heads") from None
        texts = [style.chat_template, style.bos_token, style.eos_token, *style.stop_tokens]
        if not all(text is None or isinstance(text, str) for text in texts) or not isinstance(style.add_bos, bool):
            raise MtpdError("the checkpoint's prompt_style is garbled (its template and tokens must be strings): "
                            "retrain the heads, or restore config.json")
        return style

    @classmethod
    def from_hf_tokenizer(cls, tokenizer) -> "PromptStyle":
        """The style of a `transformers` tokenizer: its chat template, BOS policy and EOS token."""
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the one apply_chat_template uses by default
            template = template.get("default")
        bos_id = tokenizer.bos_token_id
        # Whether the tokenizer itself puts BOS before a text (Llama does, SmolLM2 and GPT-2 do not).
        add_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
        return cls(chat_template=template or None, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                   add_bos=add_bos, stop_tokens=tuple(t for t in (tokenizer.eos_token,) if t))


# ------------------------------------------------------------------------------------------- rendering


class PromptFormatter:
    """A prompt style bound to a checkpoint's tokenizer: text and conversations -> prompt token ids."""

    def __init__(self, style: PromptStyle, tokenizer: Tokenizer):
        self.style, self.tokenizer = style, tokenizer

    @property
    def has_template(self) -> bool:
        return self.style.chat_template is not None

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end an answer: the style's stop tokens this vocabulary has, and end-of-text."""
        ids = {self.tokenizer.token_to_id(token) for token in self.style.stop_tokens}
        return frozenset(ids - {None}) | {eos_id(self.tokenizer)}

    def plain(self, text: str) -> list[int]:
        """`text` as the model reads it without a template, with the tokenizer's BOS if it adds one."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.tokenizer.token_to_id(self.style.bos_token) if self.style.add_bos and self.style.bos_token else None
        return ([bos] if bos is not None else []) + ids

    def chat(self, conversation: list[dict]) -> list[int]:
        """A conversation ([{"role": "user", "content": ...}, ...]) through the chat template, ending with the
        assistant's generation prompt: the tokens after which the model writes its next answer."""
        if not self.has_template:
            raise MtpdError("the model's tokenizer has no chat template, so --chat cannot wrap the prompt: drop "
                            "--chat to continue the text as it is, or train the heads with --hf on a model whose "
                            "tokenizer has one")
        try:
            encoded = self._hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)
        except Exception as exc:  # jinja2's TemplateError (raise_exception in a template) and its syntax errors
            raise MtpdError(f"the chat template cannot render this conversation ({first_line(exc)}): check the "
                            f"prompt, or pass it as plain text (no --chat; --no-chat-template for bench)") from None
        return list(encoded["input_ids"])

    def plain_conversation(self, messages: list[dict]) -> list[int]:
        """A conversation without a template: its messages as plain paragraphs."""
        return self.plain(PLAIN_TURN_SEPARATOR.join(message["content"] for message in messages))

    def answer_text(self, tokens: list[int]) -> str:
        """What the model answered in `tokens`: up to its first stop token, special tokens dropped."""
        stop = next((i for i, token in enumerate(tokens) if token in self.stop_ids), len(tokens))
        return self.tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()

    @cached_property
    def _hf_tokenizer(self):
        """transformers' tokenizer around this one, carrying the template (what apply_chat_template needs)."""
        from mtpd.model.source import transformers_module

        special = {name: token for name, token in (("bos_token", self.style.bos_token),
                                                   ("eos_token", self.style.eos_token)) if token}
        return transformers_module().PreTrainedTokenizerFast(tokenizer_object=self.tokenizer,
                                                             chat_template=self.style.chat_template, **special)


def checkpoint_formatter(checkpoint) -> PromptFormatter:
    """The prompt style a checkpoint recorded (the default for built-in models and older checkpoints), on its
    tokenizer."""
    return PromptFormatter(PromptStyle.from_dict(checkpoint.config.get("prompt_style")), checkpoint.tokenizer)


def user_turn(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------- prompt files


@dataclass(frozen=True)
class Question:
    """One line of a Spec-Bench / MT-Bench question file."""

    id: int | str
    category: str
    turns: tuple[str, ...]  # user messages; each after the model's answer to the one before


def is_question_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == QUESTION_FILE_SUFFIX


def _read_lines(path: str | Path, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MtpdError(f"prompts file '{path}' does not exist: pass {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MtpdError(f"cannot read prompts file '{path}' ({exc}): pass {what} in UTF-8") from None


def read_prompt_lines(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file (write `\\n` for a line break inside a prompt)."""
    lines = _read_lines(path, "a text file with one prompt per line")
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise MtpdError(f"prompts file '{path}' has no non-empty line: write one prompt per line")
    return prompts


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL question file: `turns` (a list of user messages) on every line; `question_id`
    (default: the line number) and `category` (default: uncategorized) as Spec-Bench and MT-Bench write them."""
    what = "a JSONL question file (Spec-Bench / MT-Bench: question_id, category, turns)"
    questions = []
    for number, line in enumerate(_read_lines(path, what), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MtpdError(f"{path} line {number} is not JSON ({exc.msg}): write one question object a line") from None
        if not isinstance(record, dict) or "turns" not in record:
            raise MtpdError(f"{path} line {number} has no \"turns\": every line of a question file needs \"turns\", "
                            f"a list of user messages (Spec-Bench / MT-Bench format)")
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise MtpdError(f"{path} line {number}: \"turns\" must be a non-empty list of non-empty strings "
                            f"(got {json.dumps(turns)[:60]})")
        category = record.get("category")
        questions.append(Question(record.get("question_id", number),
                                  str(category) if category not in (None, "") else UNCATEGORIZED, tuple(turns)))
    if not questions:
        raise MtpdError(f"question file '{path}' holds no question: write one JSON object with \"turns\" a line")
    return questions


# ------------------------------------------------------------------------------------- the bench's prompts


@dataclass
class PromptSet:
    """The prompts a benchmark decodes: token ids, and for question files each prompt's category and how to
    build the second turns."""

    prompts: list[list[int]]
    categories: list[str] | None = None  # one per prompt (question files); None: no per-category report
    chat_template: bool = False  # rendered through the chat template (else plain text)
    note: str | None = None  # why the prompts are plain text when the user may expect a template
    questions: list[Question] = field(default_factory=list)  # the prompts' questions, in order
    formatter: PromptFormatter | None = None

    def report(self) -> dict:
        return {"prompt_format": "chat template" if self.chat_template else "plain text", "prompt_note": self.note}

    def spread(self, count: int) -> "PromptSet":
        """`count` prompts evenly spread over the set (every len // count-th, from the first): a question file's
        questions are grouped by category, so a few of them still span every category."""
        step = max(1, len(self.prompts) // count)
        chosen = list(range(0, len(self.prompts), step))[:count]
        return replace(self, prompts=[self.prompts[i] for i in chosen],
                       categories=None if self.categories is None else [self.categories[i] for i in chosen],
                       questions=[self.questions[i] for i in chosen] if self.questions else [])

    def second_turn_lengths(self, answer_tokens: int) -> list[int]:
        """Each second-turn prompt's length before the answers exist: the conversation with an empty answer,
        plus `answer_tokens` (an answer re-encoded from its text has about as many tokens as the model wrote)."""
        return [len(self._second_turn(question, "")) + answer_tokens for question in self.questions
                if len(question.turns) >= 2]

    def second_turns(self, answers: list[list[int]]) -> "PromptSet | None":
        """The second-turn prompts of the questions that have one: [user turn 1, the model's answer to it (from
        `answers`, one per prompt), user turn 2], rendered as the first turns were (Spec-Bench runs MT-Bench
        this way); None if no question has a second turn."""
        if not self.questions or self.formatter is None:  # plain prompts: one turn each
            return None
        follow_ups = [(question, answer) for question, answer in zip(self.questions, answers, strict=True)
                      if len(question.turns) >= 2]
        if not follow_ups:
            return None
        prompts = [self._second_turn(question, self.formatter.answer_text(answer)) for question, answer in follow_ups]
        return PromptSet(prompts, [question.category for question, _ in follow_ups], self.chat_template, self.note)

    def _second_turn(self, question: Question, answer: str) -> list[int]:
        render = self.formatter.chat if self.chat_template else self.formatter.plain_conversation
        return render([user_turn(question.turns[0]), assistant_turn(answer), user_turn(question.turns[1])])


def file_prompts(path: str | Path, formatter: PromptFormatter, chat_template: bool = True) -> PromptSet:
    """A prompts file's prompts: plain-text lines as they are; a question file's first turns through the chat
    template when the tokenizer has one and `chat_template` (--no-chat-template: False), else as plain text."""
    if not is_question_file(path):
        return PromptSet([formatter.plain(text) for text in read_prompt_lines(path)])
    questions = read_questions(path)
    # Each category's questions together (stable), so benchmark batches, which never span two categories, fill.
    order = list(dict.fromkeys(question.category for question in questions))
    questions.sort(key=lambda question: order.index(question.category))
    categories = [question.category for question in questions]
    if chat_template and formatter.has_template:
        prompts = [formatter.chat([user_turn(question.turns[0])]) for question in questions]
        return PromptSet(prompts, categories, True, None, questions, formatter)
    note = ("--no-chat-template: the questions are plain text" if not chat_template else
            "the model's tokenizer has no chat template: the questions are plain text")
    prompts = [formatter.plain(question.turns[0]) for question in questions]
    return PromptSet(prompts, categories, False, note, questions, formatter)

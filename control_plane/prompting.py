"""Prompting on the gateway side: each model's chat template and tokenizer (files fetched from the
neuron that serves it), incremental UTF-8-safe detokenization, and exact stop strings.

transformers renders chat templates (the reference implementation of the Jinja dialect models
ship); `tokenizers.decoders.DecodeStream` detokenizes one id at a time and only returns text once
a character is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from jinja2 import TemplateError
from tokenizers.decoders import DecodeStream

from control_plane.canonical import ChatRequest, Message, ToolChoice
from control_plane.errors import InvalidRequest
from cortex.neuron_api import TokenizerFiles

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding
    from transformers import AutoTokenizer

JSON_MODE_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
TOOL_REQUIRED_INSTRUCTION = "Answer by calling one of the provided tools."
TOOL_NAMED_INSTRUCTION = "Answer by calling the tool {name}."


# transformers' lazy module is not safe to import from two threads at once (a name can be
# missing while another thread is half-way through): every import of it goes through this lock.
_transformers_lock = threading.Lock()


def import_tokenizer_support() -> type[AutoTokenizer]:
    """transformers' AutoTokenizer; the first call imports transformers (about 1.5 s)."""
    with _transformers_lock:
        from transformers import AutoTokenizer as auto_tokenizer

    return auto_tokenizer


class ModelTokenizer:
    def __init__(self, files: TokenizerFiles) -> None:
        AutoTokenizer = import_tokenizer_support()

        with tempfile.TemporaryDirectory(prefix="cortex-tokenizer-") as folder:
            for name, text in files.files.items():
                if name != "config.json":
                    (Path(folder) / name).write_text(text, encoding="utf-8")
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer_json = files.files.get("tokenizer.json", "")
        self._harmony: HarmonyEncoding | None = None
        self.context_length = files.context_length
        self.eos_token_ids = list(files.eos_token_ids)
        if (
            self.tokenizer.eos_token_id is not None
            and self.tokenizer.eos_token_id not in self.eos_token_ids
        ):
            self.eos_token_ids.append(int(self.tokenizer.eos_token_id))
        self.pad_token_id = (
            files.pad_token_id if files.pad_token_id is not None else self.tokenizer.pad_token_id
        )
        self.backend = self.tokenizer.backend_tokenizer
        # tokenizer.json may carry the padding and truncation it was trained with (cortex-tiny's
        # pads to 128): a prompt encoded here must come out as it is, whatever its length.
        self.backend.no_padding()
        self.backend.no_truncation()
        # transformers sets this before every encode it does; `render` encodes directly.
        self.backend.encode_special_tokens = bool(self.tokenizer.split_special_tokens)
        # Added tokens cut a text into pieces tokenized apart; with special tokens spelled out as
        # text (split_special_tokens) that no longer holds for them, so no memo then.
        self.memo: PromptMemo | None = None
        if not self.backend.encode_special_tokens:
            self.memo = PromptMemo(self.backend, set(self.backend.get_added_tokens_decoder()))
        # No token stands for more characters than its own spelling has (byte-level and
        # byte-fallback spellings only ever overstate it), added tokens included.
        self.longest_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    def harmony(self) -> HarmonyEncoding:
        """openai-harmony's encoding for this (gpt-oss) model: its vocabulary from
        $TIKTOKEN_ENCODINGS_BASE when that is set, else written from the model's tokenizer.json
        (harmony checks the file's hash either way). Its end tokens join the end ids."""
        if self._harmony is None:
            from control_plane import harmony

            folder = None
            if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
                folder = harmony.write_vocabulary(
                    self.tokenizer_json, Path(tempfile.mkdtemp(prefix="cortex-harmony-"))
                ).parent
            self._harmony = harmony.encoding(folder)
            for token in harmony.stop_token_ids(self._harmony):
                if token not in self.eos_token_ids:
                    self.eos_token_ids.append(token)
        return self._harmony

    def fewest_tokens(self, request: ChatRequest) -> int:
        """A lower bound on the prompt's token count, from its characters alone: each token
        covers at most `longest_token_chars` of them. Costs microseconds where tokenizing a
        20 MB prompt costs half a minute, so a prompt that cannot fit is refused before that."""
        return -(-prompt_chars(request) // self.longest_token_chars)

    def render(
        self, request: ChatRequest, *, harmony: bool = False, conversation: str | None = None
    ) -> list[int]:
        """The prompt's token ids: the chat template over messages and tools; with `harmony`
        (gpt-oss), openai-harmony's rendering of them instead. `conversation`
        (routing.conversation_key) names where the conversation's previous prompt is kept, so
        only what follows their common part is tokenized again (`PromptMemo`)."""
        if harmony and request.raw_prompt is None:
            from control_plane import harmony as harmony_format

            return harmony_format.render(self.harmony(), request)
        if request.raw_prompt is not None:
            return list(self.backend.encode(request.raw_prompt, add_special_tokens=False).ids)
        messages, tools, prefill = template_inputs(request)
        # Qwen3's templates open an empty <think></think> when this is false; templates that
        # do not read it ignore it.
        switches: dict[str, Any] = {}
        if request.reasoning is not None:
            switches["enable_thinking"] = request.reasoning
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=not prefill,
                continue_final_message=prefill,
                tokenize=False,
                **switches,
            )
        except TemplateError as error:  # the template's own `raise_exception` (say, roles)
            raise InvalidRequest(
                f"messages: the model's chat template refuses them: {error}", "messages"
            ) from None
        # What apply_chat_template(tokenize=True) does with the text, minus its per-call argument
        # handling (a third of the time of a short prompt): encode, adding no special tokens. The
        # batch form, as transformers uses, lets go of the GIL while it works on a long prompt.
        if conversation is None or self.memo is None:
            encoded = self.backend.encode_batch([str(text)], add_special_tokens=False)[0]
            return list(encoded.ids)
        return self.memo.encode(conversation, str(text))

    @property
    def chat_template(self) -> str:
        """The chat template's text (all of its named templates, when it has several)."""
        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            return "\n".join(str(text) for text in template.values())
        return str(template or "")

    def is_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary (a tool-call tag, say)."""
        return self.backend.token_to_id(text) is not None

    def decode(self, ids: list[int]) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=True))

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class _Rendered(NamedTuple):
    text: str
    ids: array[int]
    # Where each added token (`<|im_start|>`, …) is: its first and past-last characters and
    # its index in `ids`, in order.
    starts: list[int]
    ends: list[int]
    indices: list[int]


class PromptMemo:
    """Each recent conversation's last prompt (text and ids), so its next turn tokenizes only
    what changed: in tens of milliseconds where the whole of a 60k-character Claude Code
    prompt takes hundreds (BENCHMARKS.md).

    Exact, not approximate: a tokenizer cuts its input at added tokens first and tokenizes the
    pieces between them apart, so the ids before an added token that lies wholly inside the
    part both texts share are the same ids for both. The new text is tokenized from the last
    such token on. Memory: at most `size` conversations, each its text and 4 bytes an id
    (a 20k-token Claude Code prompt: about 160 kB).
    """

    def __init__(self, backend: Any, added_ids: set[int], size: int = 64) -> None:
        self.backend = backend
        self.added_ids = added_ids
        self.size = size
        self._recent: OrderedDict[str, _Rendered] = OrderedDict()
        self._lock = threading.Lock()
        self.reused_tokens = 0  # ids taken from an earlier prompt instead of tokenized, since start

    def encode(self, conversation: str, text: str) -> list[int]:
        with self._lock:
            previous = self._recent.get(conversation)
        start = index = cut = 0
        if previous is not None:
            common = common_prefix_length(previous.text, text)
            cut = bisect_right(previous.ends, common)  # added tokens wholly in the common part
            if cut:
                start, index = previous.starts[cut - 1], previous.indices[cut - 1]
        encoded = self.backend.encode_batch([text[start:]], add_special_tokens=False)[0]
        tail = encoded.ids
        starts, ends, indices = [], [], []
        if previous is not None and cut:
            starts, ends = previous.starts[: cut - 1], previous.ends[: cut - 1]
            indices = previous.indices[: cut - 1]
        for position, (token, (first, last)) in enumerate(zip(tail, encoded.offsets, strict=True)):
            if token in self.added_ids:
                starts.append(start + first)
                ends.append(start + last)
                indices.append(index + position)
        ids = array("i", previous.ids[:index]) if previous is not None else array("i")
        ids.extend(tail)
        with self._lock:
            self._recent[conversation] = _Rendered(text, ids, starts, ends, indices)
            self._recent.move_to_end(conversation)
            while len(self._recent) > self.size:
                self._recent.popitem(last=False)
            self.reused_tokens += index
        return ids.tolist()


def common_prefix_length(first: str, second: str) -> int:
    """How many leading characters two strings share (bisection over C-speed comparisons)."""
    size = min(len(first), len(second))
    if first[:size] == second[:size]:
        return size
    low, high = 0, size  # first[:low] == second[:low]; first[:high] != second[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle
    return low


def prompt_chars(request: ChatRequest) -> int:
    """Characters of the request's own text that reach the prompt as they are: messages' text,
    tool names and descriptions (the template adds markup around them). Tool-call arguments are
    left out: templates re-serialize them, possibly shorter. A template that drops a message's
    text would make this an overstatement; the templates cortex serves do not."""
    if request.raw_prompt is not None:
        return len(request.raw_prompt)
    size = 0
    for message in request.messages:
        size += len(message.content)
        size += sum(len(call.name) for call in message.tool_calls)
    for tool in request.tools:
        size += len(tool.name) + len(tool.description)
    return size


def template_inputs(request: ChatRequest) -> tuple[list[dict[str, Any]], list[Any] | None, bool]:
    """What the chat template is given: (messages, tools or None, whether the last message is
    a prefill to continue rather than close)."""
    messages = [_template_message(m) for m in fold_system_messages(request)]
    tools: list[Any] | None = [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in request.tools
    ] or None
    # A prefill (Anthropic: the last message is the assistant's) is continued, not closed.
    prefill = request.continue_final and bool(messages) and messages[-1]["role"] == "assistant"
    return messages, tools, prefill


def fold_system_messages(request: ChatRequest) -> list[Message]:
    """Messages as chat templates accept them: one leading system message, no other.

    Leading system messages (and the instructions the request implies) form the system prompt.
    A later one — Claude Code sends them mid-conversation — keeps its place in the conversation,
    as many templates (Qwen's) refuse a system message that is not first: right after a user
    turn it joins the end of that turn; elsewhere it joins the start of the next user turn (so
    it never splits a tool call from its result), else the previous one.

    Where it goes is decided by what comes before it wherever possible, so a conversation's
    next request renders this part the same and the prompt only grows at its end (prefix
    caches reuse all of it). Claude Code's first request ends with a system message right after
    the first user turn, and its next request adds turns behind it: folded into the next user
    turn, the first turn would render differently from one request to the next.
    """
    messages = list(request.messages)
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    system = [m.content for m in messages[:lead] if m.content]
    rest = messages[lead:]
    pending: list[str] = []  # inline system text waiting for the next user turn
    folded: list[Message] = []
    for message in rest:
        if message.role == "system":
            if message.content and not pending and folded and folded[-1].role == "user":
                last = folded[-1]
                parts = [last.content, message.content] if last.content else [message.content]
                folded[-1] = replace(last, content="\n\n".join(parts))
            elif message.content:
                pending.append(message.content)
        elif message.role == "user" and pending:
            content = "\n\n".join([*pending, message.content] if message.content else pending)
            folded.append(replace(message, content=content))
            pending = []
        else:
            folded.append(message)
    if pending:
        users = [i for i, m in enumerate(folded) if m.role == "user"]
        if users:
            last = folded[users[-1]]
            parts = [last.content, *pending] if last.content else pending
            folded[users[-1]] = replace(last, content="\n\n".join(parts))
        else:
            system.extend(pending)
    system.extend(_instructions(request))
    if system:
        return [Message(role="system", content="\n\n".join(system)), *folded]
    return folded


def _instructions(request: ChatRequest) -> list[str]:
    """What the request asks for that the model is also told: JSON (which the engine's guide
    enforces, but a model not told writes JSON it did not mean), a tool call."""
    wanted = []
    if request.json_mode:
        wanted.append(JSON_MODE_INSTRUCTION)
    if request.tools and request.tool_choice is ToolChoice.REQUIRED:
        wanted.append(TOOL_REQUIRED_INSTRUCTION)
    elif request.tools and request.tool_choice is ToolChoice.NAMED:
        wanted.append(TOOL_NAMED_INSTRUCTION.format(name=request.tool_choice_name))
    return wanted


def _template_message(message: Message) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.reasoning:
        rendered["reasoning_content"] = message.reasoning
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class IncrementalDecoder:
    """Token ids in, complete text out; `finish` flushes what a final partial character left."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted = 0

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self.stream.step(self.tokenizer.backend, token_id)
        if piece:
            self.emitted += len(piece)
            return str(piece)
        return ""

    def finish(self) -> str:
        full = self.tokenizer.decode(self.ids)
        rest = full[self.emitted :]
        self.emitted = len(full)
        return rest


class StopMatcher:
    """Cuts generated text exactly at the first client stop string, holding back any tail that
    could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.buffer = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buffer += text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            position = self.buffer.find(stop)
            if position >= 0 and (first is None or position < first[0]):
                first = (position, stop)
        if first is not None:
            self.matched = first[1]
            out, self.buffer = self.buffer[: first[0]], ""
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out

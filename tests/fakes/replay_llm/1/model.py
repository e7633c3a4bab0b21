"""FAKE, for tests only: a Triton Python-backend model that replays scripted answers.

It stands in for a model that *chooses* to call tools, which the tiny demo model never does.
It takes the torch engine's tensors (TensorRT-LLM's names) and streams token ids back the same
way — one decoupled response per token, the last one empty with the final flag — so the gateway
drives it exactly like a real engine: tokenization, chat template, detokenization, tool-call
parsing, translation and the clients all stay real.

The script is `replay.json` in the profile's source folder (next to tokenizer.json):

    {"turn_marker": "<|im_start|>user",
     "rules": [{"when": "weather in Paris", "reply": "<tool_call>…</tool_call>"}, …]}

The prompt's ids are decoded and the text after the last `turn_marker` (the latest user turn,
tool results included) is matched against each rule's `when`; the first rule whose `when` it
contains answers. A rule's answer is `reply` (text, encoded with the model's tokenizer, so tags
such as `<tool_call>` are the single tokens a real model emits; `{turn}` is replaced with that
latest turn, `{priority}` with the request's `priority` tensor as the gateway's class name) or
`reply_ids`. Optional: `first_delay_s` (a long prefill), `delay_s` (between tokens),
`fail_after` + `error` (the engine fails after that many tokens; `error_kind`, a
`cortex.engine_errors` kind, goes in front of the message as the engines send it).

A request that Triton reports cancelled (its client went away) adds its latest turn as a line to
`cancelled.log` in that folder, so tests can see a disconnect reach the engine.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from cortex.engine_errors import EngineErrorKind, tag_engine_error


def _input(request: Any, name: str) -> npt.NDArray[Any] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(parameters["checkpoint_dir"])
        self.cancelled_log = folder / "cancelled.log"
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json may keep the padding it was trained with
        self.tokenizer.no_truncation()
        script = json.loads((folder / "replay.json").read_text(encoding="utf-8"))
        self.marker = script.get("turn_marker", "")
        self.rules: list[dict[str, Any]] = script["rules"]

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            ids = _input(request, "input_ids")
            lengths = _input(request, "input_lengths")
            limit = _input(request, "request_output_len")
            prompt = [] if ids is None else ids.tolist()
            if lengths is not None:
                prompt = prompt[: int(lengths[0])]
            max_tokens = 16 if limit is None else int(limit[0])
            priority = _input(request, "priority")
            level = "batch" if priority is not None and int(priority[0]) else "interactive"
            # Decoupled: answer from a thread so requests overlap like a batching engine's.
            threading.Thread(
                target=self._replay, args=(prompt, max_tokens, sender, level), daemon=True
            ).start()
        return None

    def _choose(self, prompt: list[int]) -> tuple[dict[str, Any], str]:
        text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        turn = text.rsplit(self.marker, 1)[-1] if self.marker else text
        turn = turn.split("<|im_end|>", 1)[0].strip()
        for rule in self.rules:
            if rule.get("when", "") in turn:
                return rule, turn
        return {"reply": ""}, turn

    def _replay(self, prompt: list[int], max_tokens: int, sender: Any, level: str) -> None:
        try:
            rule, turn = self._choose(prompt)
            if "reply_ids" in rule:
                reply = [int(t) for t in rule["reply_ids"]]
            else:
                text = str(rule.get("reply", "")).replace("{turn}", turn)
                text = text.replace("{priority}", level)
                reply = self.tokenizer.encode(text, add_special_tokens=False).ids
            time.sleep(float(rule.get("first_delay_s", 0)))
            for count, token in enumerate(reply[:max_tokens]):
                if sender.is_cancelled():
                    with self.cancelled_log.open("a", encoding="utf-8") as log:
                        log.write(turn.replace("\n", " ") + "\n")
                    # Close the sender all the same: Triton waits for it before unloading.
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                if rule.get("fail_after") == count:
                    self._fail(sender, _error_text(rule))
                    return
                self._send(sender, [token], final=False)
                time.sleep(float(rule.get("delay_s", 0)))
            if "fail_after" in rule and rule["fail_after"] >= min(len(reply), max_tokens):
                self._fail(sender, _error_text(rule))
                return
            self._send(sender, [], final=True)
        except Exception as error:  # never leave a request unanswered
            self._fail(sender, f"replay fake: {error!r}")

    @staticmethod
    def _send(sender: Any, tokens: list[int], final: bool) -> None:
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32)),
                pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
            ]
        )
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        sender.send(response, flags=flags)

    @staticmethod
    def _fail(sender: Any, message: str) -> None:
        sender.send(
            pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )


def _error_text(rule: dict[str, Any]) -> str:
    message = str(rule.get("error", "replay fake failure"))
    kind = rule.get("error_kind")
    return tag_engine_error(EngineErrorKind(kind), message) if kind else message

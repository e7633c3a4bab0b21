"""A GGUF source's tokenizer, as the neuron serves it (`GET /models/{name}/tokenizer`): made from
the file's metadata with transformers on first use, cached in the neuron's state folder, and
loadable by the gateway with the chat template the file carries."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from control_plane.canonical import ChatRequest, Message
from control_plane.prompting import ModelTokenizer
from cortex.config import ModelProfile, ModelsFile, NeuronConfig, NeuronSection
from cortex.demo.smollm2 import gguf_path
from neuron_agent.catalogue import Catalogue


def test_tokenizer_files_come_from_the_gguf_metadata(smollm2_model: Path, tmp_path: Path) -> None:
    source = gguf_path(smollm2_model)
    config = NeuronConfig(
        neuron=NeuronSection(state_dir=str(tmp_path / "state")),
        models=ModelsFile(models=(ModelProfile(name="smol", source=str(source)),)),
    )
    files = Catalogue(config, has_gpu=False).tokenizer_files("smol")
    assert files.context_length == 8192 and files.eos_token_ids == [2]
    assert list((tmp_path / "state" / "tokenizers").glob("*/tokenizer.json"))  # cached there
    reader = gguf.GGUFReader(source)
    template = reader.fields["tokenizer.chat_template"].contents()
    assert json.loads(files.files["tokenizer_config.json"])["chat_template"] == template

    tokenizer = ModelTokenizer(files)
    request = ChatRequest(model="smol", messages=(Message(role="user", content="Hi"),))
    ids = tokenizer.render(request)
    text = tokenizer.backend.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # SmolLM2's vocabulary has every digit a token of its own, as its training split them.
    pieces = tokenizer.backend.encode("In 2024", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "2", "4"]
    assert tokenizer.decode(tokenizer.backend.encode("Paris, 1889.").ids) == "Paris, 1889."

"""Who may reach a node's Triton (issue 25): a real neuron with a token and gRPC TLS, its real
tritonserver, and a real gateway in front. Every probe that worked against an open Triton —
a repository index, uploading a model whose Python runs on the node, unloading behind the
neuron's back, inference without the gateway's keys — is refused on HTTP and on gRPC without
the node's key and with a wrong one; health still answers; the same calls with the key work
(so it is the key that decides); and the gateway serves both dialects over the locked link."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import grpc
import httpx
import openai
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cortex.config import ModelProfile, NeuronRef, TritonSection
from cortex.launch import Neuron, loopback_gateway, loopback_neuron, running_gateway, running_neuron
from cortex.secrets import TRITON_GRPC_KEY_METADATA, TRITON_KEY_HEADER, sha256_hex, triton_key

TOKEN = "lockdown-neuron-token"
API_KEY = "sk-lockdown"
MODEL = "m1"
# A model whose Python writes this file when Triton loads it: the code-execution probe.
UPLOADED_MODEL = """
import pathlib
class TritonPythonModel:
    def initialize(self, args):
        pathlib.Path({marker!r}).write_text("ran")
    def execute(self, requests):
        return []
"""
UPLOADED_CONFIG = {"name": "uploaded", "backend": "python", "max_batch_size": 0}


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 that it signed: (ca, cert, key) PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cortex test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (folder / "ca.pem", folder / "triton.pem", folder / "triton.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass
class Node:
    neuron: Neuron
    triton: TritonSection
    ca: Path
    folder: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.triton.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.triton.grpc_port}"

    def neuron_call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, self.neuron.url + path, headers=headers, timeout=120, **kwargs)

    def loaded(self) -> set[str]:
        status = self.neuron_call("GET", "/status").json()
        return {m["name"] for m in status["loaded"] if m["state"] == "READY"}

    def stub(self, metadata: list[tuple[str, str]]) -> service_pb2_grpc.GRPCInferenceServiceStub:
        """A TLS client of Triton's gRPC port that sends `metadata` on every call."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        channel = grpc.secure_channel(self.grpc_address, credentials)
        if metadata:
            channel = grpc.intercept_channel(channel, _metadata_interceptor(metadata))
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def node(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("lockdown")
    ca, cert, key = make_certificates(folder)
    config = loopback_neuron(
        folder,
        "locked",
        [ModelProfile(name=MODEL, source=str(tiny_model), kv_cache_tokens=2048)],
        token=TOKEN,
    )
    triton = config.triton.model_copy(update={"tls_cert": str(cert), "tls_key": str(key)})
    config = config.model_copy(update={"triton": triton})
    with running_neuron(config) as neuron:
        locked = Node(neuron, triton, ca, folder)
        response = locked.neuron_call("POST", "/models/load", json={"model": MODEL})
        assert response.status_code == 200, response.text
        yield locked


# ---------------------------------------------------------------------------------------------
# Triton's HTTP port


def test_http_and_metrics_listen_on_loopback_only(node: Node) -> None:
    tritons = [
        child
        for child in psutil.Process(node.neuron.process.pid).children(recursive=True)
        if child.name() == "tritonserver"
    ]
    assert len(tritons) == 1
    listening = {
        c.laddr.port: c.laddr.ip for c in tritons[0].net_connections() if c.status == "LISTEN"
    }
    assert listening[node.triton.http_port] == "127.0.0.1"
    assert listening[node.triton.metrics_port] == "127.0.0.1"


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no key", "wrong key"])
def test_http_probes_are_refused(node: Node, key: str | None) -> None:
    headers = {TRITON_KEY_HEADER: key} if key else {}
    marker = node.folder / f"uploaded-ran-{key}"
    upload = {
        "parameters": {
            "config": json.dumps(UPLOADED_CONFIG),
            "file:1/model.py": base64.b64encode(
                UPLOADED_MODEL.format(marker=str(marker)).encode()
            ).decode(),
        }
    }
    with httpx.Client(base_url=node.http, headers=headers, timeout=60) as triton:
        probes = {
            "index": triton.post("/v2/repository/index", json={}),
            "upload": triton.post("/v2/repository/models/uploaded/load", json=upload),
            "unload": triton.post(f"/v2/repository/models/{MODEL}/unload", json={}),
            "stats": triton.get(f"/v2/models/{MODEL}/stats"),
            "config": triton.get(f"/v2/models/{MODEL}/config"),
            "metadata": triton.get("/v2"),
            "infer": triton.post(f"/v2/models/{MODEL}/infer", json={"inputs": []}),
        }
        assert triton.get("/v2/health/live").status_code == 200  # health stays open
    refused = {name: response.status_code for name, response in probes.items()}
    assert all(status in (401, 403) for status in refused.values()), refused
    assert not marker.exists(), "the uploaded model's code ran on the node"
    assert MODEL in node.loaded()


def test_http_with_the_key_works(node: Node) -> None:
    """The control: the same index call with the node's key answers, so the key decides."""
    headers = {TRITON_KEY_HEADER: triton_key(TOKEN)}
    response = httpx.post(f"{node.http}/v2/repository/index", json={}, headers=headers)
    assert response.status_code == 200, response.text
    assert MODEL in {entry["name"] for entry in response.json()}


# ---------------------------------------------------------------------------------------------
# Triton's gRPC port (TLS)


def _grpc_probes(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, marker: Path
) -> dict[str, grpc.StatusCode]:
    upload = service_pb2.RepositoryModelLoadRequest(model_name="uploaded")
    upload.parameters["config"].string_param = json.dumps(UPLOADED_CONFIG)
    upload.parameters["file:1/model.py"].bytes_param = UPLOADED_MODEL.format(
        marker=str(marker)
    ).encode()
    infer = service_pb2.ModelInferRequest(model_name=MODEL)
    calls: dict[str, Callable[[], object]] = {
        "index": lambda: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()),
        "upload": lambda: stub.RepositoryModelLoad(upload),
        "unload": lambda: stub.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(model_name=MODEL)
        ),
        "infer": lambda: stub.ModelInfer(infer),
        "stream infer": lambda: list(stub.ModelStreamInfer(iter([infer]))),
        "statistics": lambda: stub.ModelStatistics(service_pb2.ModelStatisticsRequest()),
        "config": lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name=MODEL)),
        "metadata": lambda: stub.ServerMetadata(service_pb2.ServerMetadataRequest()),
        "shared memory": lambda: stub.SystemSharedMemoryStatus(
            service_pb2.SystemSharedMemoryStatusRequest()
        ),
        "trace": lambda: stub.TraceSetting(service_pb2.TraceSettingRequest()),
        "logging": lambda: stub.LogSettings(service_pb2.LogSettingsRequest()),
    }
    outcomes: dict[str, grpc.StatusCode] = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = grpc.StatusCode.OK
        except grpc.RpcError as error:
            outcomes[name] = error.code()
    return outcomes


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no key", "wrong key"])
def test_grpc_probes_are_refused(node: Node, key: str | None) -> None:
    stub = node.stub([(TRITON_GRPC_KEY_METADATA, key)] if key else [])
    marker = node.folder / f"grpc-uploaded-ran-{key}"
    outcomes = _grpc_probes(stub, marker)
    assert grpc.StatusCode.OK not in outcomes.values(), outcomes
    assert not marker.exists(), "the uploaded model's code ran on the node"
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # health stays open
    assert MODEL in node.loaded()


def test_grpc_with_the_key_works_and_plaintext_does_not(node: Node) -> None:
    stub = node.stub([(TRITON_GRPC_KEY_METADATA, triton_key(TOKEN))])
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest())
    assert MODEL in {model.name for model in index.models}
    plaintext = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(node.grpc_address))
    with pytest.raises(grpc.RpcError) as refused:
        plaintext.ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _metadata_interceptor(metadata: list[tuple[str, str]]) -> grpc.UnaryUnaryClientInterceptor:
    class Interceptor(
        grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
        grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
        grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
    ):
        def _with(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
            return details._replace(metadata=[*(details.metadata or []), *metadata])

        def intercept_unary_unary(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(self._with(details), request)

        def intercept_unary_stream(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
        ) -> Any:
            return continuation(self._with(details), request)

        def intercept_stream_stream(
            self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Any
        ) -> Any:
            return continuation(self._with(details), requests)

    return Interceptor()


# ---------------------------------------------------------------------------------------------
# The neuron's own surface, and the gateway over the locked link


def test_neuron_metrics_need_the_token(node: Node) -> None:
    assert httpx.get(node.neuron.url + "/metrics").status_code == 401
    response = node.neuron_call("GET", "/metrics")
    assert response.status_code == 200
    assert f'nv_inference_count{{model="{MODEL}"' in response.text


def test_gateway_serves_both_dialects_with_the_key(node: Node, tmp_path: Path) -> None:
    gateway = loopback_gateway({}, api_key_sha256=(sha256_hex(API_KEY),))
    neuron = NeuronRef(name="locked", endpoint=node.neuron.url, token=TOKEN, tls_ca=str(node.ca))
    gateway = gateway.model_copy(update={"neurons": (neuron,)})
    with running_gateway(tmp_path / "cortex.toml", gateway, neurons_up=True) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        messages = anthropic.Anthropic(base_url=running.url, api_key=API_KEY, max_retries=0)
        answer = messages.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hello"}]
        )
        assert answer.usage.output_tokens > 0
        wrong = openai.OpenAI(base_url=running.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()

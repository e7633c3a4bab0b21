"""The processes of a tensor-parallel model: rank 0 runs the scheduler, the others follow it.

Rank 0 is the process that builds the engine (Triton's Python stub for the model). It starts
ranks 1..N-1 as worker processes (`python -m neuron_agent.torch_engine.ranks`), meets them in a
process group (NCCL on GPUs, gloo on CPU), and every rank loads its own shard. The scheduler runs
once, on rank 0, and calls rank 0's model as it would a tp = 1 model; that model (`LeaderModel`)
first tells every worker what call comes — a small header through the worker's stdin pipe (the
fields of the ForwardBatch, their shapes and dtypes) — and broadcasts the call's tensors in one
packed buffer, then runs its own shard. The workers run the same forward on theirs, so the
row-parallel all-reduces meet; they hold no output head and compute no logits.

Lifetimes:
- an idle worker waits on its pipe, not in a collective, so idle time never hits a timeout;
- rank 0 closing the model sends "stop", then kills what has not exited within seconds;
- a worker whose rank 0 dies (the stub killed, Triton restarted) sees its pipe close or its
  parent change and exits at once, even when stuck in a collective;
- a worker that dies is seen by rank 0's watchdog within a tenth of a second: every request of
  the model fails with a sentence that names the rank, the other workers are stopped, and the
  engine refuses new requests (the neuron reads that and reports the model failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from neuron_agent.torch_engine.errors import EngineError
from neuron_agent.torch_engine.kv_cache import LayerCache
from neuron_agent.torch_engine.llama import ForwardBatch, LlamaModel
from neuron_agent.torch_engine.loader import EngineOptions, LoadPlan, load_shard, new_engine, plan
from neuron_agent.torch_engine.parallel import (
    COLLECTIVE_TIMEOUT,
    Shard,
    join_process_group,
    leave_process_group,
)
from neuron_agent.torch_engine.scheduler import Engine

log = logging.getLogger("cortex.engine.ranks")
WATCH_SECONDS = 0.1
STOP_GRACE_SECONDS = 10.0
_FRAME = struct.Struct(">I")


def _python() -> str:
    """The interpreter for worker ranks: this one, or (inside Triton's stub, whose executable
    is the stub) the first python3 on PATH — the one the neuron put there for the stub."""
    executable = Path(sys.executable)
    if executable.name.startswith("python") and executable.exists():
        return str(executable)
    found = shutil.which("python3")
    if found is None:
        raise EngineError("no python3 on PATH to start the tensor-parallel ranks with")
    return found


def _describe(name: str, process: subprocess.Popen[bytes], code: int, error: str | None) -> str:
    if error:
        return f"{name} failed: {error}"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{name} (pid {process.pid}) was killed by {signal.Signals(-code).name}"
    return f"{name} (pid {process.pid}) exited with code {code}"


class RankGroup:
    """Rank 0's hold on the worker ranks: start, one call per step, watchdog, close."""

    def __init__(self, options: EngineOptions, store: dist.TCPStore) -> None:
        self.options = options
        self.world = options.tp
        self.shard = Shard(0, options.tp)
        self.device = options.device_of(0)
        self.store = store
        self.processes: list[subprocess.Popen[bytes]] = []
        self.failure: str | None = None
        self.loaded = False
        # Called once, from the watchdog thread, with the failure's sentence.
        self.on_failure: list[Callable[[str], None]] = []
        self._closing = False
        self._send_lock = threading.Lock()
        self._watchdog = threading.Thread(target=self._watch, name="cortex-ranks", daemon=True)

    @classmethod
    def start(cls, options: EngineOptions) -> RankGroup:
        """Start ranks 1..tp-1 and join the process group with them as rank 0."""
        store = dist.TCPStore(
            "127.0.0.1", 0, options.tp, is_master=True, wait_for_workers=False,
            timeout=COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        group = cls(options, store)
        try:
            group._spawn()
            group._watchdog.start()
            group.wait_for("joined")
            join_process_group(group.shard, store, group.device)
        except BaseException:
            group.close()
            raise
        return group

    def _spawn(self) -> None:
        fields = dataclasses.asdict(self.options)
        fields["checkpoint"] = str(self.options.checkpoint)
        tokenizer = self.options.tokenizer_dir
        fields["tokenizer_dir"] = None if tokenizer is None else str(tokenizer)
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, environment.get("PYTHONPATH", "")) if p
        )
        for rank in range(1, self.world):
            command = [
                _python(), "-m", "neuron_agent.torch_engine.ranks",
                "--rank", str(rank),
                "--store-port", str(self.store.port),
                "--options", json.dumps(fields),
                "--label", self.options.label or str(self.options.checkpoint),
            ]  # fmt: skip
            self.processes.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, env=environment, bufsize=0)
            )

    def wait_for(self, stage: str) -> None:
        """Until every worker has reached `stage` (it sets `stage/rank` in the store)."""
        keys = [f"{stage}/{rank}" for rank in range(1, self.world)]
        while not self.store.check(keys):
            if self.failure is not None:
                raise EngineError(self.failure)
            time.sleep(0.02)
        if stage == "loaded":
            self.loaded = True

    # ------------------------------------------------------------------ failures

    def _watch(self) -> None:
        while not self._closing:
            for rank, process in enumerate(self.processes, start=1):
                code = process.poll()
                if code is not None and not self._closing:
                    self._fail(rank, process, code)
                    return
            time.sleep(WATCH_SECONDS)

    def _fail(self, rank: int, process: subprocess.Popen[bytes], code: int) -> None:
        error = None
        with contextlib.suppress(Exception):
            if self.store.check([f"error/{rank}"]):
                error = self.store.get(f"error/{rank}").decode("utf-8", "replace")
        message = _describe(f"tensor-parallel rank {rank} of {self.world}", process, code, error)
        if self.loaded:
            message += "; the model cannot serve until it is loaded again"
        self.failure = message
        log.error("%s", message)
        if self.device.type == "cuda":
            leave_process_group(abort=True)  # unblocks rank 0's collectives on the dead peer
        for listener in self.on_failure:
            try:
                listener(message)
            except Exception:
                log.exception("a rank-failure listener failed")
        for other in self.processes:  # no lock: the engine thread may hold it, stuck
            if other.poll() is None:
                other.kill()

    def explain(self, error: BaseException, wait: float = 2.0) -> str:
        """The failure behind a collective's error: a dead peer, as the watchdog names it."""
        deadline = time.monotonic() + wait
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.failure or f"the tensor-parallel step failed: {error}"

    # ------------------------------------------------------------------ steps

    def send_call(self, tokens: torch.Tensor, batch: ForwardBatch) -> None:
        header, packed, floats = describe_call(tokens, batch)
        frame = _frame(header)
        with self._send_lock:
            for process in self.processes:
                assert process.stdin is not None
                process.stdin.write(frame)
            if packed is not None:
                self.shard.broadcast(packed)
            for tensor in floats:
                self.shard.broadcast(tensor.contiguous())

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Stop every worker (asked first, killed after a grace period) and leave the group."""
        self._closing = True
        # A step still sending (stuck on a dead peer) must not keep the workers alive.
        locked = self._send_lock.acquire(timeout=5)
        try:
            for process in self.processes:
                with contextlib.suppress(OSError, ValueError):
                    if process.stdin is not None:
                        if process.poll() is None and locked:
                            process.stdin.write(_frame({"op": "stop"}))
                        process.stdin.close()
        finally:
            if locked:
                self._send_lock.release()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        leave_process_group(abort=self.failure is not None and self.device.type == "cuda")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]


class LeaderModel(LlamaModel):
    """Rank 0's shard; each call first sends the same call to the other ranks."""

    def __init__(self, ranks: RankGroup, *args: Any) -> None:
        super().__init__(*args)
        self.ranks = ranks

    def forward(
        self,
        tokens: torch.Tensor,
        batch: ForwardBatch,
        kv_caches: list[LayerCache],
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ranks = self.ranks
        if ranks.failure is not None:
            raise EngineError(ranks.failure)
        try:
            ranks.send_call(tokens, batch)
            return super().forward(tokens, batch, kv_caches, logits_index)
        except (OSError, ValueError, RuntimeError) as error:  # a broken or closed pipe, a peer gone
            raise EngineError(ranks.explain(error)) from None


def build_parallel_engine(options: EngineOptions, planned: LoadPlan) -> Engine:
    """Rank 0's engine: start the other ranks, load every shard, return once all are loaded."""
    ranks = RankGroup.start(options)
    try:
        model, pool = load_shard(
            options, planned, Shard(0, options.tp), partial(LeaderModel, ranks)
        )
        ranks.wait_for("loaded")
    except EngineError:
        ranks.close()
        raise
    except Exception as error:
        message = ranks.explain(error, wait=0.5)
        ranks.close()
        raise EngineError(message) from error
    # Eager decode: a step's calls to the other ranks (pipe writes, broadcasts) cannot be
    # captured in a CUDA graph.
    engine = new_engine(options, model, pool, cuda_graphs=False)
    ranks.on_failure.insert(0, engine.abort)
    if ranks.failure is not None:
        engine.abort(ranks.failure)
    return engine


# ---------------------------------------------------------------------------------------------
# One call's tensors, as rank 0 sends them and a worker rebuilds them


def describe_call(
    tokens: torch.Tensor, batch: ForwardBatch
) -> tuple[dict[str, Any], torch.Tensor | None, list[torch.Tensor]]:
    """The header (every field's kind, dtype, shape), the integer and boolean tensors packed in
    one int64 buffer, and the floating-point ones (each broadcast in its own dtype)."""
    values: dict[str, Any] = {"tokens": tokens}
    values.update((f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch))
    described: dict[str, dict[str, Any]] = {}
    integers: list[torch.Tensor] = []
    floats: list[torch.Tensor] = []
    for name, value in values.items():
        if value is None:
            described[name] = {"kind": "none"}
        elif isinstance(value, torch.Tensor):
            kind = "float" if value.is_floating_point() else "int"
            described[name] = {
                "kind": kind,
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
            }
            (floats if kind == "float" else integers).append(value)
        elif isinstance(value, bool | int | float | str):
            described[name] = {"kind": "value", "value": value}
        elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
            described[name] = {"kind": "ints", "value": list(value)}
        else:
            raise EngineError(
                f"ForwardBatch.{name} ({type(value).__name__}) cannot be sent to other ranks"
            )
    packed = torch.cat([t.reshape(-1).to(torch.int64) for t in integers]) if integers else None
    return {"op": "forward", "fields": described}, packed, floats


def receive_call(
    header: dict[str, Any], shard: Shard, device: torch.device
) -> tuple[torch.Tensor, ForwardBatch]:
    described: dict[str, dict[str, Any]] = header["fields"]
    integers = [(n, d) for n, d in described.items() if d["kind"] == "int"]
    values: dict[str, Any] = {}
    if integers:
        total = sum(math.prod(d["shape"]) for _, d in integers)
        packed = shard.broadcast(torch.empty(total, dtype=torch.int64, device=device))
        offset = 0
        for name, d in integers:
            count = math.prod(d["shape"])
            piece = packed[offset : offset + count].view(d["shape"])
            values[name] = piece.to(getattr(torch, d["dtype"]))
            offset += count
    for name, d in described.items():
        if d["kind"] == "float":
            empty = torch.empty(d["shape"], dtype=getattr(torch, d["dtype"]), device=device)
            values[name] = shard.broadcast(empty)
        elif d["kind"] == "none":
            values[name] = None
        elif d["kind"] == "value":
            values[name] = d["value"]
        elif d["kind"] == "ints":
            values[name] = tuple(d["value"])
    tokens = values.pop("tokens")
    return tokens, ForwardBatch(**values)


def _frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return _FRAME.pack(len(data)) + data


def _read_exactly(pipe: IO[bytes], count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = pipe.read(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_frame(pipe: IO[bytes]) -> dict[str, Any] | None:
    """The next message from rank 0; None when its end of the pipe is closed."""
    size = _read_exactly(pipe, _FRAME.size)
    if size is None:
        return None
    data = _read_exactly(pipe, _FRAME.unpack(size)[0])
    return None if data is None else json.loads(data)


# ---------------------------------------------------------------------------------------------
# A worker rank (`python -m neuron_agent.torch_engine.ranks`)


def _exit_with_parent(parent: int) -> None:
    """A worker stuck in a collective never reads its pipe again: watch the parent too."""
    while True:
        time.sleep(0.25)
        if os.getppid() != parent:
            os._exit(1)


def serve(model: LlamaModel, pool: Any, shard: Shard, device: torch.device) -> None:
    """Run every call rank 0 sends until it says stop or goes away."""
    pipe = sys.stdin.buffer
    no_logits = torch.empty(0, dtype=torch.long, device=device)
    with torch.inference_mode():
        while True:
            header = _read_frame(pipe)
            if header is None or header.get("op") == "stop":
                return
            tokens, batch = receive_call(header, shard, device)
            model(tokens, batch, pool.layers, no_logits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m neuron_agent.torch_engine.ranks",
        description="One worker rank of a tensor-parallel torch-engine model. Rank 0 starts "
        "these itself; they are not meant to be started by hand.",
    )
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True, help="rank 0's TCPStore port")
    parser.add_argument("--options", required=True, help="the EngineOptions, as JSON")
    parser.add_argument("--label", default="", help="the model (shown to the neuron)")
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    threads = os.environ.get("CORTEX_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    fields = json.loads(args.options)
    fields["checkpoint"] = Path(fields["checkpoint"])
    if fields.get("tokenizer_dir") is not None:
        fields["tokenizer_dir"] = Path(fields["tokenizer_dir"])
    fields["devices"] = tuple(fields["devices"])
    options = EngineOptions(**fields)
    rank = args.rank
    store = dist.TCPStore(
        "127.0.0.1", args.store_port, options.tp, is_master=False, timeout=timedelta(seconds=60)
    )
    shard = Shard(rank, options.tp)
    try:
        device = options.device_of(rank)
        planned = plan(options)
        store.set(f"joined/{rank}", "1")
        join_process_group(shard, store, device)
        model, pool = load_shard(options, planned, shard)
        store.set(f"loaded/{rank}", "1")
    except Exception as error:
        store.set(f"error/{rank}", str(error) if isinstance(error, EngineError) else repr(error))
        raise SystemExit(1) from None
    try:
        serve(model, pool, shard, device)
    finally:
        leave_process_group()
        # Nothing to flush or save: skip the interpreter's slow teardown of torch (seconds),
        # so an unload's memory check sees this process gone at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

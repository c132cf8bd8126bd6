"""`x-llama serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one checkpoint, with continuous batching.

    x-llama serve --checkpoint runs/x_llama/cpu --host 127.0.0.1 --port 8000 [--api_key KEY | $AXON_API_KEY]

Endpoints: GET /health, GET /v1/models, POST /v1/completions (OpenAI's completions API, streaming as server-sent
events), POST /input (praxis style: {"prompt", transformers generate() keyword arguments} -> {"response"}).

Batching (`Engine`): one thread owns the model and one `KVCache` whose rows are the sequences being decoded (the
main thread under `x-llama serve`, see `serve_command`; a thread of its own under `create_app`'s default). Each loop iteration (1) drops rows whose client went away, (2) prefills every waiting request that fits
(left-padded, in one forward) and writes its rows into free rows of the running cache, (3) runs one decode step
for all rows. So a request arriving while others decode joins at the next step (continuous batching). The cache's
slot axis is shared by all rows (`KVCache.length`): a row occupies the slots [length - used, length), its earlier
slots are False in `key_mask` and it keeps its own RoPE position (`next_position`), so every row decodes as it would
alone (`test_serve.py` checks greedy outputs against `generate`). A joining row is right-aligned on that axis (the
running rows shift right for a longer prompt); when the slots run out the cache is compacted (shifted left by the
free prefix all rows share).

With `--compile true` each decoding step of up to `compile_max_rows` rows runs as one compiled graph
(`Llama.decode_step`), whose shapes are fixed: the cache has the next power of two (or compile_max_rows) rows, the
ones no request holds being free rows that are decoded and never read, so a server compiles log2(compile_max_rows) + 1
graphs or fewer, all of them when it starts (`Engine.warm_up`). A row that finishes frees its cache row in place and
a joining request is written into a free row (`_place`): the cache is copied only when the active rows cross into
another batch size. Larger batches, and the prefill of new requests (whose length varies with each prompt), run
eagerly: the compiled step attends over all of the cache's slots and pads the rows, which costs more than it saves
once a step is mostly matrix products (README, "Serving").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from torch import Tensor

from axon_shared.config import AxonConfig, ConfigError, require, require_positive

from .generation import left_pad, sample_next
from .model import KVCache, Llama

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit on completions' `logprobs`
DRAIN_LIMIT = 128 * 1024 * 1024  # a too-large body is read and discarded up to this size (then the connection is closed)


@dataclass
class ServeConfig(AxonConfig):
    """`x-llama serve`: an OpenAI-compatible HTTP API over a run directory (or checkpoint file)."""

    checkpoint: str = "runs/x_llama/cpu"
    host: str = "127.0.0.1"  # loopback only by default; 0.0.0.0 exposes the server to the network
    port: int = 8000
    api_key: str | None = None  # None = $AXON_API_KEY if set, else no authentication
    max_batch: int = 32  # rows (sequences) decoded together; a request with n choices takes n rows
    max_queue: int = 256  # requests waiting for a row; beyond this the server answers 503
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    compile: bool = False  # decode each step as one compiled graph (Llama.decode_step); compiles at start-up
    compile_max_rows: int = 8  # with compile: steps of more rows run eagerly (README: where compiling stops paying)
    device: str = "cpu"
    log_level: str = "info"

    def validate(self) -> None:
        require(0 <= self.port <= 65535, self, "port", "must be in [0, 65535] (0 = any free port)")
        require_positive(self, "max_batch", "max_queue", "max_body_bytes", "compile_max_rows")
        require(bool(self.host), self, "host", "must not be empty")
        require(self.api_key is None or len(self.api_key) > 0, self, "api_key", "must not be empty (or null for none)")
        require(self.log_level in ("critical", "error", "warning", "info", "debug"), self, "log_level", "must be a uvicorn log level")


class RequestError(Exception):
    """A bad request: becomes {"error": {"message", "type", "param", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 503: "server_busy"}
        return {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


# ---- the engine ------------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = no log-probs; k >= 0 = the sampled token's, plus the top k
    seed: int | None = None


@dataclass
class Row:
    """One sequence being decoded (a request's choice): its tokens, text and cache bookkeeping."""

    job: Job
    index: int
    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator
    prefix: str = ""
    new: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    used: int = 0  # cache slots this row fills (prompt + fed tokens)
    slot: int = -1  # the cache row it decodes in (Engine.slots)
    last_token: int = 0  # sampled, not yet fed
    finished: bool = False


class Job:
    """A request: its rows, and the asyncio queue the engine thread reports to (events: ("token", index, delta,
    info), ("done", index, finish_reason, n_tokens), ("error", message))."""

    def __init__(self, prompt: list[int], sampling: Sampling, n: int, loop: asyncio.AbstractEventLoop, device):
        self.loop, self.queue = loop, asyncio.Queue()
        self.cancelled = threading.Event()
        self.prompt, self.sampling, self.n = prompt, sampling, n
        self.rows = []
        for index in range(n):
            seed = secrets.randbits(63) if sampling.seed is None else sampling.seed + index
            generator = torch.Generator(device=device).manual_seed(seed)
            self.rows.append(Row(self, index, prompt, sampling, generator))

    def emit(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


def _shift_right(cache: KVCache, shift: int) -> None:
    """Move slots [0, length) to [shift, length + shift) in every row; the freed slots become padding."""
    if shift <= 0:
        return
    n = cache.length
    cache.k[:, :, :, shift : n + shift] = cache.k[:, :, :, :n].clone()
    cache.v[:, :, :, shift : n + shift] = cache.v[:, :, :, :n].clone()
    cache.key_mask[:, shift : n + shift] = cache.key_mask[:, :n].clone()
    cache.key_mask[:, :shift] = False
    cache.length = n + shift


def _shift_left(cache: KVCache, shift: int) -> None:
    """Drop slots [0, shift) (padding in every row) and move the rest to the front."""
    if shift <= 0:
        return
    n = cache.length
    cache.k[:, :, :, : n - shift] = cache.k[:, :, :, shift:n].clone()
    cache.v[:, :, :, : n - shift] = cache.v[:, :, :, shift:n].clone()
    cache.key_mask[:, : n - shift] = cache.key_mask[:, shift:n].clone()
    cache.length = n - shift


def _rebuild(cache: KVCache, k: Tensor, v: Tensor, key_mask: Tensor, next_position: Tensor) -> KVCache:
    out = KVCache.__new__(KVCache)
    out.k, out.v, out.key_mask, out.next_position = k, v, key_mask, next_position
    out.length, out.has_padding, out.shared_positions = cache.length, True, False
    return out


def _select(cache: KVCache, rows: list[int]) -> KVCache:
    index = torch.tensor(rows, device=cache.k.device)
    return _rebuild(cache, cache.k[:, index], cache.v[:, index], cache.key_mask[index], cache.next_position[index])


def _pad_rows(cache: KVCache, size: int) -> KVCache:
    """The cache with free rows added up to `size` (a compiled step's batch size). A free row is decoded and never
    read: zero keys and values, every slot masked (decode_step unmasks each new slot, so no row's softmax is empty),
    RoPE position 0. Its logits are dropped, and a joining request is written into it (`_place`)."""
    extra = size - cache.batch_size
    if extra <= 0:
        return cache
    k_pad = cache.k.new_zeros(cache.k.shape[:1] + (extra,) + cache.k.shape[2:])  # (L, extra, H_kv, S, d)
    mask_pad = cache.key_mask.new_zeros(extra, cache.max_len)  # (extra, S): all False
    positions_pad = cache.next_position.new_zeros(extra)
    k = torch.cat((cache.k, k_pad), 1)  # (L, size, H_kv, S, d): the real rows first, as the tokens are
    v = torch.cat((cache.v, k_pad), 1)
    return _rebuild(cache, k, v, torch.cat((cache.key_mask, mask_pad)), torch.cat((cache.next_position, positions_pad)))


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a compiled server decodes at: powers of two below max_batch, and max_batch."""
    return [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch] + [max_batch]


def _place(cache: KVCache, rows: list[int], new: KVCache) -> None:
    """Write the rows of `new` (a prefill's cache, new.length <= cache.length) into the free rows `rows` of `cache`, in
    place and right-aligned on its slot axis: their slots [length - new.length, length) take the new keys, values and
    key mask, every earlier slot is masked, and they take the new rows' RoPE positions. Nothing else is copied."""
    index = torch.tensor(rows, device=cache.k.device)
    start, end, filled = cache.length - new.length, cache.length, new.length
    cache.k[:, index, :, start:end] = new.k[:, :, :, :filled]  # (L, rows, H_kv, filled, d)
    cache.v[:, index, :, start:end] = new.v[:, :, :, :filled]
    cache.key_mask[index] = False
    cache.key_mask[index, start:end] = new.key_mask[:, :filled]
    cache.next_position[index] = new.next_position


class Engine:
    """The scheduler: one thread owns the model and decodes every active row together (module docstring)."""

    def __init__(
        self, model: Llama, tokenizer, max_batch: int = 32, max_queue: int = 256, compile: bool = False, compile_max_rows: int = 8
    ):
        if model.config.router == "mod":  # its per-layer key masks (cache.extra) are not shifted/joined by this engine
            raise ConfigError(
                "x-llama serve does not batch Mixture-of-Depths models yet (router=mod keeps per-layer key masks the "
                "continuous-batching cache moves do not carry); use x-llama generate"
            )
        unsupported = model.decode_step_unsupported() if compile else {}
        if unsupported:
            raise ConfigError(
                f"ServeConfig.compile=True decodes with Llama.decode_step, which runs the standard Llama block; this model "
                f"has {unsupported}: serve it with --compile false"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.compile = compile
        self.sizes = batch_sizes(min(max_batch, compile_max_rows)) if compile else []  # the compiled step's batch sizes
        self.device = model.tok_embeddings.weight.device
        self.rows: list[Row] = []  # the active rows, in the order they were admitted
        self.cache: KVCache | None = None
        self.slots: list[Row | None] = []  # per cache row: the row decoding there, or None (a free row)
        self.waiting: collections.deque[Job] = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.step_delay = 0.0  # seconds slept per decode step (tests: make a request slow enough to interrupt)
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "joined_while_decoding": 0, "cancelled": 0, "requests": 0, "tokens": 0}
        self.thread = threading.Thread(target=self.run, name="x-llama-engine", daemon=True)

    # ---- called from the server --------------------------------------------------------------------------------
    def start(self) -> None:
        """Warm up (with compile) and run the engine in its own thread (`create_app`'s default; `serve_command` calls
        `run` on the main thread instead, see there)."""
        if self.compile:
            self.warm_up()
        self.thread.start()

    def warm_up(self) -> float:
        """Compile the decoding step for every batch size now (5-10 s each for the `cpu` preset on 2 threads), so that no
        request waits for a compile; returns the seconds spent. Runs in inference mode, as the engine thread does:
        the graphs' guards include the grad mode."""
        started = time.perf_counter()
        with torch.inference_mode():
            for size in self.sizes:
                cache = self.model.new_cache(size)
                self.model.decode_step(torch.zeros(size, 1, dtype=torch.long, device=self.device), cache, compile=True)
        seconds = time.perf_counter() - started
        print(f"x-llama serve: compiled the decoding step for batch sizes {self.sizes} in {seconds:.0f} s", file=sys.stderr)
        return seconds

    def stop(self) -> None:
        """Ask `run` to return, and wait for the engine's own thread if it has one."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise RequestError(503, f"the server is busy: {len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(job)
            self.stats["requests"] += 1
            self.condition.notify()

    def snapshot(self) -> dict:
        with self.condition:
            return {"active_rows": len(self.rows), "waiting": len(self.waiting), **self.stats}

    # ---- the engine thread -------------------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop (module docstring), in the calling thread, until `stop`."""
        with torch.inference_mode():
            while True:
                with self.condition:
                    if self.stopping:
                        break
                    self._drop_cancelled()
                    if not self.rows and not self.waiting:
                        self.condition.wait(timeout=0.5)
                        continue
                    admitted = self._admit()
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self.rows:
                        self._step()
                except Exception as error:  # keep serving: fail the requests in flight, start over
                    jobs = {id(row.job): row.job for row in self.rows} | {id(job): job for job in admitted}
                    for job in jobs.values():
                        job.emit(("error", f"generation failed: {type(error).__name__}: {error}"))
                    with self.condition:
                        self.rows, self.cache, self.slots = [], None, []
        with self.condition:
            for job in list(self.waiting) + [r.job for r in self.rows]:
                job.emit(("error", "the server is shutting down"))

    def _drop_cancelled(self) -> None:
        if any(job.cancelled.is_set() for job in self.waiting):
            self.stats["cancelled"] += sum(job.cancelled.is_set() for job in self.waiting)
            self.waiting = collections.deque(job for job in self.waiting if not job.cancelled.is_set())
        gone = [row for row in self.rows if row.job.cancelled.is_set()]
        if gone:
            self.stats["cancelled"] += len({id(row.job) for row in gone})
            for row in gone:
                row.finished = True
            self._remove_finished()

    def _admit(self) -> list[Job]:
        """Waiting jobs (first come, first served) while their rows fit in max_batch."""
        admitted, free = [], self.max_batch - len(self.rows)
        while self.waiting and self.waiting[0].n <= free:
            job = self.waiting.popleft()
            admitted.append(job)
            free -= job.n
        return admitted

    def _capacity(self, rows: int) -> int:
        """How many cache rows `rows` active rows take: the smallest compiled batch size that holds them (the rest are
        free rows), or exactly `rows` when the step runs eagerly (no compile, or more than compile_max_rows)."""
        return next((size for size in self.sizes if size >= rows), rows)

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the admitted requests in one left-padded forward, write their rows into free cache rows (growing
        the cache only when too few are free), and sample their first tokens."""
        rows = [row for job in jobs for row in job.rows]
        tokens, mask = left_pad([row.prompt for row in rows], device=self.device)
        prefill = self.model.new_cache(len(rows))
        logits = self.model(tokens, cache=prefill, attention_mask=mask, last_only=True)[:, -1]  # (new rows, V)
        for row in rows:
            row.used = len(row.prompt)
            row.prefix = self.tokenizer.decode(row.prompt)
        with self.condition:
            if self.cache is None:  # an idle engine: start from a cache of no rows, grown below
                empty = self.model.new_cache(0)
                self.cache, self.slots = _rebuild(empty, empty.k, empty.v, empty.key_mask, empty.next_position), []
            else:
                self.stats["joined_while_decoding"] += len(jobs)
                self._compact()
            free = [i for i, row in enumerate(self.slots) if row is None]
            if len(free) < len(rows):  # grow (a copy): the next compiled batch size, or the exact eager count
                size = self._capacity(len(self.rows) + len(rows))
                free += range(len(self.slots), size)
                self.cache, self.slots = _pad_rows(self.cache, size), self.slots + [None] * (size - len(self.slots))
            _shift_right(self.cache, prefill.length - self.cache.length)  # a longer prompt: the running rows move right
            _place(self.cache, free[: len(rows)], prefill)
            for slot, row in zip(free, rows):
                row.slot, self.slots[slot] = slot, row
            self.rows += rows
            self.stats["prefills"] += 1
            self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))
        self._sample(logits, rows, range(len(rows)))
        self._remove_finished()

    def _step(self) -> None:
        """One decoding step for every cache row (free rows included, their logits unread); sample the active rows."""
        self._compact()
        tokens = torch.tensor([[row.last_token if row else 0] for row in self.slots], device=self.device)  # (cache rows, 1)
        if self.sizes and self.cache.batch_size <= self.sizes[-1]:  # one compiled graph at this batch size
            free = [slot for slot, row in enumerate(self.slots) if row is None]
            if free:  # a free row's RoPE position restarts at 0, so it never runs past the table
                self.cache.next_position[free] = 0
            logits = self.model.decode_step(tokens, self.cache, compile=True)
        else:  # eager: the cache holds exactly the active rows
            logits = self.model(tokens, cache=self.cache)[:, -1]
        for row in self.rows:
            row.used += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        self.stats["steps"] += 1
        self._sample(logits, self.rows, [row.slot for row in self.rows])
        self._remove_finished()

    def _compact(self) -> None:
        """Drop the padding slots every row has at the front: keeps `length` = the longest row."""
        if self.cache is not None and self.rows:
            _shift_left(self.cache, self.cache.length - max(row.used for row in self.rows))

    def _remove_finished(self) -> None:
        """Free the cache rows of finished rows in place. The cache is copied only when the active rows fit a smaller
        capacity (a smaller compiled batch size, or one row fewer in an eager step): then they move to the front."""
        if not any(row.finished for row in self.rows):
            return
        with self.condition:
            for row in self.rows:
                if row.finished:
                    self.slots[row.slot] = None
            self.rows = [row for row in self.rows if not row.finished]
            if not self.rows:
                self.cache, self.slots = None, []
            elif (size := self._capacity(len(self.rows))) < self.cache.batch_size:
                self.cache = _pad_rows(_select(self.cache, [row.slot for row in self.rows]), size)
                self.slots = self.rows + [None] * (size - len(self.rows))
                for slot, row in enumerate(self.rows):
                    row.slot = slot

    def _sample(self, logits: Tensor, rows: list[Row], index) -> None:
        """Sample each row's next token (its logits: logits[index[i]]) with its own parameters and generator; report
        text and finish."""
        for i, row in zip(index, rows):
            params = row.sampling
            row_logits = logits[i : i + 1]
            token = sample_next(row_logits, params.temperature, params.top_k, params.top_p, row.generator)
            token_id = int(token[0])
            info = None
            if params.logprobs is not None:
                scaled = row_logits.float() / (params.temperature if params.temperature > 0 else 1.0)
                logprobs = scaled.log_softmax(-1)[0]
                top = {}
                if params.logprobs > 0:
                    values, ids = logprobs.topk(params.logprobs)
                    top = {self._piece(int(t)): float(v) for v, t in zip(values, ids)}
                info = (self._piece(token_id), float(logprobs[token_id]), top)
            self._append(row, token_id, info)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.sp.id_to_piece(token_id).replace("\u2581", " ")

    def _append(self, row: Row, token_id: int, info) -> None:
        row.new.append(token_id)
        row.last_token = token_id
        self.stats["tokens"] += 1
        params, reason = row.sampling, None
        if token_id == self.tokenizer.eos_id:
            reason = "stop"
        text = self.tokenizer.decode(row.prompt + row.new)
        text = text[len(row.prefix) :] if text.startswith(row.prefix) else self.tokenizer.decode(row.new)
        hits = [pos for pos in (text.find(s) for s in params.stop) if pos >= 0]
        if hits:
            text, reason = text[: min(hits)], "stop"
        elif reason is None and len(row.new) >= params.max_tokens:
            reason = "length"
        row.text = text
        if reason is not None:
            safe = text
        else:  # hold back what could still become a stop sequence, and an incomplete UTF-8 character
            hold = max((len(s) for s in params.stop), default=1) - 1
            safe = text[: len(text) - hold].rstrip("\ufffd")
        delta = safe[len(row.emitted) :] if safe.startswith(row.emitted) and len(safe) > len(row.emitted) else ""
        row.emitted += delta
        row.job.emit(("token", row.index, delta, info))
        if reason is not None:
            row.finished = True
            row.job.emit(("done", row.index, reason, len(row.new)))


# ---- request parsing -------------------------------------------------------------------------------------------
_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object"}


def _get(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (null or missing = default); 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise RequestError(400, f"'{name}' must be {_KINDS[kind]}, got {type(value).__name__} {value!r:.40}", name, "invalid_type")
    return float(value) if kind is float else value


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise RequestError(400, f"'{name}' {message}", name, "invalid_value")


class Server:
    """The FastAPI application around an `Engine` (create with `create_app`)."""

    def __init__(self, model: Llama, tokenizer, model_id: str, cfg: ServeConfig, api_key: str | None):
        self.model, self.tokenizer, self.model_id, self.cfg, self.api_key = model, tokenizer, model_id, cfg, api_key
        self.context = model.config.max_seq_len
        self.engine = Engine(model, tokenizer, cfg.max_batch, cfg.max_queue, cfg.compile, cfg.compile_max_rows)
        self.created = int(time.time())

    # ---- bodies ------------------------------------------------------------------------------------------------
    async def read_json(self, request) -> dict:
        """The JSON object body: 413 over max_body_bytes, 400 if malformed or not an object."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                break
        if size > limit:
            raise RequestError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes", None, "body_too_large")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not valid JSON: {error}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
        return body

    def encode_prompt(self, body: dict, max_tokens_field: str) -> list[int]:
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError(400, "'prompt' is required", "prompt", "missing")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one
        _check(isinstance(prompt, str), "prompt", f"must be a string, got {type(prompt).__name__}")
        _check(prompt.strip() != "", "prompt", "must not be empty")
        ids = self.tokenizer.encode(prompt, bos=True)
        _check(
            len(ids) < self.context,
            "prompt",
            f"has {len(ids)} tokens; the model's context is {self.context} tokens, so at most {self.context - 1} leave room for a {max_tokens_field}",
        )
        return ids

    def check_max_tokens(self, name: str, value: int, prompt: list[int]) -> None:
        room = self.context - len(prompt)
        _check(value >= 1, name, f"must be >= 1, got {value}")
        _check(
            value <= room,
            name,
            f"={value} plus the prompt's {len(prompt)} tokens exceeds the model's context of {self.context} tokens; use at most {room}",
        )

    def parse_completion(self, body: dict) -> tuple[list[int], Sampling, int, bool, bool]:
        """(prompt ids, sampling, n, stream, stream_options.include_usage) of a /v1/completions body."""
        known = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "stream", "logprobs"}
        known |= {"echo", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "user", "stream_options"}
        for name in body:
            if name not in known:
                raise RequestError(400, f"unknown field '{name}'", name, "unknown_field")
        model = _get(body, "model", str)
        if model is not None and model != self.model_id:
            raise RequestError(404, f"model '{model}' does not exist; this server serves '{self.model_id}'", "model", "model_not_found")
        prompt = self.encode_prompt(body, "max_tokens")
        max_tokens = _get(body, "max_tokens", int, min(16, self.context - len(prompt)))
        self.check_max_tokens("max_tokens", max_tokens, prompt)
        temperature = _get(body, "temperature", float, 1.0)
        _check(temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {temperature}")
        top_p = _get(body, "top_p", float, 1.0)
        _check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
        top_k = _get(body, "top_k", int, None)
        _check(top_k is None or top_k >= -1, "top_k", f"must be > 0 (or -1/0 for no limit), got {top_k}")
        top_k = top_k if top_k is not None and top_k > 0 else None
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        _check(isinstance(stop, list) and all(isinstance(s, str) for s in stop), "stop", "must be a string or a list of strings")
        _check(len(stop) <= MAX_STOP, "stop", f"has {len(stop)} sequences; at most {MAX_STOP}")
        _check(all(stop), "stop", "must not contain empty strings")
        n = _get(body, "n", int, 1)
        _check(1 <= n <= self.cfg.max_batch, "n", f"must be in [1, max_batch={self.cfg.max_batch}], got {n}")
        seed = _get(body, "seed", int, None)
        stream = _get(body, "stream", bool, False)
        logprobs = _get(body, "logprobs", int, None)
        _check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        _check(not _get(body, "echo", bool, False), "echo", "is not supported")
        _check(_get(body, "best_of", int, n) == n, "best_of", "is not supported (must equal n)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_get(body, name, float, 0.0) == 0.0, name, "is not supported (must be 0)")
        _check(not _get(body, "logit_bias", dict, {}), "logit_bias", "is not supported")
        _check(not _get(body, "suffix", str, ""), "suffix", "is not supported")
        _get(body, "user", str)
        options = _get(body, "stream_options", dict, {})
        _check(not options or stream, "stream_options", "is only allowed with stream: true")
        include_usage = bool(options.get("include_usage", False))
        sampling = Sampling(max_tokens, temperature, top_p if top_p < 1 else None, top_k, tuple(stop), logprobs, seed)
        return prompt, sampling, n, stream, include_usage

    def parse_input(self, body: dict) -> tuple[list[int], Sampling]:
        """praxis' /input: transformers generate() keyword arguments (greedy unless do_sample)."""
        known = {
            "prompt",
            "max_new_tokens",
            "max_length",
            "temperature",
            "top_p",
            "top_k",
            "do_sample",
            "num_return_sequences",
            "num_beams",
        }
        known |= {"repetition_penalty", "seed"}
        for name in body:
            if name not in known:
                raise RequestError(400, f"unknown field '{name}' (supported: {sorted(known)})", name, "unknown_field")
        prompt = self.encode_prompt(body, "max_new_tokens")
        max_new = _get(body, "max_new_tokens", int, None)
        max_length = _get(body, "max_length", int, None)
        if max_new is None and max_length is not None:
            _check(max_length > len(prompt), "max_length", f"={max_length} leaves no room after the prompt's {len(prompt)} tokens")
            max_new, name = max_length - len(prompt), "max_length"
        else:
            max_new, name = (min(64, self.context - len(prompt)) if max_new is None else max_new), "max_new_tokens"
        self.check_max_tokens(name, max_new, prompt)
        do_sample = _get(body, "do_sample", bool, False)
        temperature = _get(body, "temperature", float, 1.0)
        _check(temperature >= 0, "temperature", f"must be >= 0, got {temperature}")
        top_p = _get(body, "top_p", float, 1.0)
        _check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
        top_k = _get(body, "top_k", int, 50)
        _check(top_k >= 0, "top_k", f"must be >= 0 (0 = no limit), got {top_k}")
        _check(_get(body, "num_return_sequences", int, 1) == 1, "num_return_sequences", "must be 1")
        _check(_get(body, "num_beams", int, 1) == 1, "num_beams", "must be 1 (no beam search)")
        _check(_get(body, "repetition_penalty", float, 1.0) == 1.0, "repetition_penalty", "is not supported (must be 1.0)")
        seed = _get(body, "seed", int, None)
        if not do_sample or temperature == 0:
            return prompt, Sampling(max_new, seed=seed)
        return prompt, Sampling(max_new, temperature, top_p if top_p < 1 else None, top_k or None, seed=seed)


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer <key>)"


class BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <api_key>` (else `reject()`, a 401).
    Plain ASGI rather than `@app.middleware`, which would wrap `receive` and hide client disconnects."""

    def __init__(self, app, api_key: str, reject):
        self.app, self.key, self.reject = app, api_key.encode(), reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await self.reject()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    model: Llama, tokenizer, model_id: str, cfg: ServeConfig | None = None, api_key: str | None = None, engine_thread: bool = True
):
    """The FastAPI app. With engine_thread, the engine (`app.state.server.engine`) runs in its own thread, started
    and stopped with the app's lifespan; otherwise the caller runs `engine.run()` and the lifespan's end stops it."""
    cfg = cfg or ServeConfig()
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer (tokenizer.model next to the checkpoint)")
    server = Server(model, tokenizer, model_id, cfg, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="x-llama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def error_response(error: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    if api_key is not None:
        app.add_middleware(
            BearerAuth, api_key=api_key, reject=lambda: error_response(RequestError(401, UNAUTHORIZED, None, "invalid_api_key"))
        )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(RequestError(error.status_code, f"{error.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        body = {
            "error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error", "param": None, "code": None}
        }
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **server.engine.snapshot()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": server.created, "owned_by": "x_llama", "max_model_len": server.context}
        return {"object": "list", "data": [card]}

    async def events(request: Request, job: Job):
        """The job's engine events; cancels the job (frees its rows) if the client goes away. A streaming response
        is cancelled by Starlette when its client disconnects; a plain one is checked here twice a second."""
        done, checked = 0, time.monotonic()
        try:
            while done < job.n:
                try:
                    event = await asyncio.wait_for(job.queue.get(), timeout=0.5)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event[0] == "error":
                    raise RuntimeError(event[1])
                done += event[0] == "done"
                yield event
        finally:
            job.cancel()

    def submit(prompt: list[int], sampling: Sampling, n: int) -> Job:
        job = Job(prompt, sampling, n, asyncio.get_running_loop(), server.engine.device)
        server.engine.submit(job)
        return job

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.read_json(request)
        prompt, sampling, n, stream, include_usage = server.parse_completion(body)
        job = submit(prompt, sampling, n)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model_id, "choices": choices, **extra}

        def logprobs_of(infos: list, offset: int) -> dict:
            offsets = []
            for piece, _, _ in infos:
                offsets.append(offset)
                offset += len(piece)
            return {
                "tokens": [i[0] for i in infos],
                "token_logprobs": [i[1] for i in infos],
                "top_logprobs": [i[2] for i in infos] if sampling.logprobs else None,
                "text_offset": offsets,
            }

        if stream:

            async def sse():
                offsets, counts = [0] * n, [0] * n
                try:
                    async for event in events(request, job):
                        if event[0] == "done":
                            counts[event[1]] = event[3]
                        if event[0] == "token":
                            _, index, delta, info = event
                            if not delta and info is None:
                                continue
                            lp = logprobs_of([info], offsets[index]) if info is not None else None
                            offsets[index] += len(info[0]) if info is not None else 0
                            choice = {"text": delta, "index": index, "logprobs": lp, "finish_reason": None}
                        else:
                            choice = {"text": "", "index": event[1], "logprobs": None, "finish_reason": event[2]}
                        yield f"data: {json.dumps(chunk([choice]))}\n\n"
                except RuntimeError as error:
                    yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                if include_usage:
                    usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(counts), "total_tokens": len(prompt) + sum(counts)}
                    yield f"data: {json.dumps(chunk([], usage=usage))}\n\n"
                yield "data: [DONE]\n\n"

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

        texts, infos, reasons, counts = [""] * n, [[] for _ in range(n)], [None] * n, [0] * n
        try:
            async for event in events(request, job):
                if event[0] == "token":
                    texts[event[1]] += event[2]
                    if event[3] is not None:
                        infos[event[1]].append(event[3])
                else:
                    reasons[event[1]], counts[event[1]] = event[2], event[3]
        except RuntimeError as error:
            return JSONResponse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}}, status_code=500)
        choices = [
            {
                "text": texts[i],
                "index": i,
                "logprobs": logprobs_of(infos[i], 0) if sampling.logprobs is not None else None,
                "finish_reason": reasons[i],
            }
            for i in range(n)
        ]
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(counts), "total_tokens": len(prompt) + sum(counts)}
        return chunk(choices, usage=usage)

    @app.post("/input")
    async def praxis_input(request: Request):
        body = await server.read_json(request)
        prompt, sampling = server.parse_input(body)
        job = submit(prompt, sampling, 1)
        text = ""
        try:
            async for event in events(request, job):
                if event[0] == "token":
                    text += event[2]
        except RuntimeError as error:
            return JSONResponse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}}, status_code=500)
        return {"response": text}

    return app


def resolve_api_key(cfg: ServeConfig) -> str | None:
    return cfg.api_key if cfg.api_key is not None else (os.environ.get("AXON_API_KEY") or None)


def serve_command(cfg: ServeConfig) -> None:
    """`x-llama serve`: load the checkpoint and serve it with uvicorn until interrupted.

    The engine runs on the main thread, the thread that loaded the model, and uvicorn's event loop on a second one
    (it does no tensor work). With PyTorch's OpenMP runtime (libgomp), each thread that runs parallel tensor
    operations keeps its own team of worker threads. When the workers of all teams outnumber the cores, libgomp stops
    letting them spin between parallel regions, and each of the compiled step's many small regions then waits for
    sleeping workers to wake. Run from a second thread, after the main thread had used its own team, the compiled
    `cpu` step took ~4 ms instead of ~1 ms on 2 cores (README, "Serving")."""
    import signal

    import uvicorn

    from axon_shared.checkpoint import run_checkpoints

    from .train import load_pretrained

    model, tokenizer, _ = load_pretrained(cfg.checkpoint, device=cfg.device)
    if tokenizer is None:
        raise ConfigError(f"ServeConfig.checkpoint={cfg.checkpoint!r}: no tokenizer.model next to it, so prompts cannot be encoded")
    run_dir, _ = run_checkpoints(cfg.checkpoint)
    model_id = Path(run_dir).resolve().name  # the run directory's name
    api_key = resolve_api_key(cfg)
    if api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {cfg.host} without an API key (set --api_key or $AXON_API_KEY)")
    app = create_app(model, tokenizer, model_id, cfg, api_key, engine_thread=False)
    engine = app.state.server.engine
    if engine.compile:
        engine.warm_up()
    http = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level))

    def serve_http() -> None:
        try:
            http.run()  # signal handlers are left to the main thread: Ctrl-C reaches the engine loop below
        finally:
            engine.stop()  # the server has stopped (or never started): end the engine loop

    web = threading.Thread(target=serve_http, name="x-llama-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the server as Ctrl-C does
    web.start()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        web.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    if not http.started:
        raise SystemExit(f"x-llama serve: the HTTP server did not start on {cfg.host}:{cfg.port} (see the error above)")

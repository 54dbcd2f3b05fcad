"""An HTTP JSON endpoint in front of a predictor, batching concurrent requests (``pip install 'bitfit-fast[serve]'``).

Requests from every connection wait in one bounded queue; a worker takes up to ``max_batch_size`` of them (or
what arrived within ``max_wait_ms`` of the first) and runs them as one batch in a thread of its own, so the event
loop keeps accepting connections while the model computes. Each example is checked before it joins a batch, so a
bad one (unknown task, text too long) is answered on its own and never joins a batch; an example the predictor
cannot answer gets its own error, and a batch whose prediction fails is run again example by example, so only the
example that fails it gets the error. The examples of a client that leaves before its answer are dropped from the
queue unpredicted. Starlette makes the app, uvicorn serves it.

Routes:
    GET  /health    {"status": "ok", "tasks": [...], "queued": waiting examples}, and where the predictor
                    describes its tasks, "details": {task: what it takes and answers}, and how it answers,
                    "serving": {"device": ..., "precision": ...}
    POST /predict   one example {"task": ..., "text": ..., "text_pair": ...}  ->  its prediction
                    or {"inputs": [example, ...]}                            ->  {"predictions": [...]}
Errors come back as {"error": "what is wrong and what to do"}: 400 a body that is not JSON, 422 an example the
predictor refuses, 413 a body over ``max_request_bytes`` or more examples than the whole queue holds (split them),
503 a full queue (retry), 500 a failed prediction, 404 and 405 another route or method. A body is read no further
than ``max_request_bytes``; the rest of a refused body is read and dropped (up to ``drain_bytes``), so that a
client that sends it whole before reading gets the 413, not a reset connection. The examples are checked (tokenised) in
``check_threads`` threads of their own, several requests at once, and a request whose strings hold more than
``large_text_chars`` characters in all in one more thread, one such request at a time: huge texts keep only each
other waiting, never other requests nor the batches.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .errors import first_line, quoted_keys


class RequestError(ValueError):
    """An example the predictor refuses; its message goes back to the client (status 422)."""


class Predictor(Protocol):
    """What the server runs: the task names it knows, a per-example check, and a batched prediction. A predictor
    may also have ``describe(task) -> dict``, what GET /health says of each task, and ``serving``, a dict of what
    it says of how every answer is computed."""

    tasks: Sequence[str]

    def check(self, example: object) -> dict:
        """The example as ``predict`` takes it; raises :class:`RequestError` for one it cannot answer. Called from
        worker threads, several at once: it must be thread-safe."""

    def predict(self, examples: list[dict]) -> list[dict | Exception]:
        """One JSON-ready answer per checked example, in order, or an exception for an example it cannot answer
        (its request alone gets the error, status 500)."""


DRAIN_SECONDS = 30.0  # the longest a refused body is drained, however slowly it trickles in (nginx's lingering_time)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """How the server groups requests into batches, and the largest request it reads."""

    max_batch_size: int = 64  # examples per predictor call
    max_wait_ms: float = 5.0  # how long the first example of a batch waits for others
    max_queue: int = 1024  # examples waiting; beyond it requests get 503 until the queue drains
    max_request_bytes: int = 8 * 2**20  # a larger body gets 413 before it is read whole
    check_threads: int = 4  # requests checked (tokenised) at once; the others wait their turn, the batches never
    # A request whose strings hold more characters in all is checked in a thread of its own, one at a time
    # (tokenising megabytes takes seconds): requests of huge texts wait for each other, never take the threads of
    # the others. Counted in characters, not bytes: a body of JSON's whitespace or escapes costs no tokenising.
    large_text_chars: int = 64 * 2**10
    # Of a refused body, how much is read and dropped before the 413 (each part arriving within drain_wait_s): a
    # client that sends its whole body before reading the answer (urllib, requests) would otherwise have the
    # connection reset under it and lose the 413 (nginx's lingering close). 0: refuse at once.
    drain_bytes: int = 64 * 2**20
    drain_wait_s: float = 1.0

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_request_bytes", "check_threads", "large_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "drain_bytes", "drain_wait_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")


class MicroBatcher:
    """Collects examples submitted from many requests into batches for one ``predict`` call at a time. ``waiting``
    counts the queued examples whose clients still wait: one that leaves (its future cancelled) frees its places at
    once, and its examples are dropped unpredicted when the worker meets them. A request is answered whole or not
    at all: its first example that fails cancels its others before the worker takes another batch."""

    def __init__(self, predict: Callable[[list[dict]], list], config: BatchingConfig,
                 executor: concurrent.futures.Executor | None = None):
        """``executor``: where ``predict`` runs (the event loop's default threads when None)."""
        self.predict = predict
        self.config = config
        self.executor = executor
        self.waiting = 0
        # (example, its future, the futures of its request's examples)
        self._queue: collections.deque[tuple[dict, asyncio.Future, list[asyncio.Future]]] = collections.deque()
        self._arrived = asyncio.Event()

    def submit(self, examples: list[dict]) -> list[asyncio.Future]:
        """Queue ``examples`` (all or none: raises ``asyncio.QueueFull`` when they do not all fit)."""
        if self.config.max_queue - self.waiting < len(examples):
            raise asyncio.QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in examples]
        for example, future in zip(examples, futures):
            future.add_done_callback(self._left)  # removed when the worker takes it: only a queued one leaves
            self._queue.append((example, future, futures))
        self.waiting += len(examples)
        self._arrived.set()
        return futures

    def _left(self, future: asyncio.Future) -> None:
        self.waiting -= 1

    async def _take(self, timeout: float | None = None) -> tuple[dict, asyncio.Future, list] | None:
        """The next queued example whose client still waits, or None after ``timeout`` seconds without one."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            while self._queue:
                example, future, request = self._queue.popleft()
                if not future.done():  # one whose client left, or whose request failed, is dropped here
                    future.remove_done_callback(self._left)
                    self.waiting -= 1
                    return example, future, request
            self._arrived.clear()
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                return None

    async def _next_batch(self) -> list[tuple[dict, asyncio.Future, list]]:
        batch = [await self._take()]
        deadline = asyncio.get_running_loop().time() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch_size:
            pending = await self._take(max(0.0, deadline - asyncio.get_running_loop().time()))
            if pending is None:
                break
            batch.append(pending)
        return batch

    async def _answer(self, examples: list[dict]) -> list:
        """The predictor's answers; when a batch fails, its examples again one by one, so the one that fails it
        gets the error and the others their answers."""
        try:
            return list(await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, examples))
        except Exception as error:
            if len(examples) == 1:
                return [error]
        return [answer for example in examples for answer in await self._answer([example])]

    async def run(self) -> None:
        """Serve batches until cancelled."""
        while True:
            batch = await self._next_batch()
            answers = await self._answer([example for example, _, _ in batch])
            if len(answers) != len(batch):  # the predictor's bug: its requests are told, and the worker serves on
                answers = [RuntimeError(f"the predictor gave {len(answers)} answers for {len(batch)} examples")
                           ] * len(batch)
            for (_, future, request), answer in zip(batch, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                    for other in request:  # now, before the next batch: the request's error answers it whole
                        other.cancel()
                else:
                    future.set_result(answer)


def _error(status: int, message: str, **headers):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def build_app(predictor: Predictor, config: BatchingConfig | None = None):
    """The Starlette app serving ``predictor`` (see the module docstring for its routes)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    config = config or BatchingConfig()
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Threads of their own: checks of huge texts, however many, never hold a batch up (nor batches a check).
        with concurrent.futures.ThreadPoolExecutor(1, "predict") as predicting, \
                concurrent.futures.ThreadPoolExecutor(config.check_threads, "check") as checking, \
                concurrent.futures.ThreadPoolExecutor(1, "check-large") as checking_large:
            state["batcher"] = batcher = MicroBatcher(predictor.predict, config, predicting)
            state["checking"], state["checking_large"] = checking, checking_large
            worker = asyncio.create_task(batcher.run())
            yield
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def health(request):
        answer = {"status": "ok", "tasks": list(predictor.tasks), "queued": state["batcher"].waiting}
        if hasattr(predictor, "describe"):
            answer["details"] = {task: predictor.describe(task) for task in predictor.tasks}
        if hasattr(predictor, "serving"):
            answer["serving"] = predictor.serving
        return JSONResponse(answer)

    async def read_body(request) -> bytes | None:
        """The request's body, or None past max_request_bytes (after :func:`drain`). Raises ClientDisconnect for
        a client that leaves before sending it whole."""
        declared = request.headers.get("content-length", "")
        stream = request.stream()
        if declared.isdigit() and int(declared) > config.max_request_bytes:
            await drain(request, stream)
            return None
        chunks, size = [], 0
        async for chunk in stream:
            size += len(chunk)
            if size > config.max_request_bytes:
                await drain(request, stream)
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def drain(request, stream) -> None:
        """Read and drop what comes of a refused body, up to drain_bytes and for at most DRAIN_SECONDS, while
        each part arrives within drain_wait_s; nothing from a client that waits for our word before sending it
        (Expect: 100-continue)."""
        if request.headers.get("expect", "").lower() == "100-continue":
            return
        drained, deadline = 0, time.monotonic() + DRAIN_SECONDS
        with contextlib.suppress(StopAsyncIteration, asyncio.TimeoutError, ClientDisconnect):
            while drained < config.drain_bytes and time.monotonic() < deadline:
                wait = min(config.drain_wait_s, deadline - time.monotonic())
                drained += len(await asyncio.wait_for(anext(stream), wait))

    async def predict(request):
        try:
            body = await read_body(request)
        except ClientDisconnect:  # not the server's failure: nothing to log, and no one to answer
            return _error(499, "the client left before sending its request whole")
        if body is None:
            return _error(413, f"the request is larger than {config.max_request_bytes} bytes, the most this server "
                               "reads: split it, or shorten its texts")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than Python parses
            reason = first_line(error) if isinstance(error, ValueError) else "nested too deep"
            return _error(400, f"the body is not JSON ({reason}): send {{\"task\": ..., \"text\": ...}} "
                               "or {\"inputs\": [...]}")
        single = not (isinstance(body, dict) and "inputs" in body)
        examples = [body] if single else body["inputs"]
        if not isinstance(examples, list) or not examples:
            return _error(422, '"inputs" must be a non-empty list of examples')
        if not single and len(body) > 1:  # a misspelled option beside it would be ignored, silently
            unknown = sorted(set(body) - {"inputs"})
            return _error(422, f"unknown key{'s' if len(unknown) > 1 else ''} {quoted_keys(unknown)} "
                               "beside \"inputs\": send {\"inputs\": [...]} alone")
        if len(examples) > config.max_queue:  # it would never fit: a 503 would have the client retry forever
            return _error(413, f"{len(examples)} examples in one request; this server queues at most "
                               f"{config.max_queue}: split them into several requests")
        def check():
            """The checked examples, or the error response of the first that fails."""
            checked = []
            for index, example in enumerate(examples):
                try:
                    checked.append(predictor.check(example))
                except RequestError as error:
                    return _error(422, str(error) if single else f"inputs[{index}]: {error}")
                except Exception as error:  # the predictor's own failure, answered as JSON like every error
                    return _error(500, f"checking {'the example' if single else f'inputs[{index}]'} failed: "
                                       f"{first_line(error)}")
            return checked

        # Tokenising a long text: the event loop serves others meanwhile.
        characters = sum(len(value) for example in examples if isinstance(example, dict)
                         for value in example.values() if isinstance(value, str))
        checking = state["checking_large" if characters > config.large_text_chars else "checking"]
        checked = await asyncio.get_running_loop().run_in_executor(checking, check)
        if not isinstance(checked, list):
            return checked
        try:
            futures = state["batcher"].submit(checked)
        except asyncio.QueueFull:
            waiting = state["batcher"].waiting
            return _error(503, f"the server is busy ({waiting} examples waiting, at most {config.max_queue}): retry "
                               "shortly", **{"Retry-After": "1"})
        answers = asyncio.gather(*futures)
        left = asyncio.ensure_future(client_left(request))
        await asyncio.wait((answers, left), return_when=asyncio.FIRST_COMPLETED)
        if not answers.done():  # its examples are dropped as the batcher meets them, unpredicted
            answers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answers  # retrieved: asyncio would log a cancelled gather that no one awaited
            return _error(499, "the client left before its answer")  # read by no one
        left.cancel()
        try:
            answers = answers.result()
        except Exception as error:  # its other examples are cancelled (MicroBatcher)
            return _error(500, f"the prediction failed: {first_line(error)}")
        try:
            return JSONResponse(answers[0] if single else {"predictions": answers})
        except ValueError as error:  # NaN or infinity, which JSON cannot carry
            return _error(500, f"the prediction is not valid JSON ({first_line(error)}): the model's output is not "
                               "a finite number")

    async def client_left(request) -> None:
        """Returns once the client has closed its connection (its body was read whole before)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def unknown_route(request, error: HTTPException):  # 404 and 405 as JSON too, with their headers (Allow)
        return _error(error.status_code, f"{error.detail}: this server answers GET /health and POST /predict",
                      **(error.headers or {}))

    return Starlette(routes=[Route("/health", health), Route("/predict", predict, methods=["POST"])],
                     lifespan=lifespan, exception_handlers={HTTPException: unknown_route})


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, config: BatchingConfig | None = None):
    """Serve ``predictor`` over HTTP until interrupted."""
    import uvicorn

    uvicorn.run(build_app(predictor, config), host=host, port=port, log_level="info")

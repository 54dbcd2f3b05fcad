"""The HTTP server on localhost: concurrent requests are batched and each gets its own answer; every bad request
gets a status and a message that names the problem; a full queue answers 503; an example that fails its batch
fails alone."""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from bitfit_fast import server
from bitfit_fast.server import BatchingConfig, MicroBatcher, RequestError, build_app


class EchoPredictor:
    """Answers {"task", "text"} examples with the text upper-cased or its length; records every batch."""

    tasks = ("upper", "length")

    def __init__(self, gate: threading.Event | None = None):
        self.batches = []
        self.texts = []
        self.gate = gate
        self.waiting = threading.Event()  # set once a batch waits at the gate

    def check(self, example):
        if not isinstance(example, dict) or not isinstance(example.get("text"), str):
            raise RequestError('an example is {"task": ..., "text": "..."}')
        if example.get("task") not in self.tasks:
            raise RequestError(f"unknown task {example.get('task')!r}: this server knows {list(self.tasks)}")
        if len(example["text"]) > 20:
            raise RequestError(f"the text is {len(example['text'])} characters; at most 20")
        if example["text"] == "bug":
            raise TypeError("the check itself failed")
        return example

    def predict(self, examples):
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait(timeout=30)
        self.batches.append(len(examples))
        self.texts += [e["text"] for e in examples]
        if any(e["text"] == "boom" for e in examples):
            raise RuntimeError("the model ran out of memory")
        return [dict(task=e["task"], answer=float("nan") if e["text"] == "nan" else
                     e["text"].upper() if e["task"] == "upper" else len(e["text"])) for e in examples]


@contextlib.contextmanager
def running(predictor, config: BatchingConfig):
    listening = socket.socket()  # bound here and handed over: no other process takes the port in between
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(predictor, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[listening]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listening.close()
        assert not thread.is_alive(), "the server did not stop"


def test_concurrent_mixed_requests_are_batched_and_each_answered():
    predictor = EchoPredictor()
    examples = [dict(task=("upper", "length")[i % 2], text="word" * (i % 5 + 1)) for i in range(48)]
    with running(predictor, BatchingConfig(max_batch_size=8, max_wait_ms=50)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda e: client.post("/predict", json=e), examples))
            several = client.post("/predict", json={"inputs": examples[:3]})
            health = client.get("/health").json()
    for example, answer in zip(examples, answers):
        expected = example["text"].upper() if example["task"] == "upper" else len(example["text"])
        assert answer.status_code == 200 and answer.json() == dict(task=example["task"], answer=expected)
    assert several.json() == {"predictions": [a.json() for a in answers[:3]]}
    assert max(predictor.batches) <= 8 and max(predictor.batches) > 1, f"batches: {predictor.batches}"
    assert sum(predictor.batches) == 51
    assert health == {"status": "ok", "tasks": ["upper", "length"], "queued": 0}


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "the body is not JSON"),
    (b'{"task": "lower", "text": "a"}', 422, "unknown task 'lower': this server knows ['upper', 'length']"),
    (b'{"task": "upper", "text": "a very long text of words"}', 422, "the text is 25 characters; at most 20"),
    (b'{"inputs": [{"task": "upper", "text": "a"}, {"task": "upper"}]}', 422,
     'inputs[1]: an example is {"task": ..., "text": "..."}'),
    (b'{"inputs": []}', 422, '"inputs" must be a non-empty list of examples'),
    (b'{"inputs": 5}', 422, '"inputs" must be a non-empty list of examples'),
    (b'{"inputs": [{"task": "upper", "text": "a"}], "top_k": 2}', 422,
     'unknown key \'top_k\' beside "inputs": send {"inputs": [...]} alone'),
    (b"5", 422, 'an example is {"task": ..., "text": "..."}'),
    (b'{"task": "upper", "text": "\xff"}', 400, "the body is not JSON"),  # not UTF-8
    (b'{"task": "length", "text": "nan"}', 500, "the prediction is not valid JSON (Out of range float values"),
    (b'{"task": "upper", "text": "boom"}', 500, "the prediction failed: the model ran out of memory"),
    (b'{"task": "upper", "text": "bug"}', 500, "checking the example failed: the check itself failed"),
    (b'{"inputs": [{"task": "upper", "text": "a"}, {"task": "upper", "text": "bug"}]}', 500,
     "checking inputs[1] failed: the check itself failed"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "the body is not JSON (nested too deep)"),  # deeper than Python parses
])
def test_bad_requests_get_a_status_and_a_message(body, status, message):
    predictor = EchoPredictor()
    with running(predictor, BatchingConfig(max_wait_ms=0)) as url:
        response = httpx.post(f"{url}/predict", content=body, timeout=30)
        assert response.status_code == status and message in response.json()["error"]
        assert httpx.post(f"{url}/predict", json=dict(task="upper", text="ok"), timeout=30).json()["answer"] == "OK"
    assert all(size == 1 for size in predictor.batches), "refused examples never reach the predictor"


def test_a_full_queue_answers_503_and_a_failed_batch_fails_only_its_requests():
    gate = threading.Event()
    predictor = EchoPredictor(gate)
    with running(predictor, BatchingConfig(max_batch_size=2, max_wait_ms=0, max_queue=2)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            first = pool.submit(client.post, "/predict", json=dict(task="upper", text="a"))  # taken: the gate holds it
            assert predictor.waiting.wait(timeout=30)
            deadline = time.monotonic() + 30
            queued = [pool.submit(client.post, "/predict", json=dict(task="upper", text=t)) for t in ("b", "boom")]
            while client.get("/health").json()["queued"] != 2:
                assert time.monotonic() < deadline
            refused = client.post("/predict", json=dict(task="length", text="c"))
            gate.set()
            answers = [first.result(), *(f.result() for f in queued)]
    assert refused.status_code == 503
    assert "the server is busy (2 examples waiting, at most 2): retry" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    assert answers[0].json() == dict(task="upper", answer="A")
    # "b" and "boom" ran as one batch, which failed; run again one by one, only "boom" fails.
    assert answers[1].json() == dict(task="upper", answer="B")
    assert answers[2].status_code == 500 and "ran out of memory" in answers[2].json()["error"]
    assert predictor.batches == [1, 2, 1, 1]


def test_a_request_that_does_not_fit_queues_none_of_its_examples():
    gate = threading.Event()
    predictor = EchoPredictor(gate)
    with running(predictor, BatchingConfig(max_batch_size=1, max_wait_ms=0, max_queue=3)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.post, "/predict", json=dict(task="upper", text="a"))  # held at the gate
            assert predictor.waiting.wait(timeout=30)
            deadline = time.monotonic() + 30
            queued = [pool.submit(client.post, "/predict", json=dict(task="upper", text=t)) for t in ("b", "c")]
            while client.get("/health").json()["queued"] != 2:
                assert time.monotonic() < deadline
            two = client.post("/predict", json={"inputs": [dict(task="upper", text=t) for t in ("d", "e")]})
            waiting = client.get("/health").json()["queued"]
            gate.set()
            answers = [first.result(), *(f.result() for f in queued)]
    assert two.status_code == 503 and waiting == 2, "one free slot: neither of the two examples is queued"
    assert [a.json()["answer"] for a in answers] == ["A", "B", "C"] and sorted(predictor.texts) == ["a", "b", "c"]


def test_a_batch_waits_max_wait_ms_from_its_first_example():
    """An example that arrives within max_wait_ms of the batch's first joins it, however long the server was idle
    before (the wait starts at the first example, not when the worker last looked)."""
    predictor = EchoPredictor()
    with running(predictor, BatchingConfig(max_batch_size=64, max_wait_ms=1500)) as url:
        time.sleep(1.6)
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/predict", json=dict(task="upper", text="a"))
            time.sleep(0.2)
            second = pool.submit(client.post, "/predict", json=dict(task="upper", text="b"))
            assert (first.result().json()["answer"], second.result().json()["answer"]) == ("A", "B")
    assert predictor.batches == [2]


def test_a_batch_closes_max_wait_ms_after_its_first_example():
    """Examples arriving one after another, each within max_wait_ms of the last, do not hold a batch open."""
    predictor = EchoPredictor()
    with running(predictor, BatchingConfig(max_batch_size=64, max_wait_ms=600)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = []
            for text in "abcdefghij":  # 1.5 s in all
                answers.append(pool.submit(client.post, "/predict", json=dict(task="upper", text=text)))
                time.sleep(0.15)
            assert [a.result().json()["answer"] for a in answers] == list("ABCDEFGHIJ")
    assert len(predictor.batches) >= 2 and sum(predictor.batches) == 10, f"batches: {predictor.batches}"


def test_examples_whose_client_left_are_not_predicted_and_the_batcher_serves_on():
    """A request cancelled while its examples wait (its client went away) leaves them out of their batch; one cancelled
    while its batch runs gets no answer (setting one on a cancelled future would end the batcher), and the next
    request is answered."""
    gate = threading.Event()
    predictor = EchoPredictor(gate)
    batcher = MicroBatcher(predictor.predict, BatchingConfig(max_batch_size=8, max_wait_ms=0))

    async def scenario():
        left, stays = batcher.submit([dict(task="upper", text="left"), dict(task="upper", text="stays")])
        left.cancel()
        worker = asyncio.create_task(batcher.run())
        gate.set()
        assert await asyncio.wait_for(stays, 10) == dict(task="upper", answer="STAYS")
        assert predictor.texts == ["stays"]

        gate.clear()
        predictor.waiting.clear()
        (running_batch,) = batcher.submit([dict(task="upper", text="running")])
        assert await asyncio.to_thread(predictor.waiting.wait, 10), "the batch reached the predictor"
        running_batch.cancel()
        gate.set()
        (after,) = batcher.submit([dict(task="length", text="after")])
        assert await asyncio.wait_for(after, 10) == dict(task="length", answer=5)
        assert predictor.texts == ["stays", "running", "after"]
        worker.cancel()

    asyncio.run(scenario())


def test_another_route_or_method_is_answered_in_json():
    with running(EchoPredictor(), BatchingConfig()) as url:
        wrong_method = httpx.get(f"{url}/predict", timeout=30)
        no_route = httpx.post(f"{url}/predictions", json={}, timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "Method Not Allowed: this server answers GET /health and POST /predict"}
    assert no_route.status_code == 404
    assert no_route.json() == {"error": "Not Found: this server answers GET /health and POST /predict"}


def test_a_request_larger_than_the_queue_is_told_to_split():
    predictor = EchoPredictor()
    with running(predictor, BatchingConfig(max_queue=3)) as url:
        many = httpx.post(f"{url}/predict", json={"inputs": [dict(task="upper", text="a")] * 4}, timeout=30)
        fitting = httpx.post(f"{url}/predict", json={"inputs": [dict(task="upper", text="a")] * 3}, timeout=30)
    assert many.status_code == 413
    assert many.json()["error"] == ("4 examples in one request; this server queues at most 3: split them into several "
                                    "requests")
    assert fitting.json() == {"predictions": [dict(task="upper", answer="A")] * 3}
    assert predictor.batches == [3]


def test_a_request_larger_than_max_request_bytes_gets_413_unread():
    predictor = EchoPredictor()
    with running(predictor, BatchingConfig(max_request_bytes=200)) as url:
        small = httpx.post(f"{url}/predict", json=dict(task="upper", text="ok"), timeout=30)
        large = httpx.post(f"{url}/predict", json={"inputs": [dict(task="upper", text="abc")] * 10}, timeout=30)

        def chunks():  # no Content-Length: the server stops reading past the limit
            yield b'{"inputs": ['
            yield b'{"task": "upper", "text": "abc"}, ' * 10
            yield b'{"task": "upper", "text": "abc"}]}'

        streamed = httpx.post(f"{url}/predict", content=chunks(), timeout=30)
    assert small.json()["answer"] == "OK"
    for refused in (large, streamed):
        assert refused.status_code == 413
        assert refused.json()["error"] == ("the request is larger than 200 bytes, the most this server reads: split "
                                           "it, or shorten its texts")
    assert predictor.texts == ["ok"]


def test_a_body_of_exactly_max_request_bytes_is_read_and_one_byte_more_is_not():
    body = b'{"task": "upper", "text": "ok"}'
    with running(EchoPredictor(), BatchingConfig(max_request_bytes=len(body))) as url:
        declared = httpx.post(f"{url}/predict", content=body, timeout=30)
        streamed = httpx.post(f"{url}/predict", content=iter([body[:10], body[10:]]), timeout=30)
        over = httpx.post(f"{url}/predict", content=iter([body[:10], body[10:] + b" "]), timeout=30)
    assert declared.json()["answer"] == "OK" and streamed.json()["answer"] == "OK"
    assert over.status_code == 413


def test_a_declared_length_over_the_limit_is_refused_without_waiting_for_a_body_that_does_not_come():
    # Content-Length past max_request_bytes: the server drops what comes of the body while it keeps coming, and
    # answers 413 once nothing comes for drain_wait_s, not waiting for a body the client may never send.
    with running(EchoPredictor(), BatchingConfig(max_request_bytes=100, drain_wait_s=0.2)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000\r\n\r\n" + b" " * 5000)
            try:
                reply = client.recv(4096)
            except TimeoutError:
                reply = b""
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]


def test_a_client_that_sends_its_whole_body_before_reading_gets_the_413_not_a_reset():
    # urllib sends the whole body first; had the server closed with it unread, the client would get a reset.
    body = b'{"task": "upper", "text": "' + b"a" * 16 * 2**20 + b'"}'
    with running(EchoPredictor(), BatchingConfig(max_request_bytes=1000)) as url:
        request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert httpx.post(f"{url}/predict", json=dict(task="upper", text="ok"), timeout=30).json()["answer"] == "OK"
    assert refused.value.code == 413
    assert json.load(refused.value)["error"].startswith("the request is larger than 1000 bytes")


def test_a_refused_body_that_trickles_in_is_drained_for_drain_seconds_at_most(monkeypatch):
    monkeypatch.setattr(server, "DRAIN_SECONDS", 0.5)
    with running(EchoPredictor(), BatchingConfig(max_request_bytes=100)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000\r\n\r\n" + b" " * 200)
            client.settimeout(0.1)
            start, reply = time.monotonic(), b""
            while not reply and time.monotonic() < start + 10:  # a byte every 0.1 s: never drain_wait_s apart
                client.sendall(b" ")
                with contextlib.suppress(TimeoutError):
                    reply = client.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]
    assert time.monotonic() - start < 5


def test_a_client_that_waits_to_be_told_to_send_is_refused_before_sending():
    # Expect: 100-continue: the 413 comes at once, with no "100 Continue" that would have the client upload it all.
    with running(EchoPredictor(), BatchingConfig(max_request_bytes=100)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
            reply = client.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]


class SlowCheckPredictor(EchoPredictor):
    """EchoPredictor (whose batches wait at ``gate``, if given) whose checks of the text "slow" wait until
    ``release``; ``slow_checks`` counts those that started."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(gate)
        self.release = threading.Event()
        self.slow_checks = threading.Semaphore(0)

    def check(self, example):
        if isinstance(example, dict) and example.get("text") == "slow":
            self.slow_checks.release()
            assert self.release.wait(timeout=60), "never released"
        return super().check(example)


def test_a_slow_check_keeps_its_own_request_waiting_not_the_others():
    # The checks (a tokeniser's work) run in a worker thread: while one request's check is busy, the event loop
    # answers the other requests. The slow check waits until the other request is answered, which would never
    # happen if the checks ran on the event loop.
    predictor = SlowCheckPredictor()
    with running(predictor, BatchingConfig(max_wait_ms=0)) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text="slow"), timeout=60)
        assert predictor.slow_checks.acquire(timeout=30)
        other = httpx.post(f"{url}/predict", json=dict(task="length", text="quick"), timeout=30)
        predictor.release.set()
        assert other.json()["answer"] == 5
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        assert slow.result().json()["answer"] == "SLOW"
    assert predictor.texts == ["quick", "slow"]


def test_requests_of_huge_texts_are_checked_one_at_a_time_and_keep_only_each_other_waiting():
    # Tokenising a text of megabytes takes seconds: four such requests once took every check thread, and a request
    # of one word waited a minute. A request of more than large_text_chars characters of text in all is checked in
    # a thread of its own; a batch of short texts whose body is larger for JSON's whitespace, with the others.
    predictor = SlowCheckPredictor()
    large = dict(task="upper", text="slow", note="n" * 2000)  # many characters: EchoPredictor reads only the text
    many = {"inputs": [dict(task="length", text="quick")] * 100}  # 1,100 characters in 4 kB of JSON
    with running(predictor, BatchingConfig(max_wait_ms=0, check_threads=1, large_text_chars=1600)) as url, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(httpx.post, f"{url}/predict", json=large, timeout=60) for _ in range(2)]
        assert predictor.slow_checks.acquire(timeout=30), "a large request's check started"
        quick = [httpx.post(f"{url}/predict", json=body, timeout=30)
                 for body in (dict(task="length", text="quick"), many)]
        assert not predictor.slow_checks.acquire(timeout=0.5), "the other large request waits its turn"
        predictor.release.set()
        assert quick[0].json()["answer"] == 5
        assert [answer["answer"] for answer in quick[1].json()["predictions"]] == [5] * 100
        assert [request.result().json()["answer"] for request in slow] == ["SLOW", "SLOW"]
    assert predictor.texts == ["quick"] * 101 + ["slow", "slow"]


def test_a_client_that_leaves_while_sending_its_request_is_not_an_error_of_the_server():
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logger = logging.getLogger("uvicorn.error")
    try:
        with running(EchoPredictor(), BatchingConfig()) as url:
            logger.addHandler(handler)  # once started: uvicorn's logging configuration resets the handlers
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as client:
                client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"task\":")
                time.sleep(0.3)
            assert httpx.post(f"{url}/predict", json=dict(task="upper", text="ok"), timeout=30).json()["answer"] == "OK"
    finally:
        logger.removeHandler(handler)
    assert not errors, [record.getMessage() for record in errors]


def test_checks_however_many_never_hold_a_queued_batch_up():
    """Predictions run in a thread of their own: more slow checks than the event loop's default threads (asyncio's
    to_thread pool, min(32, CPUs + 4)) once left a batch queued behind them with no thread to run in."""
    predictor = SlowCheckPredictor(threading.Event())
    slow_requests = 40  # more threads than the default pool has on any CI runner
    with running(predictor, BatchingConfig(max_batch_size=1, max_wait_ms=0, check_threads=2)) as url, \
            concurrent.futures.ThreadPoolExecutor(slow_requests + 2) as pool:
        first = pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text="first"), timeout=60)
        assert predictor.waiting.wait(timeout=30), "the first batch reached the predictor"
        queued = pool.submit(httpx.post, f"{url}/predict", json=dict(task="length", text="queued"), timeout=60)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health", timeout=30).json()["queued"] == 0:
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.01)
        slow = [pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text="slow"), timeout=60)
                for _ in range(slow_requests)]
        assert predictor.slow_checks.acquire(timeout=30), "a slow check started"
        time.sleep(0.5)  # the other slow checks take every thread they can
        predictor.gate.set()
        try:
            assert first.result(timeout=30).json() == dict(task="upper", answer="FIRST")
            assert queued.result(timeout=30).json() == dict(task="length", answer=6)
        finally:
            predictor.release.set()
        assert [request.result().json()["answer"] for request in slow] == ["SLOW"] * slow_requests


def test_a_client_that_leaves_before_its_answer_has_its_examples_dropped_unpredicted():
    """Over HTTP: a client that times out while its examples wait behind a batch leaves the queue empty again,
    and its examples are never predicted (a client that retries after a timeout would otherwise fill the queue
    with examples no one reads)."""
    gate = threading.Event()
    predictor = EchoPredictor(gate)
    with running(predictor, BatchingConfig(max_batch_size=1, max_wait_ms=0)) as url, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text="first"), timeout=60)
        assert predictor.waiting.wait(timeout=30), "the first batch reached the predictor"
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/predict", json={"inputs": [dict(task="upper", text=f"gone{i}") for i in range(5)]},
                       timeout=1.0)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health", timeout=30).json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()
        assert first.result().json() == dict(task="upper", answer="FIRST")
        assert httpx.post(f"{url}/predict", json=dict(task="length", text="after"), timeout=30).json()["answer"] == 5
    assert predictor.texts == ["first", "after"]


class ExampleErrorPredictor(EchoPredictor):
    """EchoPredictor that answers the text "bad" with an exception of its own, as RunsPredictor answers a
    non-finite output."""

    def predict(self, examples):
        answers = super().predict(examples)
        return [RuntimeError("its output is not finite") if e["text"] == "bad" else a
                for e, a in zip(examples, answers)]


def test_an_example_the_predictor_cannot_answer_fails_alone_without_running_its_batch_again():
    predictor = ExampleErrorPredictor(threading.Event())
    with running(predictor, BatchingConfig(max_batch_size=8, max_wait_ms=0)) as url, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text="first"), timeout=60)
        assert predictor.waiting.wait(timeout=30)
        texts = ["a", "bad", "c", "d"]
        requests = [pool.submit(httpx.post, f"{url}/predict", json=dict(task="upper", text=t), timeout=60)
                    for t in texts]
        while httpx.get(f"{url}/health", timeout=30).json()["queued"] < len(texts):
            time.sleep(0.01)
        predictor.gate.set()
        assert blocker.result().status_code == 200
        answers = [request.result() for request in requests]
    assert [a.status_code for a in answers] == [200, 500, 200, 200]
    assert answers[1].json() == {"error": "the prediction failed: its output is not finite"}
    assert predictor.batches == [1, 4], "the batch ran once, not again example by example"


def test_a_request_whose_example_fails_has_its_other_examples_dropped_unpredicted():
    """Its 500 answers the request whole: its examples still queued are not predicted (the worker took the next
    into a batch before the handler cancelled them)."""
    predictor = ExampleErrorPredictor()
    with running(predictor, BatchingConfig(max_batch_size=1, max_wait_ms=0)) as url:
        failed = httpx.post(f"{url}/predict", json={"inputs": [dict(task="upper", text=t) for t in ("bad", "b", "c")]},
                            timeout=30)
        assert failed.status_code == 500 and "its output is not finite" in failed.json()["error"]
        assert httpx.post(f"{url}/predict", json=dict(task="length", text="after"), timeout=30).json()["answer"] == 5
        assert httpx.get(f"{url}/health", timeout=30).json()["queued"] == 0
    assert predictor.texts == ["bad", "after"]


class MiscountingPredictor(EchoPredictor):
    """EchoPredictor that answers the text "lost" with no answers and "none" with None."""

    def predict(self, examples):
        text = examples[0]["text"]
        if text in ("lost", "none"):
            return [] if text == "lost" else None
        return super().predict(examples)


def test_a_predictor_that_miscounts_its_answers_fails_its_batch_and_the_server_serves_on():
    with running(MiscountingPredictor(), BatchingConfig(max_batch_size=1, max_wait_ms=0)) as url:
        for text, error in (("lost", "the predictor gave 0 answers for 1 examples"),
                            ("none", "'NoneType' object is not iterable")):
            failed = httpx.post(f"{url}/predict", json=dict(task="upper", text=text), timeout=30)
            assert failed.status_code == 500 and failed.json() == {"error": f"the prediction failed: {error}"}
        assert httpx.post(f"{url}/predict", json=dict(task="length", text="after"), timeout=30).json()["answer"] == 5


def test_batching_config_is_checked():
    for bad in (dict(max_batch_size=0), dict(max_queue=0), dict(max_wait_ms=-1), dict(max_wait_ms=float("nan")),
                dict(max_request_bytes=0)):
        with pytest.raises(ValueError, match="must be at least"):
            BatchingConfig(**bad)


# ------------------------------------------------------------------ runs of `bitfit-fast train`, one model, mixed

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs on one tiny BERT: "topics" (3 classes) and "score" (regression), trained for one epoch."""
    from test_trainer import save_tiny_bert, write_csv

    from bitfit_fast import BitFitConfig
    from bitfit_fast.train import TrainConfig, train

    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_bert(root / "model", dropout=0.0)
    runs = {}
    for name, score in (("topics", False), ("score", True)):
        files = dict(train_file=write_csv(root / f"{name}-train.csv", 24, 1, score=score),
                     validation_file=write_csv(root / f"{name}-val.csv", 8, 2, score=score))
        train(TrainConfig(model=model, epochs=1, batch_size=8, regression=score, output_dir=str(root / name),
                          progress=False, bitfit=BitFitConfig(backend="torch"), **files), log=lambda *_: None)
        runs[name] = str(root / name)
    return runs


def test_runs_served_together_answer_as_each_run_alone(two_runs):
    """Concurrent requests of both tasks are answered in mixed batches, each exactly as `bitfit-fast predict` of
    its own run answers it."""
    from bitfit_fast import serve
    from bitfit_fast.serve import RunsPredictor

    texts = ["goal match team", "bank price", "the new chip and robot", "coach said today", "market profit big",
             "software phone", "a big team goal with new coach"]
    examples = [dict(task=("topics", "score")[i % 2], text=texts[i % len(texts)]) for i in range(20)]
    predictor = RunsPredictor(list(two_runs.values()), backend="torch")
    assert predictor.tasks == ["topics", "score"]
    with running(predictor, BatchingConfig(max_batch_size=8, max_wait_ms=50)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda e: client.post("/predict", json=e), examples))
    alone = {task: {row["text"]: row for row in serve.predict(path, texts=[(t,) for t in texts])}
             for task, path in two_runs.items()}
    for example, response in zip(examples, answers):
        assert response.status_code == 200, response.text
        got, expected = response.json(), alone[example["task"]][example["text"]]
        assert got["task"] == example["task"]
        if example["task"] == "score":
            assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
        else:
            assert got["label"] == expected["label"]
            assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)


@pytest.mark.parametrize("example,message", [
    (dict(task="weather", text="goal"), "unknown task 'weather': this server knows ['topics', 'score']"),
    (dict(examples=[]), "several are {\"inputs\": [example, ...]}; got the keys 'examples'"),
    (dict(task="topics", text=" ".join(["goal"] * 200)), "the text is 202 tokens; task 'topics' reads at most 128"),
    (dict(task="topics", text=""), "task 'topics' needs a non-empty 'text'"),
    (dict(task="topics", text=" \n"), "task 'topics' needs a non-empty 'text'"),
    (dict(task=["topics"], text="goal"), "'task' is a task's name, a string of ['topics', 'score']; got [\"topics\"]"),
    (dict(task=12, text="goal"), "'task' is a task's name, a string of ['topics', 'score']; got 12"),
    (dict(task="topics", text="goal \ud800 match"), "a text of task 'topics' is not valid Unicode (a lone surrogate"),
    (dict(task="score", text="goal", text_pair="match"), "task 'score' reads one text: leave out 'text_pair'"),
    (dict(task="topics", text=5), "'text' must be a string, got 5"),
    (dict(task="topics", text=["goal"]), "'text' must be a string, got [\"goal\"]"),
    (dict(task="topics", txt="goal"), "unknown key 'txt': an example is {\"task\": NAME, \"text\": \"...\""),
    (dict(task="topics", text="goal", id=3, lang="en"), "unknown keys 'id', 'lang': an example is"),
    (dict(task="topics", text="goal", **{f"k{i}": i for i in range(7)}),  # a client's keys are quoted cut short
     "unknown keys 'k0', 'k1', 'k2', 'k3', 'k4', ... (7 keys): an example is"),
    (dict(task="t" * 10_000), "unknown task '" + "t" * 79 + "... (10,002 characters): this server knows"),
])
def test_a_request_the_runs_cannot_answer_is_named(two_runs, example, message):
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor(list(two_runs.values()), backend="torch")
    with pytest.raises(RequestError) as refused:
        predictor.check(example)
    assert message in str(refused.value)


def test_readme_client_talks_to_a_server_of_runs(two_runs, capsys):
    from test_readme import BLOCKS

    from bitfit_fast.serve import RunsPredictor

    client = next(code for code in BLOCKS if code.startswith("# needs-server"))
    with running(RunsPredictor(list(two_runs.values()), backend="torch"), BatchingConfig()) as url:
        namespace = {"SERVER": url}
        exec(compile(client, "README.md[client]", "exec"), namespace)
    topics, score = namespace["answers"]
    assert topics["task"] == "topics" and topics["label"] in topics["probabilities"]
    assert score["task"] == "score" and isinstance(score["score"], float)


def test_health_describes_what_each_task_takes_and_answers(two_runs, pair_run):
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor([two_runs["topics"], two_runs["score"], pair_run], backend="torch", truncate=True)
    with running(predictor, BatchingConfig()) as url:
        health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["tasks"] == ["topics", "score", "pairs"]
    details = health["details"]
    assert details["score"] == {"labels": None, "texts": ["text"], "max_length": 128, "longer": "cut"}
    assert details["topics"]["labels"] == predictor.runs["topics"].label_names and len(details["topics"]["labels"]) == 3
    assert details["pairs"]["texts"] == ["text", "text_pair"]
    # The runs' "auto" precision where the server runs, as its first line says.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert health["serving"] == {"device": device, "precision": "bf16" if device == "cuda" else "fp32"}
    predictor.precision = "bf16"  # as a server of bf16 runs holds it
    assert predictor.serving["precision"] == "bf16"


def test_a_text_of_exactly_max_length_tokens_is_answered(two_runs):
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor(list(two_runs.values()), backend="torch")
    checked = predictor.check(dict(task="topics", text=" ".join(["goal"] * 126)))  # with [CLS] and [SEP]: 128
    assert len(checked["input_ids"]) == 128
    with pytest.raises(RequestError, match="the text is 129 tokens; task 'topics' reads at most 128"):
        predictor.check(dict(task="topics", text=" ".join(["goal"] * 127)))


def test_checks_in_many_threads_at_once_cut_each_text_to_its_own_tasks_length(two_runs):
    # The server checks examples in worker threads, several at once; a tokenizer call sets its truncation before
    # encoding, so a shared tokenizer cut one task's text to another's max length (157 of 2000 in a review's run).
    import dataclasses

    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor(list(two_runs.values()), backend="torch", truncate=True)
    score = predictor.runs["score"]
    predictor.runs["score"] = dataclasses.replace(score, config=dataclasses.replace(score.config, max_length=16))
    text = " ".join(["goal", "match", "bank"] * 100)
    tasks = ["topics", "score"] * 400
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        lengths = list(pool.map(lambda task: len(predictor.check(dict(task=task, text=text))["input_ids"]), tasks))
    assert lengths == [128, 16] * 400


def test_a_server_started_with_truncate_cuts_a_long_text_as_predict_does(two_runs):
    from bitfit_fast import serve
    from bitfit_fast.serve import RunsPredictor

    text = " ".join(["goal", "match", "bank"] * 70)  # 210 words: past the runs' 128 tokens
    predictor = RunsPredictor(list(two_runs.values()), backend="torch", truncate=True)
    checked = predictor.check(dict(task="topics", text=text))
    assert len(checked["input_ids"]) == 128
    answer = predictor.predict([checked])[0]
    expected = serve.predict(two_runs["topics"], texts=[(text,)])[0]
    assert answer["label"] == expected["label"]
    assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)


def test_a_text_of_megabytes_is_refused_or_cut_from_its_start_alone(two_runs):
    """A text far longer than a task reads is refused (or, with --truncate, cut as predict cuts it) from its first
    CHARACTERS_PER_TOKEN · max_length characters: a text of 8 MB was tokenised whole (seconds, gigabytes) to count
    tokens no model reads. A start that holds too few tokens to decide (words of hundreds of characters, each one
    token) is read four times longer until it does; a text without whitespace to cut at is read whole."""
    from bitfit_fast import serve
    from bitfit_fast.serve import RunsPredictor

    huge = " ".join(["goal", "match", "bank"] * 70_000)  # 1 MB
    read = []

    def reading(tokenizer):
        def tokenize(*texts, **options):
            read.append(sum(map(len, texts)))
            return tokenizer(*texts, **options)
        return tokenize

    for truncate in (False, True):
        predictor = RunsPredictor(list(two_runs.values()), backend="torch", truncate=truncate)
        predictor._local.tokenizer = reading(predictor.tokenizer)  # this thread's
        if truncate:
            checked = predictor.check(dict(task="topics", text=huge))
            expected = serve.predict(two_runs["topics"], texts=[(huge,)])[0]  # the whole text, cut
            assert predictor.predict([checked])[0]["probabilities"] == pytest.approx(expected["probabilities"],
                                                                                     abs=2e-6)
        else:
            with pytest.raises(RequestError, match="the text is more than 128 tokens; task 'topics' reads at most 128"):
                predictor.check(dict(task="topics", text=huge))
    assert max(read) <= serve.CHARACTERS_PER_TOKEN * 128
    # Words too long for WordPiece (over 100 characters) are one [UNK] each: the first 8,192 characters hold 40.
    long_words = " ".join(["g" * 200] * 5_000)  # 1 MB, 5,000 tokens
    for truncate in (False, True):
        read.clear()
        predictor = RunsPredictor([two_runs["topics"]], backend="torch", truncate=truncate)
        predictor._local.tokenizer = reading(predictor.tokenizer)
        if truncate:
            assert predictor.check(dict(task="topics", text=long_words))["input_ids"] == predictor.tokenizer(
                long_words, truncation=True, max_length=128)["input_ids"]
        else:
            with pytest.raises(RequestError, match="the text is more than 128 tokens"):
                predictor.check(dict(task="topics", text=long_words))
        assert sum(read) <= 5.4 * 129 * 201, "at most 5.4 times the characters of the 129 tokens that decide"
    # A text of few tokens in all is read 2.4 times at most: the starts tried (8 and 32 KB here), then the whole.
    read.clear()
    predictor = RunsPredictor([two_runs["topics"]], backend="torch")
    predictor._local.tokenizer = reading(predictor.tokenizer)
    few = " ".join(["g" * 280] * 120)  # 33 KB, 120 tokens
    assert len(predictor.check(dict(task="topics", text=few))["input_ids"]) == 122
    assert 2 * len(few) < sum(read) <= 2.4 * len(few)
    one_word = "g" * (serve.CHARACTERS_PER_TOKEN * 128 + 1)  # no whitespace to cut at: read whole, one [UNK]
    assert len(RunsPredictor([two_runs["topics"]], backend="torch").check(
        dict(task="topics", text=one_word))["input_ids"]) == 3


def test_a_long_pair_is_cut_as_the_tokenizer_cuts_the_whole_pair(pair_run):
    """With --truncate, a pair is tokenised whole: "longest_first" keeps the odd token of whichever text is longer
    in full, and the first text's start alone (1,638 tokens) would be the shorter of the two (4,000)."""
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor([pair_run], backend="torch", truncate=True)
    first, second = "goal " * 10_000, "bank " * 4_000
    checked = predictor.check(dict(task="pairs", text=first, text_pair=second))
    assert checked["input_ids"] == predictor.tokenizer(first, second, truncation=True, max_length=128)["input_ids"]


def test_a_text_of_no_tokens_is_refused(two_runs):
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor(list(two_runs.values()), backend="torch")
    for text in ("\u200b\u200b", "\x00"):
        with pytest.raises(RequestError, match="a text of task 'topics' has no tokens"):
            predictor.check(dict(task="topics", text=text))


def test_an_example_whose_output_is_not_finite_gets_its_own_error(two_runs):
    """A damaged or diverged run's example: its error in its place, the batch's other examples answered."""
    from bitfit_fast.errors import UserError
    from bitfit_fast.serve import RunsPredictor

    predictor = RunsPredictor(list(two_runs.values()), backend="torch")
    heads = predictor.bank.model.classifier
    with torch.no_grad():
        heads.bias[heads.first_column[predictor.bank.tasks["score"].index]] = float("nan")
    examples = [predictor.check(dict(task=task, text="goal match")) for task in ("topics", "score", "topics")]
    answers = predictor.predict(examples)
    assert [type(a) for a in answers] == [dict, UserError, dict]
    assert "task 'score': the model's output is [nan], not finite" in str(answers[1])


def test_predict_answers_every_text_past_its_first_batch(two_runs):
    from bitfit_fast import serve

    texts = [(f"goal {'match ' * i}",) for i in range(40)]  # batches of 32: a second, partial batch
    rows = serve.predict(two_runs["topics"], texts=texts)
    assert [row["text"] for row in rows] == [t for t, in texts]
    one_by_one = [serve.predict(two_runs["topics"], texts=[t])[0] for t in (texts[0], texts[33], texts[39])]
    assert [rows[0], rows[33], rows[39]] == one_by_one


def test_an_answer_is_its_tasks_own_columns_and_a_finite_number():
    from bitfit_fast.errors import UserError
    from bitfit_fast.serve import answer

    padded = torch.tensor([-1.5, 0.0, 0.0])  # a score task's row in a bank whose widest task has 3 classes
    assert answer(padded, None) == {"score": -1.5}
    assert answer(torch.tensor([2.0, 0.0, 0.0]), ["sport", "tech"])["label"] == "sport"
    for logits, names in ((torch.tensor([float("nan"), 0.0]), None), (torch.tensor([1.0, float("inf")]), ["a", "b"])):
        with pytest.raises(UserError, match="not finite: the run's biases are damaged or diverged; train it again"):
            answer(logits, names)


@pytest.fixture(scope="module")
def pair_run(two_runs, tmp_path_factory):
    """A run on two text columns (premise, hypothesis) of the same tiny BERT as ``two_runs``."""
    from test_cli import pair_columns, write_table

    from bitfit_fast import BitFitConfig
    from bitfit_fast.train import TrainConfig, train

    root = tmp_path_factory.mktemp("pairs")
    files = dict(train_file=write_table(root / "train.csv", pair_columns(24, 1)),
                 validation_file=write_table(root / "val.csv", pair_columns(8, 2)))
    model = str(Path(two_runs["topics"]).parent / "model")
    train(TrainConfig(model=model, epochs=1, batch_size=8, text_columns=["premise", "hypothesis"],
                      output_dir=str(root / "pairs"), progress=False, bitfit=BitFitConfig(backend="torch"), **files),
          log=lambda *_: None)
    return str(root / "pairs")


def test_a_two_text_task_is_served_with_both_texts(two_runs, pair_run):
    from bitfit_fast import serve
    from bitfit_fast.serve import RunsPredictor

    pairs = [("goal match team", "coach said today"), ("bank price", "market profit big"),
             ("goal match team", "market profit big")]  # the same first text with another second one
    predictor = RunsPredictor([two_runs["topics"], pair_run], backend="torch")
    with running(predictor, BatchingConfig(max_batch_size=8, max_wait_ms=50)) as url:
        examples = [dict(task="pairs", text=a, text_pair=b) for a, b in pairs] + [dict(task="topics", text="goal")]
        answers = httpx.post(f"{url}/predict", json={"inputs": examples}, timeout=30).json()["predictions"]
    alone = serve.predict(pair_run, texts=pairs)
    for got, expected in zip(answers[:3], alone, strict=True):
        assert got["task"] == "pairs" and got["label"] == expected["label"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)
    assert answers[0]["probabilities"] != answers[2]["probabilities"], "the second text is read"
    with pytest.raises(RequestError, match="'text_pair' must be a string, got 5"):
        predictor.check(dict(task="pairs", text="a goal", text_pair=5))


@pytest.fixture(scope="module")
def bf16_run(two_runs, tmp_path_factory):
    """A run of "topics" trained (and scored) in bf16 autocast, on the same tiny BERT as ``two_runs``."""
    from test_trainer import write_csv

    from bitfit_fast import BitFitConfig
    from bitfit_fast.train import TrainConfig, train

    root = tmp_path_factory.mktemp("bf16")
    files = dict(train_file=write_csv(root / "train.csv", 24, 1), validation_file=write_csv(root / "val.csv", 8, 2))
    model = str(Path(two_runs["topics"]).parent / "model")
    train(TrainConfig(model=model, epochs=1, batch_size=8, precision="bf16", output_dir=str(root / "half"),
                      progress=False, bitfit=BitFitConfig(backend="torch"), **files), log=lambda *_: None)
    return str(root / "half")


def answers_in(precision: str, run: str, texts: list[str]) -> list[dict]:
    """The run's answers to ``texts`` worked out here, in ``precision``: its base model and best biases, outside
    bitfit_fast's predict."""
    import transformers

    from bitfit_fast import load_biases
    from bitfit_fast.serve import answer
    from bitfit_fast.train import autocast, load_run

    record = load_run(run)
    tokenizer = transformers.AutoTokenizer.from_pretrained(record.model_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(record.model_path,
                                                                           num_labels=record.num_labels)
    load_biases(model, Path(run) / "biases")
    with torch.no_grad(), autocast(precision, torch.device("cpu")):
        logits = model.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float()
    return [answer(row, record.label_names) for row in logits]


PRECISION_TEXTS = ["goal match team", "bank price", "the new chip and robot", "a big team goal with new coach"]


def test_predict_answers_in_the_precision_the_run_was_trained_and_scored_in(bf16_run):
    from bitfit_fast import serve

    predicted = [{k: row[k] for k in ("label", "probabilities")}
                 for row in serve.predict(bf16_run, texts=[(t,) for t in PRECISION_TEXTS])]
    in_bf16 = answers_in("bf16", bf16_run, PRECISION_TEXTS)
    for got, expected in zip(predicted, in_bf16, strict=True):
        assert got["label"] == expected["label"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)
    assert in_bf16 != answers_in("fp32", bf16_run, PRECISION_TEXTS), "the two precisions answer alike: no test"


def test_runs_are_served_in_their_precision_or_in_fp32_where_theirs_differ(two_runs, bf16_run):
    from bitfit_fast.serve import RunsPredictor

    alone = RunsPredictor([bf16_run], backend="torch")
    assert alone.precision == "bf16"
    served = alone.predict([alone.check(dict(task="half", text=text)) for text in PRECISION_TEXTS])
    for got, expected in zip(served, answers_in("bf16", bf16_run, PRECISION_TEXTS), strict=True):
        assert got["label"] == expected["label"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)
    assert RunsPredictor([bf16_run, two_runs["topics"]], backend="torch").precision == "fp32"


def test_runs_of_two_half_precisions_are_served_in_fp32_and_bf16_falls_back_where_a_gpu_lacks_it(monkeypatch):
    """fp16's range would overflow values a bf16 run holds, bf16 would round what an fp16 run keeps: one batch of
    both runs in fp32. A bf16 run on a GPU without bf16 (torch.autocast refuses it there) runs in fp32."""
    import dataclasses
    from types import SimpleNamespace

    from bitfit_fast.serve import serving_precision
    from bitfit_fast.train import TrainConfig

    def run(precision):
        return SimpleNamespace(config=dataclasses.replace(TrainConfig(), precision=precision))

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert serving_precision([run("fp16"), run("bf16")], cpu) == "fp32"
    assert serving_precision([run("fp16"), run("fp16")], cpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert serving_precision([run("bf16")], gpu) == "fp32"
    assert serving_precision([run("fp16")], gpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert serving_precision([run("bf16")], gpu) == "bf16"
